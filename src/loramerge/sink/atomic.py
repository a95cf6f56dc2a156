"""Outputs that appear whole or not at all: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loramerge.errors import LoramergeError

TEMP_MARK = ".loramerge-tmp-"


class AtomicFolder:
    """A folder built under a temporary sibling name and renamed to `final` by `commit()`."""

    def __init__(self, final: Path, *, overwrite: bool) -> None:
        self.final = Path(final).absolute()
        if self.final.exists() and not overwrite:
            raise LoramergeError(f"{self.final} already exists; pass --overwrite to replace it")
        if self.final.exists() and not self.final.is_dir():
            raise LoramergeError(f"{self.final} exists and is not a folder")
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LoramergeError(f"cannot create output folder {parent}: {exc.strerror}") from exc
        self.path = parent / f".{self.final.name}{TEMP_MARK}{os.getpid()}"
        if self.path.exists():
            shutil.rmtree(self.path)
        try:
            self.path.mkdir()
        except OSError as exc:
            raise LoramergeError(f"cannot create {self.path}: {exc.strerror}") from exc

    def commit(self) -> None:
        """fsync the folder, move it into place (replacing an old one), fsync the parent."""
        _fsync_dir(self.path)
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}{TEMP_MARK}old-{os.getpid()}"
            os.rename(self.final, old)
        os.rename(self.path, self.final)
        _fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the temporary folder and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> AtomicFolder:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


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
