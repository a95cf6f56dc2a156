"""Checkpoints seen through NF4: stored NF4 weights dequantized on read (a "bnb-4bit" base from
transformers or loramerge), or a float base's Linear weights replaced by dequant(NF4(W0)), the
weights a QLoRA adapter was trained against (`--qlora-base`).

A Conv1D weight (GPT-2 and its kin) is stored (in, out) but quantized as its (out, in)
transpose; it reads in the checkpoint's own (in, out) layout, as the plan and its adapters see
it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from loramerge import dtypes
from loramerge.nf4_layout import (
    PARTS,
    STATE,
    StoredNF4,
    check_model_type,
    parse_state,
    quantizable,
    stored_dtype,
    stored_weights,
    transposed,
)
from loramerge.quant import nf4
from loramerge.source.checkpoint import Checkpoint, RawRange
from loramerge.source.safetensors_file import TensorInfo, copy_into


class DerivedCheckpoint:
    """A checkpoint in which some tensors are computed when read (never copied as bytes)."""

    def __init__(
        self,
        inner: Checkpoint,
        derived: dict[str, tuple[TensorInfo, Callable[[], np.ndarray]]],
        hidden: set[str],
        description: dict,
        stored: dict[str, StoredNF4] | None = None,
    ) -> None:
        self.path = inner.path
        self.description = description
        self.stored = stored or {}  # dequantized NF4 weights, as stored
        self._inner = inner
        self._derived = derived
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in inner.tensors.items():
            if name in derived:
                self.tensors[name] = derived[name][0]
            elif name not in hidden:
                self.tensors[name] = info

    @property
    def files(self):
        """The weight files underneath."""
        return self._inner.files

    @property
    def gguf(self) -> None:
        """Never a GGUF file (NF4 checkpoints are safetensors)."""
        return None

    def read(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """One tensor (computed ones in their float dtype), in `into` if given."""
        if name not in self._derived:
            return self._inner.read(name, into)
        _, compute = self._derived[name]
        values = compute()
        return values if into is None else copy_into(values, into)

    def read_part(self, name: str, start: int, stop: int, into: np.ndarray) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor (a computed one is computed whole)."""
        if name not in self._derived:
            return self._inner.read_part(name, start, stop, into)
        return copy_into(self.read(name).reshape(-1)[start:stop], into)

    def raw(self, name: str) -> RawRange | None:
        """Stored bytes of a tensor that is not computed."""
        return None if name in self._derived else self._inner.raw(name)

    def close(self) -> None:
        """Close the checkpoint underneath."""
        self._inner.close()

    def __enter__(self) -> DerivedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_nf4(checkpoint: Checkpoint | DerivedCheckpoint) -> bool:
    """Whether a checkpoint stores NF4 weights (bitsandbytes layout), dequantized or not."""
    if isinstance(checkpoint, DerivedCheckpoint):
        return checkpoint.description.get("format") == "nf4"
    return any(name.endswith(STATE) for name in checkpoint.tensors)


def dequantized(checkpoint: Checkpoint, config: dict | None) -> DerivedCheckpoint:
    """An NF4 checkpoint whose quantized weights read as their dequantized float values
    (exactly bitsandbytes' dequantize_4bit; a Conv1D weight transposed back to its (in, out)
    layout, `config` saying which those are), their quantization parts hidden."""
    derived, hidden, states, stored = {}, set(), [], {}
    names = stored_weights(checkpoint.tensors)
    check_model_type(names, config, str(checkpoint.path))
    for name in names:
        state_name = name + STATE
        raw = checkpoint.read(state_name).tobytes()
        state = parse_state(raw, f"{checkpoint.path}: {name}")
        dtype = stored_dtype(state)
        flip = transposed(name, config)
        shape = tuple(state["shape"])[:: -1 if flip else 1]
        packed = checkpoint.tensors.get(name)
        info = TensorInfo(
            name,
            packed.path if packed else checkpoint.path,
            dtype,
            shape,
            packed.offset if packed else 0,
            math.prod(shape) * dtypes.itemsize(dtype),
        )
        derived[name] = (info, _reader(checkpoint, name, state, flip))
        hidden |= {name + part for part in PARTS}
        states.append(state)
        parts = {p: _raw_part(checkpoint, name + p) for p in ("", *PARTS[:-1])}
        if None not in parts.values():
            stored[name] = StoredNF4(raw, {p: r for p, r in parts.items() if r != ()})
    blocksizes = sorted({s["blocksize"] for s in states})
    description = {"format": "nf4", "quantized_tensors": len(derived), "blocksizes": blocksizes}
    return DerivedCheckpoint(checkpoint, derived, hidden, description, stored)


def stored_nf4(checkpoint: Checkpoint | DerivedCheckpoint, name: str) -> StoredNF4 | None:
    """How the checkpoint stores weight `name` in NF4 (None: not NF4, or not as raw bytes)."""
    return checkpoint.stored.get(name) if isinstance(checkpoint, DerivedCheckpoint) else None


def _raw_part(checkpoint: Checkpoint, name: str):
    """(dtype, shape, byte range) of a stored part; () when absent; None when not raw bytes."""
    if name not in checkpoint.tensors:
        return ()
    raw, info = checkpoint.raw(name), checkpoint.tensors[name]
    return (
        None if raw is None else (info.dtype, tuple(info.shape), (raw.fd, raw.offset, raw.nbytes))
    )


def _reader(checkpoint: Checkpoint, name: str, state: dict, flip: bool) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        def part(suffix: str) -> np.ndarray:
            return checkpoint.read(name + suffix)

        nested = name + ".nested_absmax" in checkpoint.tensors
        stored = nf4.NF4(
            packed=checkpoint.read(name),
            absmax=part(".absmax"),
            shape=tuple(state["shape"]),
            dtype=state["dtype"],
            blocksize=state["blocksize"],
            nested_absmax=part(".nested_absmax") if nested else None,
            offset=float(state["nested_offset"]) if nested else None,
        )
        nested_code = part(".nested_quant_map") if nested else nf4.DYNAMIC_MAP
        values = nf4.dequantize(stored, part(".quant_map"), nested_code)
        values = values.astype(dtypes.to_numpy(stored_dtype(state)))
        return np.ascontiguousarray(values.T) if flip else values

    return read


def qlora_base(
    checkpoint: Checkpoint, config: dict | None, blocksize: int, double_quant: bool
) -> DerivedCheckpoint:
    """A float checkpoint whose Linear weights read as dequant(NF4(W0)), rounded to their dtype
    (a Conv1D weight quantized as its transpose, as transformers does): what a QLoRA adapter
    saw of the base during training."""
    names = [n for n, i in checkpoint.tensors.items() if quantizable(n, i.shape, i.dtype, None)]
    check_model_type(names, config, "--qlora-base")
    derived = {
        name: (
            replace(checkpoint.tensors[name]),
            _round_trip(checkpoint, name, blocksize, double_quant, transposed(name, config)),
        )
        for name in names
    }
    description = {
        "nf4_round_trip": {"blocksize": blocksize, "double_quant": double_quant},
        "tensors": len(derived),
    }
    return DerivedCheckpoint(checkpoint, derived, set(), description)


def _round_trip(checkpoint: Checkpoint, name: str, blocksize: int, double_quant: bool, flip: bool):
    def read() -> np.ndarray:
        weight = checkpoint.read(name)
        matrix = np.ascontiguousarray(weight.T) if flip else weight
        values = nf4.dequantize(nf4.quantize(matrix, blocksize, double_quant))
        values = values.astype(weight.dtype)
        return np.ascontiguousarray(values.T) if flip else values

    return read
