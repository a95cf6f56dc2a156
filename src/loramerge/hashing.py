"""sha256 of files, streamed in large chunks (hashlib releases the GIL, so threads overlap)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path


def sha256_of(paths: list[Path]) -> str:
    """One sha256 over the files' bytes, in order (one file: that file's usual sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(16 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_started(paths: list[Path]) -> Callable[[], str]:
    """`sha256_of(paths)` begun on a thread now; call the result for the digest (it waits)."""
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["digest"] = sha256_of(paths)
        except BaseException as exc:  # handed to the caller, raised where the digest is asked for
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="loramerge-adapter-sha256", daemon=True)
    thread.start()

    def digest() -> str:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["digest"]

    return digest
