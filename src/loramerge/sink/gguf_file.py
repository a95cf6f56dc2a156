"""GGUF output: one llama.cpp file, header first, then each tensor's blocks as it arrives.

Every tensor's GGUF name, type and byte size follow from its shape, so gguf's `GGUFWriter`
writes the header, the metadata (hyperparameters, tokenizer, `loramerge.provenance`) and the
tensor infos up front; each finished tensor is then converted as convert_hf_to_gguf.py does
(`gguf_names`), quantized (`quant.ggml`, llama.cpp's reference blocks) and written at its own
offset (a few whole rows at a time where the conversion keeps rows in place), so tensors may
arrive in any order on any thread and none is held longer than that.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np

from loramerge.errors import LoramergeError
from loramerge.gguf_format import DIGEST_PLACEHOLDER, digest_offset, file_hash_entry
from loramerge.gguf_names import (
    Architecture,
    TensorNames,
    UnsupportedArchitecture,
    architecture,
    row_local,
    to_gguf_values,
)
from loramerge.hashing import FILES_HASH
from loramerge.quant import ggml
from loramerge.quant.ggml_types import GGUF_TYPES, ModelInfo, tensor_types
from loramerge.sink.direct_io import PositionalFile, io_errors
from loramerge.sink.formats import GGUFInfo
from loramerge.sink.gguf_metadata import extra_tensors, write_hyperparameters, write_tokenizer
from loramerge.sink.safetensors_writer import Entry, PrefixHasher

PROVENANCE_KEY = "loramerge.provenance"


class BlockSink:
    """What both GGUF sinks share: one open file, each tensor quantized to its type and written
    at its own offset (so any order, any thread), a few whole rows at a time where conversion
    keeps rows in place. The file is hashed as it is written, and its record ends holding that
    digest (`gguf_format.file_hash_entry`), which `verify --files` and `push` check."""

    _file: PositionalFile
    _hasher: PrefixHasher
    _digest_at: int  # where the record's digest goes
    _data_start: int
    _slots: dict[str, tuple[gguf.GGMLQuantizationType, int, int]]  # (type, offset, bytes)
    _shapes: dict[str, tuple[int, ...]]  # the Hugging Face layout's shape
    _arch: Architecture
    _config: dict

    def parts_any_order(self, name: str) -> bool:
        """A tensor's parts come in order (its blocks are converted as they arrive)."""
        return False

    def _open(self, path: Path, data_bytes: int, cached: bool) -> None:
        self._path = path
        with io_errors(path):
            self._file = PositionalFile(
                path, self._data_start + data_bytes, existing=True, cached=cached
            )
        self._size = self._data_start + data_bytes
        self._hasher = PrefixHasher(path, self._size)
        self._written: set[str] = set()
        self._filled: dict[str, int] = {}  # bytes of a tensor written so far
        self.files: list[str] = []
        self.hashes: dict[str, str] = {}
        self.config_updates: dict = {}

    def _header_written(self, head: bytes) -> None:
        """The header is in the file, its record's digest a placeholder: hash it, and the
        zeros that pad it and every tensor to the alignment, from the file."""
        at = digest_offset(head, FILES_HASH, DIGEST_PLACEHOLDER)
        if at is None:
            raise RuntimeError("the GGUF header lost its record's digest placeholder")
        self._digest_at = at
        self._hasher.completed(0, self._data_start)
        cursor = self._data_start
        for _, offset, nbytes in sorted(self._slots.values(), key=lambda slot: slot[1]):
            start = self._data_start + offset
            if start > cursor:
                self._hasher.completed(cursor, start)
            cursor = max(cursor, start + nbytes)
        if self._size > cursor:
            self._hasher.completed(cursor, self._size)

    def position(self, name: str) -> int:
        """File offset of a tensor's blocks (values already in the stored type go out as they
        are, from memory aligned like the file when the caller allocates it so)."""
        return self._data_start + self._slots[name][1]

    def copy_stored(self, name: str, stored) -> bool:
        """Never takes stored NF4 parts (GGUF converts every tensor)."""
        return False

    def granule(self, name: str) -> int:
        """Whole rows when conversion keeps rows in place, else the whole tensor."""
        shape = self._shapes[name]
        whole = len(shape) < 2 or not row_local(self._arch, name, self._config)
        return math.prod(shape) if whole else shape[-1]

    def write(self, name: str, values: np.ndarray, start: int = 0) -> None:
        """Convert a tensor, or its rows from flat element `start` on, as llama.cpp expects it
        and write its blocks in place."""
        shape = self._shapes[name]
        cols = shape[-1] if shape else 1
        if start == 0 and values.size == math.prod(shape):
            rows = to_gguf_values(self._arch, name, values, self._config)
        else:
            rows = np.ascontiguousarray(values).reshape(-1, cols)
        self._store(name, rows, start // cols)

    def _store(self, name: str, values: np.ndarray, row: int = 0) -> None:
        qtype, offset, nbytes = self._slots[name]
        row_bytes = nbytes // max(1, math.prod(self._shapes[name][:-1]))
        at = self._data_start + offset + row * row_bytes
        filled = self._filled.get(name, 0)
        for piece in ggml.iter_quantize(values, qtype):  # no whole-tensor copy held
            with io_errors(self._path):
                self._file.write(memoryview(piece), at)
            self._hasher.written(at, memoryview(piece))
            at += piece.size
            filled += piece.size
        self._filled[name] = filled
        if filled == nbytes:
            self._written.add(name)

    def finish(self) -> None:
        """Check every tensor arrived, put the file's digest into its record, and close it
        (the atomic output fsyncs it)."""
        missing = set(self._slots) - self._written
        if missing:
            raise LoramergeError(f"GGUF output is missing {len(missing)} tensor(s)")
        with io_errors(self._path):
            self.digest = self._hasher.hexdigest()  # (it reads back what it was not handed)
            self._file.write(memoryview(self.digest.encode()), self._digest_at)
            self._file.flush()
        self.abort()

    def cancel(self) -> None:
        """Stop hashing, so no writer waits on it any more (before an abort)."""
        self._hasher.stop()

    def abort(self) -> None:
        """Stop hashing and close the file."""
        self._hasher.stop()
        self._file.close()


class GGUFFile(BlockSink):
    """The GGUF sink: `path` is the (temporary) file to fill."""

    def __init__(
        self,
        path: Path,
        entries: list[Entry],
        config: dict | None,
        info: GGUFInfo,
        cached: bool = False,
    ):
        if info.gguf_type is None:
            info = replace(info, gguf_type="f16")
        if info.gguf_type not in GGUF_TYPES:
            raise LoramergeError(
                f"unknown --gguf-type {info.gguf_type!r}; choose from {', '.join(GGUF_TYPES)}"
            )
        if config is None:
            raise LoramergeError("GGUF export needs the model's config.json")
        try:
            arch = architecture(config)
        except UnsupportedArchitecture as exc:
            raise LoramergeError(str(exc)) from None
        self._arch, self._config = arch, config
        ftype, pure = GGUF_TYPES[info.gguf_type]
        layers = config["num_hidden_layers"]
        names = TensorNames(arch, layers)
        kept: dict[str, tuple[str, tuple[int, ...]]] = {}
        for entry in entries:
            try:
                gname = names.gguf_name(entry.name)
            except KeyError as exc:
                raise LoramergeError(str(exc.args[0])) from None
            if gname is not None:
                kept[entry.name] = (gname, entry.shape)
        heads = config["num_attention_heads"]
        model = ModelInfo(arch.name, layers, heads, config.get("num_key_value_heads") or heads)
        types = tensor_types(kept.values(), ftype, model, pure)
        writer = gguf.GGUFWriter(None, arch.name)
        writer.add_name(info.name)
        write_hyperparameters(writer, arch.arch, config)
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, arch.arch, info.tokenizer, config["vocab_size"])
        self.description = {
            "format": "gguf",
            "gguf_type": info.gguf_type,
            "file_type": ftype.name,
            "architecture": arch.name,
            "tensor_types": dict(sorted(Counter(t.name for t in types.values()).items())),
            "quantized_tensors": sum(t != gguf.GGMLQuantizationType.F32 for t in types.values()),
        }
        record = {
            **info.record,
            "output": self.description,
            "file_hash": file_hash_entry(FILES_HASH),
        }
        writer.add_string(PROVENANCE_KEY, json.dumps(record, sort_keys=True))
        self._slots = {}
        extras = extra_tensors(arch.arch, config)
        layout = [(hf_name, gname, shape, types[gname]) for hf_name, (gname, shape) in kept.items()]
        layout += [
            (name, name, v.shape, gguf.GGMLQuantizationType.F32) for name, v in extras.items()
        ]
        offset = 0
        for name, gname, shape, qtype in layout:
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * ggml.row_bytes(qtype, shape[-1])
            writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            self._slots[name] = (qtype, offset, nbytes)
            offset += writer.ggml_pad(nbytes, writer.data_alignment)
        with io_errors(path):
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        (file,) = writer.fout
        self._data_start = writer.ggml_pad(file.tell(), writer.data_alignment)
        file.close()
        self._open(path, offset, cached)
        with open(path, "rb") as head:  # (the file is sized already: its header alone)
            self._header_written(head.read(self._data_start))
        self.order = list(kept)
        self._shapes = {name: shape for name, _, shape, _ in layout}
        for name, values in extras.items():
            self._store(name, values)

    def copyable(self, name: str) -> bool:
        """Every tensor is converted (layout, type), so none is copied as raw bytes."""
        return False

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Never called (nothing is copyable)."""
        raise AssertionError(f"GGUF output converts every tensor; {name} cannot be copied")
