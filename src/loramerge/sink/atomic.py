"""Outputs that appear whole or not at all: build in a temporary sibling, then rename into place.

A folder (`AtomicFolder`) or a single file (`AtomicFile`, e.g. a .gguf) alike.

While a run builds `OUT` it holds an exclusive lock on `.OUT.loramerge-lock` (released by the
kernel even when the process is killed), so a second run writing the same OUT fails at once
instead of interleaving. A temporary left by a killed run is recognised by the next one (its pid
no longer holds the lock) and removed; an old OUT that a killed `--overwrite` had moved aside
is put back first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from loramerge.errors import LoramergeError

TEMP_MARK = ".loramerge-tmp-"
_OLD_MARK = "old-"


class AtomicFolder:
    """A folder built under a temporary sibling name and renamed to `final` by `commit()`."""

    is_folder = True

    def __init__(self, final: Path, *, overwrite: bool) -> None:
        self.final = Path(final).absolute()
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LoramergeError(f"cannot create output folder {parent}: {exc.strerror}") from exc
        self._lock_path = parent / f".{self.final.name}.loramerge-lock"
        self._lock = _acquire(self._lock_path, self.final)
        try:
            self.recovered = _clean_stale(self.final)
            check_replaceable(self.final, overwrite, self.is_folder)
            self.path = parent / f".{self.final.name}{TEMP_MARK}{os.getpid()}"
            self._create()
        except OSError as exc:
            self._release()
            raise LoramergeError(
                f"cannot create {parent / self.final.name}: {exc.strerror}"
            ) from exc
        except BaseException:
            self._release()
            raise

    def commit(self) -> None:
        """fsync the folder, move it into place (replacing an old one), fsync the parent."""
        self._flush()
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}{TEMP_MARK}{_OLD_MARK}{os.getpid()}"
            os.rename(self.final, old)
        os.rename(self.path, self.final)
        _fsync_dir(self.final.parent)
        if old is not None:
            _remove(old)
        self._release()

    def abort(self) -> None:
        """Remove the temporary output and everything in it."""
        _remove(self.path)
        self._release()

    def _create(self) -> None:
        self.path.mkdir()

    def _flush(self) -> None:
        for file in self.path.rglob("*"):  # subfolders too (fsync works on a folder)
            fsync_file(file)
        _fsync_dir(self.path)

    def __enter__(self) -> AtomicFolder:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is not None:
            self.abort()

    def _release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(FileNotFoundError):  # the next run makes a new one
                os.unlink(self._lock_path)
            os.close(self._lock)
            self._lock = None


class AtomicFile(AtomicFolder):
    """One file built under a temporary sibling name (`path`, created empty) and renamed to
    `final` by `commit()`."""

    is_folder = False

    def _create(self) -> None:
        self.path = self.path.with_name(self.path.name + self.final.suffix)  # still a .gguf
        self.path.touch(exist_ok=False)

    def _flush(self) -> None:
        fsync_file(self.path)


def check_replaceable(final: Path, overwrite: bool, folder: bool) -> None:
    """Refuse an output that exists, unless --overwrite and it is of the kind to be written."""
    if final.exists() and not overwrite:
        raise LoramergeError(f"{final} already exists; pass --overwrite to replace it")
    if final.exists() and final.is_dir() != folder:
        raise LoramergeError(f"{final} exists and is not {'a folder' if folder else 'a file'}")


def _remove(path: Path) -> None:
    """Remove a temporary folder or file, whatever is left of it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _acquire(lock_path: Path, final: Path) -> int:
    """Hold the exclusive lock for writing `final`, or fail if another run holds it."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LoramergeError(f"cannot write into {final.parent}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LoramergeError(
                f"another loramerge run is writing {final} right now; wait for it or pick "
                "another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file the previous holder unlinked after we opened it
            return fd
        os.close(fd)


def _clean_stale(final: Path) -> list[str]:
    """Remove temporaries of killed runs (we hold the lock, so none is live); restore an OUT a
    killed --overwrite had moved aside. Returns what was done, for the report."""
    done = []
    prefix = f".{final.name}{TEMP_MARK}"
    for stale in sorted(final.parent.glob(f"{prefix}*")):
        if stale.name.startswith(prefix + _OLD_MARK) and not final.exists():
            os.rename(stale, final)
            done.append(f"restored {final} that an interrupted --overwrite had moved aside")
        else:
            _remove(stale)
            done.append(f"removed {stale.name}, left by an interrupted run")
    return done


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
