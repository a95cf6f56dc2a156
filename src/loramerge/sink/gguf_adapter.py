"""GGUF LoRA adapter output: the file llama.cpp loads with `--lora`, laid out as
convert_lora_to_gguf.py writes it.

Each adapted base tensor `<gguf name>` gets `<gguf name>.lora_a` and `.lora_b` (numpy shapes
(r, in) and (out, r), so llama.cpp reads the rank from lora_b's first dimension), B's rows in the
order the base's GGUF rows have (the Llama q/k permutation), and for the token embedding A and B
flipped as llama.cpp's embedding lookup wants them. Tensor types follow the converter's --outtype
rule. Header, metadata and tensor infos are written first (gguf's `GGUFWriter`), then each pair in
the announced order as it arrives.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from loramerge.errors import LoramergeError
from loramerge.gguf_format import DIGEST_PLACEHOLDER, digest_offset, file_hash_entry
from loramerge.gguf_names import TensorNames, to_gguf_values
from loramerge.hashing import FILES_HASH, digest_of
from loramerge.quant import ggml
from loramerge.quant.ggml_types import DEFAULT_TYPE, GGUF_TYPES, converter_type
from loramerge.sink.direct_io import io_errors
from loramerge.sink.formats import OUTTYPES

PROVENANCE_KEY = "loramerge.provenance"
TOKEN_EMBD = "token_embd.weight"

# llama.cpp scales a pair by `adapter_scale * alpha / rank` (rank = lora_b's ne[0]), or by
# `adapter_scale` alone when adapter.lora.alpha is 0 (llama_adapter_lora_weight::get_scale,
# export-lora.cpp alike). One alpha per file cannot give every pair its own scale once ranks
# differ (rank_pattern), and alpha / rank would round again in float32, so each pair carries its
# scale in B and the file says 0: llama.cpp then multiplies by exactly the user's --lora-scaled.
ALPHA = 0.0


@dataclass(frozen=True)
class Pair:
    """One adapted base tensor: its Hugging Face name, shape (out, in) and LoRA rank."""

    target: str
    shape: tuple[int, int]
    rank: int


@dataclass(frozen=True)
class Slot:
    """One tensor of the adapter file: GGUF name, type, shape (numpy order)."""

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of its data."""
        return int(np.prod(self.shape[:-1])) * ggml.row_bytes(self.qtype, self.shape[-1])


def adapter_slots(
    pairs: list[Pair], names: TensorNames, outtype: str
) -> dict[str, tuple[Slot, Slot]]:
    """Each pair's (lora_a, lora_b) tensors by target, in the order they are written."""
    if outtype not in OUTTYPES:
        raise LoramergeError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    default = DEFAULT_TYPE[GGUF_TYPES[outtype][0]]
    slots = {}
    for pair in pairs:
        gname = names.gguf_name(pair.target)
        out, cols = pair.shape
        a_shape, b_shape = (out, pair.rank), (cols, pair.rank)  # token_embd: flipped
        if gname != TOKEN_EMBD:
            a_shape, b_shape = (pair.rank, cols), (out, pair.rank)
        slots[pair.target] = tuple(
            Slot(n, converter_type(n, s, default), s)
            for n, s in ((f"{gname}.lora_a", a_shape), (f"{gname}.lora_b", b_shape))
        )
    return slots  # type: ignore[return-value]


def describe(slots: dict[str, tuple[Slot, Slot]], outtype: str, arch: str) -> dict:
    """The `output` part of the provenance record (and of a dry run's report)."""
    types = Counter(s.qtype.name for pair in slots.values() for s in pair)
    return {
        "format": "gguf-lora",
        "outtype": outtype,
        "architecture": arch,
        "lora_pairs": len(slots),
        "adapter.lora.alpha": ALPHA,
        "tensor_types": dict(sorted(types.items())),
    }


class GGUFAdapterFile:
    """The GGUF adapter sink: `path` is the (temporary) file to fill, `names` the base's map."""

    def __init__(
        self,
        path: Path,
        pairs: list[Pair],
        names: TensorNames,
        config: dict,
        outtype: str,
        name: str,
        record: dict,
    ) -> None:
        arch = names.arch
        self._arch, self._config = arch, config
        self._slots = adapter_slots(pairs, names, outtype)
        self._writer = gguf.GGUFWriter(None, arch.name)
        writer = self._writer
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)
        writer.add_name(name)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        self.description = describe(self._slots, outtype, arch.name)
        record = {**record, "output": self.description, "file_hash": file_hash_entry(FILES_HASH)}
        writer.add_string(PROVENANCE_KEY, json.dumps(record, sort_keys=True))
        for slot in (s for pair in self._slots.values() for s in pair):
            writer.add_tensor_info(
                slot.name, slot.shape, np.dtype(np.float32), slot.nbytes, raw_dtype=slot.qtype
            )
        self._path = path
        with io_errors(path):
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            (file,) = writer.fout
            file.flush()
        with open(path, "rb") as head:
            at = digest_offset(head.read(file.tell()), FILES_HASH, DIGEST_PLACEHOLDER)
        if at is None:
            raise RuntimeError("the GGUF header lost its record's digest placeholder")
        self._digest_at = at
        self.order = list(self._slots)
        self._expected: Iterator[str] = iter(self.order)

    def write(self, target: str, a: np.ndarray, b: np.ndarray) -> None:
        """Write the next pair: A (r, in) and B (out, r) with dW = B @ A in `target`'s own
        Hugging Face layout, the scale already in B."""
        expected = next(self._expected, None)
        if target != expected:
            raise AssertionError(f"GGUF adapter pairs arrive in order: {expected}, not {target}")
        slot_a, slot_b = self._slots[target]
        b = to_gguf_values(self._arch, target, b, self._config)  # B's rows as the base's rows
        if slot_a.name == f"{TOKEN_EMBD}.lora_a":  # llama.cpp takes A's rows per token
            a, b = b, a.T
        for slot, values in ((slot_a, a), (slot_b, b)):
            with io_errors(self._path):
                self._writer.write_tensor_data(ggml.quantize(values, slot.qtype))

    def finish(self) -> None:
        """Check every pair arrived and close the file (the atomic output fsyncs it)."""
        missing = next(self._expected, None)
        if missing is not None:
            raise LoramergeError(f"GGUF adapter output is missing the pair of {missing}")
        with io_errors(self._path):
            self._writer.close()
            # the record's digest of the file, its own characters read as the placeholder
            # (`gguf_format.file_hash_entry`): a small file, hashed once it is whole
            self.digest = digest_of([self._path], FILES_HASH)
            fd = os.open(self._path, os.O_WRONLY)
            try:
                os.pwrite(fd, self.digest.encode(), self._digest_at)
            finally:
                os.close(fd)

    def abort(self) -> None:
        """Close the file."""
        self._writer.close()
