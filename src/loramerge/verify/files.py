"""The integrity check: re-hash every file a merged folder's record lists."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loramerge.errors import LoramergeError
from loramerge.hashing import digest_masked, digest_of, recorded_hash
from loramerge.sink.hf_folder import read_provenance, recorded_files
from loramerge.source.checkpoint import is_gguf


def verify_files(folder: Path) -> dict:
    """Compare each file's hash with the record's: changed, missing and unlisted files (a
    GGUF file: its own digest, which its record holds)."""
    folder = Path(folder)
    if folder.is_file() and is_gguf(folder):
        return _verify_gguf(folder)
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


def _verify_gguf(path: Path) -> dict:
    """A GGUF file against the digest its record holds."""
    check = gguf_file_check(path)
    if check is None:
        raise LoramergeError(f"{path} has no record of its file hash to check against")
    return check


def gguf_file_check(path: Path) -> dict | None:
    """A GGUF file against the digest its record holds (`gguf_format.file_hash_entry`): the
    digest of the file with the digest's own characters read as the placeholder; None when the
    record holds none (a file loramerge did not write, or wrote before it kept one)."""
    from loramerge.gguf_format import digest_offset  # the gguf package, only now
    from loramerge.source.gguf_file import GGUFModel

    with GGUFModel(path) as model:
        record, data_start = model.provenance(), model.header.data_start
    entry = (record or {}).get("file_hash")
    if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
        return None
    algorithm, digest = recorded_hash({"files_hash": entry.get("algorithm")}), entry["digest"]
    with open(path, "rb") as fh:
        at = digest_offset(fh.read(data_start), algorithm, digest)
    passed = at is not None and digest_masked(path, algorithm, at, len(digest)) == digest
    state = "matches" if passed else "does not match"
    return {
        "passed": passed,
        "summary": f"{path.name} {state} the {algorithm} digest its record holds",
        "changed": [] if passed else [path.name],
        "missing": [],
        "extra": [],
        "checked": 1,
    }
