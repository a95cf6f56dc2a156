"""Positional writes that bypass the page cache where they can (`O_DIRECT`), buffered elsewhere.

A merge writes each byte once and never reads it back, so copying it into the page cache only
costs a memory copy per byte, and fresh page-cache memory is slow to fault in (very slow on
VMs whose hosts reclaim freed memory). Direct writes need the file offset, the length and the
memory address aligned to the device's block size, and here cover whole filesystem blocks;
tensors start anywhere, so each range is split into an aligned middle, written directly (from
the caller's memory when its address is aligned the same way, else through a staging buffer),
and unaligned ends written through the cache, at the end of the pass (`PositionalFile`). The
two never share a filesystem block, so the file stays coherent. Filesystems without `O_DIRECT`
(tmpfs, some network filesystems) and any direct write the kernel refuses fall back to buffered.
What a command reads back at once (`Cached`: the whole file, or the tensors copied unchanged
that a check after the pass reads, when the rest is checked inside it) is written buffered:
reading it from the page cache costs less than the copy into it saves.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np

from loramerge.errors import LoramergeError

# Memory and minimum offset alignment of direct writes: 4 KiB covers every common disk.
ALIGN = 4096
# Larger filesystem blocks are honoured up to this size; a direct write must cover whole blocks,
# or the filesystem zeroes the rest of a new block under bytes written through the cache.
_MAX_BLOCK = 1 << 20
_CHUNK = 64 << 20  # bytes per write call
_STAGING = 16 << 20  # bytes per staged direct write
_HELD = 64 << 20  # bytes a file holds for its page-cache writes at the end (`flush`)
_local = threading.local()


# What of a file the command reads back at once: nothing; all of it; or the named tensors of
# those copied unchanged (the rest is checked inside the pass). What is read back is written
# through the page cache.
Cached = Literal["none", "all"] | frozenset[str]


class PositionalFile:
    """A file open for positional writes, direct where possible; thread-safe.

    Beside direct writes, the pieces written through the page cache (the unaligned ends of a
    range, ranges shorter than a block) are held in memory until `flush` (`fsync` flushes): on
    ext4 each buffered write takes the file's lock, which waits for every direct write in
    flight, and a 22-layer merge's 518 ends took 2.8 s of its workers' time (1.2 s with
    `--verify`) that way. Bytes held are not in the file yet: a writer that reads its file back
    before the end (`hold=False`) writes them at once; `close` without `flush` drops them (an
    abort).
    """

    def __init__(
        self,
        path: Path,
        size: int,
        *,
        existing: bool = False,
        cached: bool = False,
        hold: bool = True,
    ):
        """`cached`: write through the page cache, for a file that is read back at once;
        `hold`: keep buffered pieces for `flush` while direct writes run."""
        create = 0 if existing else os.O_CREAT | os.O_EXCL  # existing: a header is written
        self.fd = os.open(path, os.O_WRONLY | create, 0o644)
        self._direct = -1  # stays open until close(), even once direct writes are given up
        self._use_direct = False
        self._block = ALIGN
        self._lock = threading.Lock()
        self._hold = hold
        self._held: list[tuple[int, bytes]] = []  # (position, bytes) for `flush`
        self._held_bytes = 0
        try:
            os.ftruncate(self.fd, size)  # direct writes then land inside the file, in any order
            self._direct = -1 if cached else _open_direct(path)
            self._block = _block_size(self.fd)
            whole = self._block <= _MAX_BLOCK and self._block & (self._block - 1) == 0
            self._use_direct = self._direct >= 0 and whole
        except BaseException:
            self.close()
            raise

    @property
    def direct(self) -> bool:
        """Whether aligned ranges bypass the page cache."""
        return self._use_direct

    def write(self, view: memoryview, position: int) -> None:
        """Write all of `view` at `position`."""
        end = position + len(view)
        first = -(-position // self._block) * self._block
        last = end // self._block * self._block
        if not self._use_direct:
            self._buffered(view, position)
            return
        if last <= first:
            self._held_or_buffered(view, position)
            return
        self._held_or_buffered(view[: first - position], position)
        self._direct_write(view[first - position : last - position], first)
        self._held_or_buffered(view[last - position :], last)

    def flush(self) -> None:
        """Write the pieces held for the page cache."""
        with self._lock:
            held, self._held, self._held_bytes = self._held, [], 0
        for position, data in held:
            self._buffered(memoryview(data), position)

    def fsync(self) -> None:
        """Write what is held, then flush file data and metadata to the device."""
        self.flush()
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the descriptors (what is held and not flushed is dropped)."""
        self._held, self._held_bytes = [], 0
        for fd in (self._direct, self.fd):
            if fd >= 0:
                os.close(fd)
        self._direct = self.fd = -1

    def _held_or_buffered(self, view: memoryview, position: int) -> None:
        """Hold a piece for `flush` (up to _HELD bytes), else write it through the cache now."""
        if not view:
            return
        if self._hold:
            with self._lock:
                if self._held_bytes + len(view) <= _HELD:
                    self._held.append((position, bytes(view)))
                    self._held_bytes += len(view)
                    return
        self._buffered(view, position)

    def _buffered(self, view: memoryview, position: int) -> None:
        if not view:
            return
        # One buffered write at a time: ext4 serialises them on the inode lock anyway, and a
        # thread waiting here sleeps where one waiting there spins.
        with self._lock:
            _pwrite_all(self.fd, view, position)
        start_writeback(self.fd, position, len(view))

    def _direct_write(self, view: memoryview, position: int) -> None:
        try:
            if _address(view) % ALIGN == 0:
                _pwrite_all(self._direct, view, position)
            else:
                staging = aligned_buffer("staging", _STAGING)
                for done in range(0, len(view), _STAGING):
                    piece = view[done : done + _STAGING]
                    staging[: len(piece)] = piece
                    _pwrite_all(self._direct, staging[: len(piece)], position + done)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._use_direct = False  # alignment this device will not take: buffered from now on
            self._buffered(view, position)


