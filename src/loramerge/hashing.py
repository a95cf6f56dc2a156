"""sha256 of files, streamed in large chunks (hashlib releases the GIL, so threads overlap)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(paths: list[Path]) -> str:
    """One sha256 over the files' bytes, in order (one file: that file's usual sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(16 << 20):
                digest.update(chunk)
    return digest.hexdigest()
