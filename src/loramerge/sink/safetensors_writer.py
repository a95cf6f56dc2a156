"""Write safetensors files whose header comes first: every offset is known before any data.

Shapes and dtypes come from the plan, so the header is written at once and each tensor then goes
to its own byte range with positional writes, in any order and from several threads; no shard is
ever held in memory. Writes bypass the page cache where the filesystem allows (`direct_io`);
untouched tensors then pass through a small buffer, and otherwise are copied file to file with
`copy_file_range`. Each file's hash (`hashing.FILES_HASH`) is computed while it is written.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from loramerge import dtypes
from loramerge.errors import LoramergeError
from loramerge.hashing import FILES_HASH, hasher
from loramerge.sink.direct_io import (
    ALIGN,
    Cached,
    PositionalFile,
    aligned_buffer,
    copy_range,
    io_errors,
)

_COPY_CHUNK = 16 << 20  # untouched tensors pass through memory in pieces this size
_HASH_CHUNK = 4 << 20  # small reads stay in cache and keep the hasher's memory low
_SPARES = 4  # buffers kept for copies of bytes written ahead of a gap
_HOLD_BYTES = 64 << 20  # at most this much is copied ahead of a gap; later writers wait


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

    def __init__(
        self,
        path: Path,
        entries: list[Entry],
        metadata: dict[str, str],
        hash_from_file: bool = False,
        cached: Cached = "none",
    ) -> None:
        """`hash_from_file`: hash bytes by reading them back once everything before them is
        in, instead of from memory (for writers whose file order is far from their write order,
        where copies held ahead of a gap would grow to the file's size); `cached`: what of the
        file is read back at once (`direct_io.Cached`), written through the page cache: all of
        it (`direct_io.PositionalFile`), or the named tensors among those copied unchanged (in
        the kernel)."""
        self.path = Path(path)
        self._hash_from_file = hash_from_file
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
        self._parts: dict[str, list[tuple[int, int]]] = {}  # byte ranges of a tensor written
        self._filled: dict[str, int] = {}  # bytes of a tensor written so far
        self._lock = threading.Lock()
        self._file: PositionalFile | None = None
        self._hasher: PrefixHasher | None = None
        self.digest = ""  # the file's FILES_HASH, once finished
        head = memoryview(len(raw).to_bytes(8, "little") + raw)
        with io_errors(self.path):
            # a file hashed by reading it back needs every byte in it as it goes
            self._file = PositionalFile(
                self.path, start + offset, cached=cached == "all", hold=not hash_from_file
            )
            self._file.write(head, 0)
            self._hasher = PrefixHasher(self.path, start + offset)
        self._hasher.completed(0, start, head)
        # copies go through memory on a direct file, but those read back from the page cache
        self._copy_in_memory = self._file.direct and cached != "all"
        self._read_back = cached if isinstance(cached, frozenset) else frozenset()

    def position(self, name: str) -> int:
        """File offset where tensor `name`'s bytes go."""
        return self._ranges[name][0]

    def write(self, name: str, data, start: int = 0) -> None:
        """Write bytes of tensor `name` (all, or its bytes from `start` on) to their place; the
        caller may then reuse `data`. The pieces of one tensor may come in any order."""
        view = memoryview(data).cast("B")
        position = self._claim(name, len(view), start)
        with io_errors(self.path):
            self._file.write(view, position)
        self._hashed(position, view)

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int, start: int = 0) -> None:
        """Write tensor `name` (or its bytes from `start` on) by copying `nbytes` from another
        file."""
        position = self._claim(name, nbytes, start)
        with io_errors(self.path):
            if self._copy_in_memory and name not in self._read_back:
                self._copy_through_memory(src_fd, src_offset, nbytes, position)
                return
            self._copy_in_kernel(src_fd, src_offset, nbytes, position)
        self._hasher.completed(position, position + nbytes)  # hashed from the file

    def _copy_through_memory(self, src_fd: int, src_offset: int, nbytes: int, position: int):
        """Read into memory and write directly: cheaper than filling the page cache."""
        buffer = aligned_buffer("copy", _COPY_CHUNK)
        done = 0
        while done < nbytes:
            at = position + done
            phase = at % ALIGN  # memory and file offsets agree modulo ALIGN: no staging copy
            size = min(nbytes - done, _COPY_CHUNK - phase)
            view = buffer[phase : phase + size]
            _read_exact(src_fd, view, src_offset + done)
            self._file.write(view, at)
            self._hashed(at, view)
            done += size

    def _copy_in_kernel(self, src_fd: int, src_offset: int, nbytes: int, position: int):
        """`copy_file_range`: the bytes never enter this process."""
        copy_range(src_fd, self._file.fd, src_offset, position, nbytes)

    def _hashed(self, position: int, view: memoryview) -> None:
        """Hand bytes just written to the hasher; once this returns, `view` may be reused."""
        if self._hash_from_file:
            self._hasher.completed(position, position + len(view))
        else:
            self._hasher.written(position, view)

    def finish(self) -> None:
        """Check every tensor was written, flush to disk, close."""
        if self._pending:
            raise RuntimeError(f"{self.path}: never written: {sorted(self._pending)[:5]}")
        with io_errors(self.path):
            self._file.fsync()
            self.digest = self._hasher.hexdigest()
        self.close()

    def cancel(self) -> None:
        """Stop hashing, so no thread waits on it any more (before an abort)."""
        if self._hasher is not None:
            self._hasher.stop()

    def close(self) -> None:
        """Close without checks (on abort)."""
        if self._hasher is not None:
            self._hasher.stop()
            self._hasher = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _claim(self, name: str, nbytes: int, start: int = 0) -> int:
        """Mark bytes [start, start + nbytes) of `name` written (each byte once, the pieces in
        any order) and return their file offset; the tensor is done when every byte is in."""
        with self._lock:
            position, expected = self._ranges[name]
            parts = self._parts.setdefault(name, [])
            end = start + nbytes
            if name not in self._pending or any(s < end and start < e for s, e in parts):
                raise RuntimeError(f"{self.path}: {name} written twice")
            if end > expected or (nbytes == 0 and expected):
                raise RuntimeError(f"{self.path}: {name} written with {end} bytes")
            parts.append((start, end))
            self._filled[name] = self._filled.get(name, 0) + nbytes
            if self._filled[name] == expected:
                self._pending.remove(name)
                del self._parts[name], self._filled[name]
        return position + start


