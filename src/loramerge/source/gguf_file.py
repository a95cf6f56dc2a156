"""A GGUF file as a source: its metadata, tensor infos, raw blocks, and dequantized tensors.

The header is parsed by `gguf_format` (checked against the file's size) from its first bytes,
read with `pread` (more when the vocabulary is long); tensor data is read with `pread` too, so a
2 GB file costs one tensor's memory at a time and nothing stays mapped.

`GGUFModel` speaks GGUF names and layout; `GGUFWeights` is the same file as a checkpoint in the
Hugging Face names and layout (q/k rows un-permuted, Gemma norms minus one), through the same name
map the GGUF sink writes with: BF16 tensors as bfloat16 (their bits, as a safetensors checkpoint
reads), every other type dequantized to float32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from loramerge import dtypes
from loramerge.errors import LoramergeError
from loramerge.gguf_format import GGUFFormatError, Header, NeedMore, TensorRecord, parse_header
from loramerge.gguf_names import (
    TensorNames,
    UnsupportedArchitecture,
    from_gguf_values,
    hf_architecture,
    qk_heads,
    row_local,
)
from loramerge.quant import ggml
from loramerge.source.safetensors_file import TensorInfo, copy_into, read_exact

PROVENANCE_KEY = "loramerge.provenance"
_CHUNK_ELEMENTS = 1 << 20  # elements dequantized at a time
_FIRST_READ = 4 << 20  # bytes of the header read at first (a 150k-token vocabulary is ~5 MB)


class GGUFModel:
    """One open GGUF file: header parsed and checked, tensors read one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise LoramergeError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            self.header = _read_header(self.path, self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self.tensors: dict[str, TensorRecord] = self.header.tensors

    @property
    def fd(self) -> int:
        """The open file descriptor (for raw byte copies)."""
        return self._fd

    def value(self, key: str, default: object = None) -> object:
        """A metadata value by key, or `default`."""
        field = self.header.fields.get(key)
        return default if field is None else field.value

    @property
    def architecture(self) -> str | None:
        """`general.architecture`."""
        arch = self.value("general.architecture")
        return arch if isinstance(arch, str) else None

    def provenance(self) -> dict | None:
        """The loramerge record stored in the file, or None."""
        text = self.value(PROVENANCE_KEY)
        if not isinstance(text, str):
            return None
        try:
            record = json.loads(text)
        except ValueError:
            raise LoramergeError(f"{self.path}: {PROVENANCE_KEY} is not JSON") from None
        return record if isinstance(record, dict) else None

    def offset(self, name: str) -> int:
        """Absolute file offset of a tensor's blocks."""
        return self.header.data_start + self.tensors[name].offset

    def read_blocks(self, name: str) -> np.ndarray:
        """A tensor's stored bytes, shaped (*rows, bytes per row)."""
        record = self.tensors[name]
        raw = np.empty(record.nbytes, dtype=np.uint8)
        read_exact(self._fd, memoryview(raw), self.offset(name), self.path)
        rows = record.shape[:-1]
        return raw.reshape(*rows, record.nbytes // max(1, int(np.prod(rows, dtype=np.int64))))

    def close(self) -> None:
        """Release the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_header(path: Path, fd: int) -> Header:
    """The parsed header, read in growing pieces from the start of the file."""
    size = os.fstat(fd).st_size
    if size == 0:
        raise LoramergeError(f"{path}: empty file, not GGUF")
    want = min(size, _FIRST_READ)
    while True:
        head = os.pread(fd, want, 0)
        try:
            return parse_header(head, size)
        except NeedMore:
            want = min(size, 4 * want)
        except GGUFFormatError as exc:
            raise LoramergeError(f"{path}: {exc}") from None


class GGUFWeights:
    """A GGUF model file read as a checkpoint: Hugging Face names and layout, BF16 tensors as
    bfloat16 and the rest as float32.

    Tensors the name map does not know keep their GGUF names (and are only ever copied).
    """

    def __init__(self, path: Path) -> None:
        self.model = model = GGUFModel(path)
        self.path = model.path
        try:
            self.config = _config(model)
            _, self.arch = hf_architecture(model.architecture or "")
        except (UnsupportedArchitecture, LoramergeError) as exc:
            model.close()
            raise LoramergeError(f"{self.path}: {exc}") from None
        names = TensorNames(self.arch, self.config["num_hidden_layers"])
        heads = self.arch.permute_qk
        self.gguf_names: dict[str, str] = {}  # HF name -> GGUF name
        self.tensors: dict[str, TensorInfo] = {}
        for gname, record in model.tensors.items():
            hf = names.hf_name(gname) or gname
            if hf in self.tensors:
                model.close()
                raise LoramergeError(f"{self.path}: two tensors read back as {hf}")
            rotary = qk_heads(hf, self.config) if heads else None
            if rotary and record.shape[0] % (2 * rotary):
                model.close()
                raise LoramergeError(
                    f"{self.path}: {gname} has {record.shape[0]} rows, not whole rotary pairs of "
                    f"{rotary} heads"
                )
            self.gguf_names[hf] = gname
            dtype = "BF16" if self._native(hf, record) else "F32"
            nbytes = int(np.prod(record.shape, dtype=np.int64)) * (2 if dtype == "BF16" else 4)
            self.tensors[hf] = TensorInfo(hf, self.path, dtype, record.shape, 0, nbytes)

    def _native(self, hf_name: str, record: TensorRecord) -> bool:
        """Whether a tensor reads as its stored bfloat16 bits: BF16 but for a Gemma norm (its
        stored w + 1, minus one, is not a bfloat16 in general)."""
        norm = self.arch.norm_offset and hf_name.endswith("norm.weight")
        return record.qtype == GGMLQuantizationType.BF16 and not norm

    @property
    def fd(self) -> int:
        """The open file descriptor."""
        return self.model.fd

    def read(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """One tensor in the HF layout, in its dtype (into a view of `into`, if given).

        Rows are read and dequantized a bounded chunk at a time, straight into the result.
        """
        record = self._record(name)
        dtype = dtypes.to_numpy(self.tensors[name].dtype)
        nbytes = int(np.prod(record.shape, dtype=np.int64)) * dtype.itemsize
        buffer = np.empty(nbytes, np.uint8) if into is None else into[:nbytes]
        out = buffer.view(dtype).reshape(-1, record.shape[-1])
        self._rows(name, 0, out)
        values = out.reshape(record.shape)
        converted = from_gguf_values(self.arch, name, values, self.config)
        if converted is not values:
            values[...] = converted
        return values

    def read_part(self, name: str, start: int, stop: int, into: np.ndarray) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor in the HF layout (in `into`): only those
        rows read where the layout keeps rows in place, else the whole tensor."""
        shape = self._record(name).shape
        cols = shape[-1]
        if start % cols or stop % cols or not row_local(self.arch, name, self.config):
            if start == 0 and stop == int(np.prod(shape, dtype=np.int64)):
                return self.read(name, into).reshape(-1)  # the whole tensor: no second copy
            return copy_into(self.read(name).reshape(-1)[start:stop], into)
        dtype = dtypes.to_numpy(self.tensors[name].dtype)
        out = into[: (stop - start) * dtype.itemsize].view(dtype).reshape(-1, cols)
        self._rows(name, start // cols, out)
        return out.reshape(-1)

    def _record(self, name: str):
        record = self.model.tensors[self.gguf_names[name]]
        if record.qtype not in ggml.SUPPORTED:
            raise LoramergeError(
                f"{self.path}: {self.gguf_names[name]} is {record.qtype.name}, not readable here"
            )
        return record

    def _rows(self, name: str, first: int, out: np.ndarray) -> None:
        """Stored rows first .. first + len(out) into `out`: as they are for a native tensor,
        else dequantized a chunk at a time."""
        model, gname = self.model, self.gguf_names[name]
        record = model.tensors[gname]
        rows = int(np.prod(record.shape[:-1], dtype=np.int64))
        row_bytes = record.nbytes // max(1, rows)
        start = model.offset(gname) + first * row_bytes
        if out.dtype != np.float32:
            read_exact(model.fd, memoryview(out.reshape(-1).view(np.uint8)), start, self.path)
            return
        step = max(1, _CHUNK_ELEMENTS // record.shape[-1])
        for r0 in range(0, out.shape[0], step):
            r1 = min(out.shape[0], r0 + step)
            raw = np.empty((r1 - r0) * row_bytes, np.uint8)
            read_exact(model.fd, memoryview(raw), start + r0 * row_bytes, self.path)
            ggml.dequantize(raw.reshape(r1 - r0, row_bytes), record.qtype, out=out[r0:r1])

    def raw(self, name: str) -> tuple[int, int]:
        """(offset, nbytes) of a tensor's stored blocks."""
        gname = self.gguf_names[name]
        return self.model.offset(gname), self.model.tensors[gname].nbytes

    def close(self) -> None:
        """Close the file."""
        self.model.close()


def _config(model: GGUFModel) -> dict:
    """The config.json facts the plan and the GGUF conversion need, from the metadata."""
    arch = model.architecture
    if arch is None:
        raise LoramergeError("GGUF metadata has no general.architecture")
    hf_class, _ = hf_architecture(arch)

    def number(key: str, default: object = LoramergeError) -> int:
        value = model.value(f"{arch}.{key}", default)
        if value is LoramergeError or not isinstance(value, int) or value <= 0:
            raise LoramergeError(f"GGUF metadata has no usable {arch}.{key} ({value!r})")
        return value

    heads = number("attention.head_count")
    layers = number("block_count")
    if layers > len(model.tensors):  # every block holds tensors; gguf's name map loops over them
        raise LoramergeError(
            f"{arch}.block_count {layers} exceeds the {len(model.tensors)} tensors"
        )
    embedding = model.tensors.get("token_embd.weight")
    config = {
        "architectures": [hf_class],
        # the class read back for each GGUF architecture is the one whose model_type is its name
        "model_type": arch,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": number("attention.head_count_kv", heads),
        "hidden_size": number("embedding_length"),
        "tie_word_embeddings": "output.weight" not in model.tensors,
    }
    if embedding is not None:
        config["vocab_size"] = embedding.shape[0]
    return config