def _open_direct(path: Path) -> int:
    """A second descriptor with O_DIRECT, or -1 where the platform or filesystem has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return -1
        raise


def _block_size(fd: int) -> int:
    """The unit a direct write must cover whole: the filesystem block, at least ALIGN."""
    return max(ALIGN, os.fstat(fd).st_blksize)


def _address(view: memoryview) -> int:
    """Memory address of a contiguous buffer (read-only ones too)."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def aligned_buffer(purpose: str, size: int) -> memoryview:
    """This thread's page-aligned buffer for `purpose`, of at least `size` bytes (reused)."""
    buffer = getattr(_local, purpose, None)
    if buffer is None or len(buffer) < size:
        buffer = memoryview(mmap.mmap(-1, size))
        setattr(_local, purpose, buffer)
    return buffer


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
    """Start writing a cached range to disk now, without waiting: the final fsync has less left.

    Only a head start (durability still comes from fsync), so a failure here is ignored.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def copy_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
    """Copy bytes between files with `copy_file_range` (they never enter this process), by
    pread and pwrite where the kernel will not; then start their writeback."""
    done = 0
    while done < nbytes:
        size = min(nbytes - done, _CHUNK)
        try:
            moved = os.copy_file_range(src_fd, dst_fd, size, src_offset + done, dst_offset + done)
        except OSError:
            moved = 0  # cross-device or unsupported: fall back to read + write
        if moved == 0:
            data = os.pread(src_fd, size, src_offset + done)
            if not data:
                raise OSError(errno.EIO, "source file ended early")
            _pwrite_all(dst_fd, memoryview(data), dst_offset + done)
            moved = len(data)
        done += moved
    start_writeback(dst_fd, dst_offset, nbytes)


def _pwrite_all(fd: int, view: memoryview, position: int) -> None:
    while view:
        written = os.pwrite(fd, view[:_CHUNK], position)
        position += written
        view = view[written:]


@contextmanager
def io_errors(path: Path) -> Iterator[None]:
    """A full disk, a size limit, an I/O error or a read-only target while writing `path`: one
    clear error naming it."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)  # (numpy's short writes carry no strerror)
        raise LoramergeError(f"cannot write {path}: {reason}") from exc
