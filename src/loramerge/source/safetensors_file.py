"""Read one safetensors file: a validated header, then tensors by explicit-offset reads.

The header is checked against the file the way the reference Rust reader checks it (known
dtypes, byte lengths that agree with shapes, offsets that tile the data region exactly), so a
truncated or hostile file is refused before any tensor is read. Tensors are read with
`os.preadv` into fresh buffers rather than memory-mapped, so pages we are done with do not stay
in the process's resident set.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramerge import dtypes
from loramerge.errors import LoramergeError
from loramerge.jsonfile import parse_json

# Same cap as the reference implementation: no real header comes near it.
MAX_HEADER_BYTES = 100_000_000
# Linux moves at most this many bytes per read or write call.
_MAX_IO = 0x7FFFF000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


class SafetensorsFile:
    """One open safetensors file with a validated header; close() releases the descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise LoramergeError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            self.metadata, self.tensors = _parse_header(self.path, self._fd)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def fd(self) -> int:
        """The open file descriptor (for raw byte copies)."""
        return self._fd

    def read(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """Read one tensor into CPU memory: a new array, or a view of `into` (uint8, 1-D)."""
        info = self.tensors[name]
        raw = np.empty(info.nbytes, dtype=np.uint8) if into is None else into[: info.nbytes]
        if info.nbytes:
            read_exact(self._fd, memoryview(raw), info.offset, self.path)
        return raw.view(dtypes.to_numpy(info.dtype)).reshape(info.shape)

    def read_part(self, name: str, start: int, stop: int, into: np.ndarray) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor, read into a view of `into` (uint8)."""
        info = self.tensors[name]
        dtype = dtypes.to_numpy(info.dtype)
        raw = into[: (stop - start) * dtype.itemsize]
        if raw.size:
            read_exact(self._fd, memoryview(raw), info.offset + start * dtype.itemsize, self.path)
        return raw.view(dtype)

    def close(self) -> None:
        """Release the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_into(values: np.ndarray, into: np.ndarray) -> np.ndarray:
    """`values` copied into a view of the uint8 buffer `into`, shaped like them: what a read of
    a tensor held in memory returns, so callers may work in place as on a file read."""
    view = into[: values.nbytes].view(values.dtype).reshape(values.shape)
    np.copyto(view, values)
    return view


def read_exact(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill `buffer` from `fd` at `offset`, or fail naming `path`."""
    done = 0
    while done < len(buffer):
        chunk = buffer[done : done + _MAX_IO]
        got = os.preadv(fd, [chunk], offset + done)
        if got == 0:
            raise LoramergeError(f"{path}: file ended early (was it truncated while reading?)")
        done += got


def _parse_header(path: Path, fd: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Parse and validate the header; return (metadata, tensors by name)."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise LoramergeError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
    (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if header_len > MAX_HEADER_BYTES:
        raise LoramergeError(f"{path}: header claims {header_len} bytes, more than any real one")
    if 8 + header_len > size:
        raise LoramergeError(
            f"{path}: header length {header_len} runs past the end of the file ({size} bytes)"
        )
    raw = os.pread(fd, header_len, 8)
    header = parse_json(raw, f"{path}: header")
    if not isinstance(header, dict):
        raise LoramergeError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise LoramergeError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors = {name: _tensor_info(path, name, entry, data_start) for name, entry in header.items()}
    _check_tiling(path, tensors.values(), data_start, data_len)
    return metadata, tensors


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """Validate one header entry on its own."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise LoramergeError(f"{where}: entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not dtypes.is_known(dtype):
        raise LoramergeError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape) or len(shape) > 16:
        raise LoramergeError(f"{where}: bad shape {shape!r}")
    if math.prod(d for d in shape if d) * dtypes.itemsize(dtype) >= 2**62:  # even when empty
        raise LoramergeError(f"{where}: shape {shape} is too large for any array")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise LoramergeError(f"{where}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin:
        raise LoramergeError(f"{where}: data_offsets end {end} before begin {begin}")
    expected = math.prod(shape) * dtypes.itemsize(dtype)
    if expected != end - begin:
        raise LoramergeError(
            f"{where}: shape {shape} of {dtype} needs {expected} bytes, offsets give {end - begin}"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, end - begin)


def _check_tiling(path: Path, infos, data_start: int, data_len: int) -> None:
    """Offsets must tile the data region exactly: no overlap, no gap, nothing past the end."""
    cursor = 0
    for info in sorted(infos, key=lambda i: (i.offset, i.nbytes)):
        begin = info.offset - data_start
        if begin < cursor:
            raise LoramergeError(f"{path}: tensor {info.name!r} overlaps the tensor before it")
        if begin > cursor:
            raise LoramergeError(f"{path}: gap of {begin - cursor} bytes before {info.name!r}")
        if begin + info.nbytes > data_len:
            raise LoramergeError(
                f"{path}: tensor {info.name!r} ends at byte {begin + info.nbytes} but the data "
                f"region has {data_len} bytes (file truncated?)"
            )
        cursor = begin + info.nbytes
    if cursor != data_len:
        raise LoramergeError(f"{path}: {data_len - cursor} stray bytes after the last tensor")


def _is_uint(value: object) -> bool:
    """A non-negative integer that fits the 63 bits torch and the format use for sizes."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62
