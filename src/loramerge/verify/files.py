"""The integrity check: re-hash every file a merged folder's record lists."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loramerge.errors import LoramergeError
from loramerge.hashing import digest_of, recorded_hash
from loramerge.sink.hf_folder import read_provenance, recorded_files


def verify_files(folder: Path) -> dict:
    """Compare each file's hash with the record's: changed, missing and unlisted files."""
    folder = Path(folder)
    record = read_provenance(folder) if folder.is_dir() else None
    listed = (record or {}).get("files")
    if not listed:
        raise LoramergeError(f"{folder} has no record of file hashes to check against")
    algorithm = recorded_hash(record)
    present = set(recorded_files(folder))
    to_hash = sorted(set(listed) & present)
    with ThreadPoolExecutor(4) as pool:
        digests = pool.map(lambda n: digest_of([folder / n], algorithm), to_hash)
        actual = dict(zip(to_hash, digests, strict=True))
    changed = [name for name in to_hash if actual[name] != listed[name]]
    missing = sorted(set(listed) - present)
    extra = sorted(present - set(listed))
    passed = not changed and not missing
    summary = (
        f"{len(to_hash) - len(changed)}/{len(listed)} files match their recorded {algorithm}"
        + (f"; changed: {', '.join(changed)}" if changed else "")
        + (f"; missing: {', '.join(missing)}" if missing else "")
        + (f"; not in the record: {', '.join(extra)}" if extra else "")
    )
    return {
        "passed": passed,
        "summary": summary,
        "changed": changed,
        "missing": missing,
        "extra": extra,
        "checked": len(to_hash),
    }