class PrefixHasher:
    """The hash of a file written out of order, computed while it is written.

    Each byte range is hashed as soon as everything before it is in the file: from the writer's
    memory when it is handed over (the writer waits until it is hashed before reusing it), else
    read back from the page cache. Tensors are written roughly in file order, so the hash keeps
    up with the merge instead of costing a second pass at the end. One range is hashed at a
    time, in order, by a background thread or by a writer that would otherwise wait for it: a
    writer already on a core hashes at once, where a thread woken for it queues for one.
    """

    def __init__(self, path: Path, total: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._total = total
        self._next = 0  # everything before is hashed
        self._frontier = 0  # everything before is in the file
        self._busy = False  # a thread is hashing the range at _next
        # start -> (end, bytes or None to read them back, private copy's buffer or None)
        self._done: dict[int, tuple[int, memoryview | None, bytearray | None]] = {}
        self._spares: list[bytearray] = []  # buffers of hashed private copies, for reuse
        self._held = 0  # bytes in private copies not yet hashed
        self._digest = hasher(FILES_HASH)
        self._buffer = memoryview(bytearray(_HASH_CHUNK))  # reused: no fresh pages per chunk
        self._error: OSError | None = None
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="loramerge-hash", daemon=True)
        self._thread.start()

    def completed(self, start: int, end: int, data: memoryview | None = None) -> bool:
        """Bytes [start, end) are in the file (and in `data`, if given).

        Returns whether the caller must `wait_past(end)` before reusing `data`: only when every
        earlier byte is already in, so the wait needs nothing more from anyone. Bytes that arrive
        ahead of a gap are copied instead (a writer going out of order must not wait for itself).
        """
        if end == start:  # an empty tensor: nothing to hash
            return False
        with self._cond:  # (the frontier only grows: a stale answer just copies needlessly)
            wait = data is not None and start == self._frontier
            if data is not None and not wait and self._held + end - start > _HOLD_BYTES:
                # enough is held already: wait until the bytes before these are in (their
                # writers started earlier and never wait on later bytes), then hash in place
                while self._frontier < start and not self._stopped and self._error is None:
                    self._cond.wait()
                if self._frontier < start:
                    raise LoramergeError("writing was cancelled")
                wait = True
        owned = None
        if data is not None and not wait:
            owned, data = self._copy(data)
        with self._cond:
            self._done[start] = (end, data, owned)
            while self._frontier in self._done:
                self._frontier = self._done[self._frontier][0]
            self._cond.notify_all()
        return wait

    def _copy(self, data: memoryview) -> tuple[bytearray, memoryview]:
        """(buffer, view) of a private copy of `data`, in a spare buffer when one is big enough."""
        with self._cond:
            buffer = next((b for b in self._spares if len(b) >= len(data)), None)
            if buffer is not None:
                self._spares.remove(buffer)
            self._held += len(data)
        buffer = buffer if buffer is not None else bytearray(len(data))
        view = memoryview(buffer)[: len(data)]
        view[:] = data
        return buffer, view

    def written(self, start: int, view: memoryview) -> None:
        """Bytes just written at `start`, handed over from memory: returns once `view` may be
        reused (hashed, or copied to be hashed once the bytes before it are in)."""
        if self.completed(start, start + len(view), view):
            self.wait_past(start + len(view))

    def wait_past(self, end: int) -> None:
        """Block until everything before `end` is hashed, hashing what is due meanwhile."""
        if not self._help(end):
            raise LoramergeError("writing was cancelled")

    def hexdigest(self) -> str:
        """Wait for the whole file to be hashed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._next != self._total:
            raise RuntimeError("hashing stopped before the end of the file")
        return self._digest.hexdigest()

    def stop(self) -> None:
        """Stop early (abort), wake every waiter, and release the file."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            while self._busy:  # a writer still hashing reads the file
                self._cond.wait()
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _run(self) -> None:
        self._help(self._total)

    def _help(self, end: int) -> bool:
        """Hash the ranges due, in order, until everything before `end` is hashed (True) or
        hashing stops (False): whenever the range at the front is in and nobody hashes it,
        this thread does."""
        while True:
            with self._cond:
                while not (
                    self._next >= end
                    or self._stopped
                    or self._error is not None
                    or (not self._busy and self._next in self._done)
                ):
                    self._cond.wait()
                if self._next >= end:
                    return True
                if self._stopped or self._error is not None:
                    return False
                self._busy = True
                start = self._next
                stop, data, owned = self._done.pop(start)
            try:
                if data is not None:
                    self._digest.update(data)
                else:
                    self._hash_from_file(start, stop)
            except OSError as exc:
                with self._cond:
                    self._error, self._busy = exc, False
                    self._cond.notify_all()
                return False
            with self._cond:
                self._next, self._busy = stop, False
                if owned is not None:
                    self._held -= len(data)
                    if len(self._spares) < _SPARES:
                        self._spares.append(owned)  # memory stays flat: copies reuse buffers
                self._cond.notify_all()

    def _hash_from_file(self, start: int, end: int) -> None:
        for offset in range(start, end, _HASH_CHUNK):
            chunk = self._buffer[: min(_HASH_CHUNK, end - offset)]
            if os.preadv(self._fd, [chunk], offset) != len(chunk):
                raise OSError(errno.EIO, "file shorter than what was written")
            self._digest.update(chunk)


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise OSError(errno.EIO, "source file ended early")
        view, offset = view[got:], offset + got
