"""JSON from files we did not write: every way parsing can fail becomes one clear error."""

from __future__ import annotations

import json
from pathlib import Path

from loramerge.errors import LoramergeError


def parse_json(raw: bytes | str, where: object) -> object:
    """Parse JSON text; nesting too deep or integers too long are bad input, not crashes."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise LoramergeError(f"{where}: not valid JSON ({reason})") from None


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold one object."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise LoramergeError(f"cannot read {path}: {exc.strerror}") from None
    data = parse_json(raw, path)
    if not isinstance(data, dict):
        raise LoramergeError(f"{path}: not a JSON object")
    return data
