"""Write safetensors files as a stream: the header first, then each tensor's bytes in order.

Shapes and dtypes are known from the plan, so the header (with every offset) is written before
any data and no shard is ever held in memory. Untouched tensors are copied file to file with
`copy_file_range` (the kernel moves the bytes; they never enter this process).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from loramerge import dtypes

_CHUNK = 64 << 20


@dataclass(frozen=True)
class Entry:
    """One tensor to be written: name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


def split_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy, order-preserving split into shards of at most `max_bytes` (a bigger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def aligned_order(entries: list[Entry]) -> list[Entry]:
    """Wider dtypes first, so each tensor starts at a multiple of its item size (no padding)."""
    return sorted(entries, key=lambda e: -dtypes.itemsize(e.dtype))


class SafetensorsWriter:
    """Writes one safetensors file; tensors must arrive in the order given."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
        self.path = Path(path)
        self._entries = list(entries)
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for entry in self._entries:
            header[entry.name] = {
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._pos = 0
        self._write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, data: memoryview) -> None:
        """Append the bytes of the next tensor."""
        view = memoryview(data).cast("B")
        self._expect(name, len(view))
        self._write(view)

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Append the next tensor by copying `nbytes` from another file, kernel side."""
        self._expect(name, nbytes)
        done = 0
        while done < nbytes:
            try:
                moved = os.copy_file_range(
                    src_fd, self._fd, min(nbytes - done, _CHUNK), src_offset + done, self._pos
                )
            except OSError:
                moved = 0  # cross-device or unsupported: fall back to read/write below
            if moved == 0:
                data = os.pread(src_fd, min(nbytes - done, _CHUNK), src_offset + done)
                if not data:
                    raise OSError(f"source ended early while copying {name}")
                self._write(data)
                moved = len(data)
            else:
                self._pos += moved
            done += moved

    def finish(self) -> None:
        """Check every tensor arrived, flush to disk, close."""
        if self._next != len(self._entries):
            missing = self._entries[self._next].name
            raise RuntimeError(f"{self.path}: tensor {missing} was never written")
        os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        """Close without checks (on abort)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _expect(self, name: str, nbytes: int) -> Entry:
        entry = self._entries[self._next]
        if entry.name != name or entry.nbytes != nbytes:
            raise RuntimeError(
                f"{self.path}: expected {entry.name} ({entry.nbytes} bytes), got {name} ({nbytes})"
            )
        self._next += 1
        return entry

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view[:_CHUNK], self._pos)
            self._pos += written
            view = view[written:]
