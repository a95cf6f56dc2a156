"""How transformers lays out a bitsandbytes NF4 checkpoint: which weights are quantized, the
names of their parts, and the quantization state's JSON. Pure: no I/O, no torch."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from loramerge import conv1d
from loramerge.errors import LoramergeError
from loramerge.quant import nf4

STATE = ".quant_state.bitsandbytes__nf4"
PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", STATE)
# transformers' default for causal LMs: the output head stays as it is.
DEFAULT_SKIP = ("lm_head",)
QUANTIZABLE = ("BF16", "F16", "F32")
_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def quantizable(name: str, shape: tuple[int, ...], dtype: str, skip: tuple[str, ...] | None):
    """Whether transformers would quantize this tensor: a 2-D float `.weight` of a Linear layer
    (not an embedding) outside the skipped modules (given ones replace the default)."""
    return (
        name.endswith(".weight")
        and len(shape) == 2
        and dtype in QUANTIZABLE
        and not _embedding(name)
        and not _skipped(name.removesuffix(".weight"), DEFAULT_SKIP if skip is None else skip)
    )


def stored_weights(names: Iterable[str]) -> list[str]:
    """The weights a checkpoint holding these tensor names stores as NF4."""
    return [n.removesuffix(STATE) for n in names if n.endswith(STATE)]


def transposed(name: str, config: dict | None) -> bool:
    """Whether transformers quantizes this weight's transpose: a Conv1D weight, stored (in, out),
    whose NF4 state is of the (out, in) matrix (bitsandbytes' Bnb4bitQuantize)."""
    return conv1d.is_conv1d(name, config)


def check_model_type(names: Iterable[str], config: dict | None, where: str) -> None:
    """Refuse NF4 weights named like Conv1D layers when no config.json gives the model type:
    stored transposed (GPT-2) or not (a Linear of that name) cannot be told."""
    named = [n for n in names if conv1d.named(n)]
    if named and not (config or {}).get("model_type"):
        raise LoramergeError(
            f"{where}: {named[0]} may be a GPT-2 style Conv1D weight, which NF4 stores "
            "transposed, but no config.json gives the model type; put the model's config.json "
            "beside its weights"
        )


def quantized_shape(name: str, shape: tuple[int, ...], config: dict | None) -> tuple[int, ...]:
    """The shape of the matrix NF4 stores for a weight of this (checkpoint) shape."""
    return tuple(reversed(shape)) if transposed(name, config) else tuple(shape)


@dataclass(frozen=True)
class StoredNF4:
    """An NF4 weight as a checkpoint stores it: its quantization state's bytes and, for the
    packed codes ("") and each part (".absmax", ...), its stored dtype, shape and
    (fd, offset, nbytes) to copy."""

    state: bytes
    parts: dict[str, tuple[str, tuple[int, ...], tuple[int, int, int]]]


def _embedding(name: str) -> bool:
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return "embed" in module or module in ("wte", "wpe")


def _skipped(module: str, patterns: tuple[str, ...]) -> bool:
    """transformers' should_convert_module, negated: a pattern matches from the start up to a
    module boundary (also as a regex), or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def state_json(state: nf4.NF4) -> bytes:
    """The `quant_state.bitsandbytes__nf4` bytes: QuantState.as_dict(packed=True)'s JSON."""
    fields: dict[str, object] = {
        "quant_type": "nf4",
        "blocksize": state.blocksize,
        "dtype": state.dtype,
        "shape": list(state.shape),
    }
    if state.double_quant:
        fields.update(
            nested_blocksize=nf4.NESTED_BLOCKSIZE,
            nested_dtype="float32",
            nested_offset=state.offset,
        )
    return json.dumps(fields).encode()


def parse_state(raw: bytes, where: str) -> dict:
    """The quantization state of a stored NF4 weight, checked."""
    try:
        state = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        state = None
    ok = (
        isinstance(state, dict)
        and state.get("quant_type") == "nf4"
        and state.get("blocksize") in nf4.BLOCKSIZES
        and state.get("dtype") in _DTYPES
        and isinstance(state.get("shape"), list)
        and all(isinstance(d, int) and d >= 0 for d in state["shape"])
    )
    if not ok:
        raise LoramergeError(f"{where}: not a bitsandbytes NF4 quantization state")
    return state


def stored_dtype(state: dict) -> str:
    """The safetensors dtype the weight had before quantization."""
    return _DTYPES[state["dtype"]]
