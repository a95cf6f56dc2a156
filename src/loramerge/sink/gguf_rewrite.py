"""GGUF output from a GGUF base: the base's file again, with the merged tensors replaced.

Every key/value pair of the base is copied byte for byte (the record under
`loramerge.provenance` is replaced, and `general.file_type` when `--gguf-type` changes it), the
tensors keep their names, order and shapes, and each keeps its own type unless `--gguf-type`
asks for llama.cpp's choice for another file type. A tensor whose type is kept and that no
adapter touches is copied as its raw blocks; any other is converted back to the GGUF layout
(`gguf_names`) and quantized (`quant.ggml`) at its own offset.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from loramerge.errors import LoramergeError
from loramerge.gguf_format import (
    Header,
    TensorRecord,
    align,
    encode_field,
    encode_preamble,
    encode_tensor_info,
    file_hash_entry,
    tensor_nbytes,
)
from loramerge.gguf_names import architecture
from loramerge.hashing import FILES_HASH
from loramerge.quant.ggml_types import GGUF_TYPES, ModelInfo, tensor_types
from loramerge.sink.direct_io import copy_range, io_errors
from loramerge.sink.gguf_file import PROVENANCE_KEY, BlockSink
from loramerge.sink.safetensors_writer import Entry

FILE_TYPE_KEY = "general.file_type"


@dataclass(frozen=True)
class GGUFBase:
    """The GGUF file a merge starts from: its parsed header and each HF name's GGUF name."""

    header: Header
    gguf_names: dict[str, str]


_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


class GGUFRewrite(BlockSink):
    """The sink for a GGUF base: `path` is the (temporary) file to fill."""

    def __init__(
        self,
        path: Path,
        entries: list[Entry],
        config: dict,
        base: GGUFBase,
        gguf_type: str | None,
        record: dict,
        cached: bool = False,
    ) -> None:
        header = base.header
        self._arch, self._config = architecture(config), config
        by_gguf = {gname: hf for hf, gname in base.gguf_names.items()}
        added = [e.name for e in entries if e.name not in base.gguf_names]
        if added:
            raise LoramergeError(
                f"a merge into a GGUF base cannot add tensors it lacks ({', '.join(added[:3])})"
            )
        types = {name: t.qtype for name, t in header.tensors.items()}
        file_type = None
        if gguf_type is not None:
            ftype, pure = GGUF_TYPES[gguf_type]
            file_type = int(ftype)
            heads = config["num_attention_heads"]
            model = ModelInfo(
                self._arch.name,
                config["num_hidden_layers"],
                heads,
                config.get("num_key_value_heads") or heads,
            )
            mapped = [(n, t.shape) for n, t in header.tensors.items() if by_gguf.get(n, n) != n]
            types.update(tensor_types(mapped, ftype, model, pure))
        self._places: dict[str, tuple[TensorRecord, bool]] = {}  # HF name -> (output, kept)
        records, offset = [], 0
        for gname, source in header.tensors.items():
            qtype = types[gname]
            nbytes = tensor_nbytes(qtype, source.shape)
            records.append(TensorRecord(gname, qtype, source.shape, offset, nbytes))
            self._places[by_gguf[gname]] = (records[-1], qtype == source.qtype)
            offset = align(offset + nbytes, header.alignment)
        self.description = {
            "format": "gguf",
            "gguf_type": gguf_type or "as the base",
            "architecture": self._arch.name,
            "tensor_types": dict(sorted(Counter(t.name for t in types.values()).items())),
            "quantized_tensors": sum(t != GGMLQuantizationType.F32 for t in types.values()),
            "retyped_tensors": sum(not kept for _, kept in self._places.values()),
            # quantized blocks quantized again: two quantizations' errors (llama.cpp's quantize
            # asks for --allow-requantize)
            "requantized_tensors": sum(
                types[n] != t.qtype and t.qtype not in _FLOAT_TYPES
                for n, t in header.tensors.items()
            ),
        }
        if file_type is not None:
            self.description["file_type"] = gguf.LlamaFileType(file_type).name
        record = {**record, "output": self.description, "file_hash": file_hash_entry(FILES_HASH)}
        text = json.dumps(record, sort_keys=True)
        fields = []
        for key, field in header.fields.items():
            if key == PROVENANCE_KEY:
                continue
            if key == FILE_TYPE_KEY and file_type is not None:
                fields.append(encode_field(key, GGUFValueType.UINT32, file_type))
            else:
                fields.append(field.raw)
        if file_type is not None and FILE_TYPE_KEY not in header.fields:
            fields.append(encode_field(FILE_TYPE_KEY, GGUFValueType.UINT32, file_type))
        fields.append(encode_field(PROVENANCE_KEY, GGUFValueType.STRING, text))
        head = b"".join(
            [
                encode_preamble(header.version, len(records), len(fields)),
                *fields,
                *(encode_tensor_info(r) for r in records),
            ]
        )
        self._data_start = align(len(head), header.alignment)
        self._slots = {name: (r.qtype, r.offset, r.nbytes) for name, (r, _) in self._places.items()}
        self._shapes = {e.name: e.shape for e in entries}
        self._open(path, offset, cached)
        with io_errors(path):
            self._file.write(memoryview(head), 0)
            self._file.flush()  # in the file now: the hasher reads it back
        self._header_written(head)
        self.order = [by_gguf[n] for n in header.tensors]

    def copyable(self, name: str) -> bool:
        """A tensor whose type is kept is copied as its raw blocks when untouched."""
        return self._places[name][1]

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """The base's blocks, byte for byte."""
        record, _ = self._places[name]
        if nbytes != record.nbytes:
            raise LoramergeError(f"{name}: {nbytes} bytes to copy, {record.nbytes} expected")
        try:
            copy_range(src_fd, self._file.fd, src_offset, self._data_start + record.offset, nbytes)
        except OSError as exc:
            raise LoramergeError(f"{name}: copying from the base failed: {exc}") from None
        start = self._data_start + record.offset
        self._hasher.completed(start, start + nbytes)  # hashed from the file
        self._written.add(name)
