"""Write safetensors files whose header comes first: every offset is known before any data.

Shapes and dtypes come from the plan, so the header is written at once and each tensor then goes
to its own byte range with positional writes, in any order and from several threads; no shard is
ever held in memory. Untouched tensors are copied file to file with `copy_file_range` (the kernel
moves the bytes; they never enter this process).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loramerge import dtypes
from loramerge.errors import LoramergeError

_CHUNK = 64 << 20
_HASH_CHUNK = 4 << 20  # small reads stay in cache and keep the hasher's memory low


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
    """One safetensors file: header written on creation, tensors written by name, any order."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for entry in entries:
            header[entry.name] = {
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
        start = 8 + len(raw)
        self._ranges = {
            name: (
                start + spec["data_offsets"][0],
                spec["data_offsets"][1] - spec["data_offsets"][0],
            )
            for name, spec in header.items()
            if name != "__metadata__"
        }
        self._pending = set(self._ranges)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._fd = -1
        self._hasher: _PrefixHasher | None = None
        self.sha256 = ""
        with self._io_errors():
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            _pwrite_all(self._fd, memoryview(len(raw).to_bytes(8, "little") + raw), 0)
            self._hasher = _PrefixHasher(self.path, start + offset)
        self._hasher.completed(0, start)

    def write(self, name: str, data) -> None:
        """Write the bytes of tensor `name` to its place."""
        view = memoryview(data).cast("B")
        position = self._claim(name, len(view))
        # One write at a time per file: ext4 serialises them on the inode lock anyway, and a
        # thread waiting here sleeps where one waiting there spins.
        with self._io_errors(), self._write_lock:
            _pwrite_all(self._fd, view, position)
        start_writeback(self._fd, position, len(view))
        self._hasher.completed(position, position + len(view))

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Write tensor `name` by copying `nbytes` from another file, kernel side."""
        position = self._claim(name, nbytes)
        with self._io_errors():
            self._copy(src_fd, src_offset, nbytes, position)
        start_writeback(self._fd, position, nbytes)
        self._hasher.completed(position, position + nbytes)

    def _copy(self, src_fd: int, src_offset: int, nbytes: int, position: int) -> None:
        done = 0
        while done < nbytes:
            size = min(nbytes - done, _CHUNK)
            try:
                moved = os.copy_file_range(
                    src_fd, self._fd, size, src_offset + done, position + done
                )
            except OSError:
                moved = 0  # cross-device or unsupported: fall back to read + write
            if moved == 0:
                data = os.pread(src_fd, size, src_offset + done)
                if not data:
                    raise OSError(errno.EIO, "source file ended early")
                _pwrite_all(self._fd, memoryview(data), position + done)
                moved = len(data)
            done += moved

    def finish(self) -> None:
        """Check every tensor was written, flush to disk, close."""
        if self._pending:
            raise RuntimeError(f"{self.path}: never written: {sorted(self._pending)[:5]}")
        with self._io_errors():
            os.fsync(self._fd)
            self.sha256 = self._hasher.hexdigest()
        self.close()

    def close(self) -> None:
        """Close without checks (on abort)."""
        if self._hasher is not None:
            self._hasher.stop()
            self._hasher = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @contextmanager
    def _io_errors(self) -> Iterator[None]:
        """A full disk, a size limit, an I/O error or a read-only target: one clear error."""
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise LoramergeError(f"cannot write {self.path}: {reason}") from exc

    def _claim(self, name: str, nbytes: int) -> int:
        """Mark `name` written once, check its size, and return its file offset."""
        with self._lock:
            position, expected = self._ranges[name]
            if name not in self._pending or nbytes != expected:
                raise RuntimeError(f"{self.path}: {name} written twice or with {nbytes} bytes")
            self._pending.remove(name)
        return position


class _PrefixHasher:
    """sha256 of a file written out of order, computed while it is written.

    A background thread hashes each byte range as soon as everything before it is in the file,
    reading it back from the page cache; tensors are written roughly in file order, so the hash
    keeps up with the merge instead of costing a second pass at the end.
    """

    def __init__(self, path: Path, total: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._total = total
        self._next = 0
        self._done: dict[int, int] = {}  # start -> end of written ranges not yet hashed
        self._digest = hashlib.sha256()
        self._buffer = memoryview(bytearray(_HASH_CHUNK))  # reused: no fresh pages per chunk
        self._error: OSError | None = None
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="loramerge-sha256", daemon=True)
        self._thread.start()

    def completed(self, start: int, end: int) -> None:
        """Bytes [start, end) are in the file."""
        with self._cond:
            self._done[start] = end
            self._cond.notify()

    def hexdigest(self) -> str:
        """Wait for the whole file to be hashed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._next != self._total:
            raise RuntimeError("hashing stopped before the end of the file")
        return self._digest.hexdigest()

    def stop(self) -> None:
        """Stop early (abort) and release the file."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _run(self) -> None:
        while self._next < self._total:
            with self._cond:
                while self._next not in self._done and not self._stopped:
                    self._cond.wait()
                if self._next not in self._done:
                    return
                end = self._done.pop(self._next)
                while end in self._done:
                    end = self._done.pop(end)
            try:
                for offset in range(self._next, end, _HASH_CHUNK):
                    chunk = self._buffer[: min(_HASH_CHUNK, end - offset)]
                    if os.preadv(self._fd, [chunk], offset) != len(chunk):
                        raise OSError(errno.EIO, "file shorter than what was written")
                    self._digest.update(chunk)
            except OSError as exc:
                self._error = exc
                return
            self._next = end


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range from libc, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a range to disk now, without waiting: the final fsync then has little left.

    Only a head start (durability still comes from fsync), so a failure here is ignored.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _pwrite_all(fd: int, view: memoryview, position: int) -> None:
    while view:
        written = os.pwrite(fd, view[:_CHUNK], position)
        position += written
        view = view[written:]
