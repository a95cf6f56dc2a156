"""`push`: publish an output folder (checked against its own record first) or one file to the Hub,
with its model card completed for the repo it goes to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loramerge import hub
from loramerge.card import render_adapter_card, render_card, render_gguf_card
from loramerge.errors import LoramergeError
from loramerge.hashing import hasher, recorded_hash
from loramerge.sink.hf_folder import PROVENANCE, provenance_bytes, read_provenance, recorded_files
from loramerge.verify.files import gguf_file_check, verify_files


@dataclass
class PushResult:
    """What a push sent (or, for a dry run, would send)."""

    repo_id: str
    files: list[hub.Upload]
    card: str
    notes: list[str]
    dry_run: bool
    url: str | None = None

    def summary(self) -> dict:
        """The JSON object `--json` prints."""
        return {
            "command": "push",
            "repo_id": self.repo_id,
            "dry_run": self.dry_run,
            "files": {f.path_in_repo: f.size for f in self.files},
            "bytes": sum(f.size for f in self.files),
            "notes": self.notes,
            "url": self.url,
        }


def push(
    path: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Upload PATH to REPO_ID in one commit, creating the repo (and branch) when needed."""
    path = Path(path)
    if hub.parse_ref(repo_id) is None or "@" in repo_id:
        raise LoramergeError(f"{repo_id!r} is not a repo id like org/name")
    if path.is_dir():
        files, card, notes = _folder_files(path, repo_id)
    elif path.is_file():
        files, card, notes = _single_file(path, repo_id)
    else:
        raise LoramergeError(f"{path} does not exist")
    result = PushResult(repo_id, files, card, notes, dry_run)
    if not dry_run:
        message = message or f"Upload {path.name} with loramerge"
        result.url = hub.upload(repo_id, files, private=private, revision=revision, message=message)
    return result


def _folder_files(folder: Path, repo_id: str) -> tuple[list[hub.Upload], str, list[str]]:
    """Every file the record lists plus the record, after re-hashing them all against it."""
    record = read_provenance(folder)
    if record is None:
        raise LoramergeError(
            f"{folder} has no {PROVENANCE}: push publishes loramerge outputs, checked against "
            "their record"
        )
    check = verify_files(folder)
    if not check["passed"] or check["extra"]:
        raise LoramergeError(f"{folder} does not match its record, not pushed: {check['summary']}")
    if record.get("kind") == "adapter":
        card = render_adapter_card(record, repo_id)
    else:
        card = render_card(record, repo_id, for_hub=True)
    _check_card(card)
    files = [hub.Upload(name, folder / name) for name in recorded_files(folder)]
    notes = [f"{folder}: {check['summary']}"]
    card_bytes = card.encode()
    if (folder / "README.md").read_bytes() != card_bytes:
        # The card names the repo; the uploaded record hashes the uploaded card.
        files = [f for f in files if f.path_in_repo != "README.md"]
        files.append(hub.Upload("README.md", card_bytes))
        digest = hasher(recorded_hash(record))
        digest.update(card_bytes)
        record = {**record, "files": {**record["files"], "README.md": digest.hexdigest()}}
        notes.append(f"README.md completed for {repo_id} (usage names the repo)")
        files.append(hub.Upload(PROVENANCE, provenance_bytes(record)))
    else:
        files.append(hub.Upload(PROVENANCE, folder / PROVENANCE))
    return sorted(files, key=lambda f: f.path_in_repo), card, notes


def _single_file(path: Path, repo_id: str) -> tuple[list[hub.Upload], str, list[str]]:
    """One file (a GGUF model, typically), with a card saying how to run it."""
    files = [hub.Upload(path.name, path)]
    if not path.name.endswith(".gguf"):
        return files, "", [f"{path.name}: a single file, pushed without a card"]
    check = gguf_file_check(path)
    if check is None:
        notes = [f"{path.name}: its record holds no file digest, so it was not checked"]
    else:
        if not check["passed"]:
            raise LoramergeError(
                f"{path} does not match its record, not pushed: {check['summary']}"
            )
        notes = [check["summary"]]
    card = render_gguf_card(path.name, repo_id)
    _check_card(card)
    return [*files, hub.Upload("README.md", card.encode())], card, notes


def _check_card(card: str) -> None:
    """The card must parse as a Hub model card with valid metadata."""
    from huggingface_hub import ModelCard

    try:
        ModelCard(card, ignore_metadata_errors=False)
    except Exception as exc:  # noqa: BLE001 - ModelCard raises several types
        raise LoramergeError(f"the model card does not parse as a Hub card: {exc}") from None
