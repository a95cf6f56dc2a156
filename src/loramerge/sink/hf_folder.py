"""Everything in a merged folder besides the weights: config, tokenizer files, card, provenance."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from loramerge.card import render_card
from loramerge.hashing import FILES_HASH, digest_of, sha256_of
from loramerge.jsonfile import read_json_object

PROVENANCE = "loramerge.json"
# loramerge's own data besides the record lives in this subfolder, out of the top-level
# `*.safetensors` that loaders take for the model's weights.
SIDE_FOLDER = "loramerge"
# DoRA norms ||W0 + s*dW|| per merged DoRA term: small vectors an unmerge needs to invert DoRA.
NORMS_FILE = f"{SIDE_FOLDER}/dora_norms.safetensors"
# Where loramerge 0.1 stored them (beside the weights); still read by unmerge and rebase.
LEGACY_NORMS_FILE = "loramerge_dora_norms.safetensors"


def write_config(folder: Path, config: dict, updates: dict) -> None:
    """config.json with the merge's changes (dtype, vocab_size, tie_word_embeddings)."""
    merged = updated_config(config, updates)
    (folder / "config.json").write_text(json.dumps(merged, indent=2) + "\n")


def updated_config(config: dict, updates: dict) -> dict:
    """The config with the merge's changes; an update that is a dict changes keys of a nested
    config (`text_config`), not all of it."""
    merged = {**config}
    for key, value in updates.items():
        nested = isinstance(value, dict) and isinstance(config.get(key), dict)
        merged[key] = {**config[key], **value} if nested else value
    return merged


def copy_files(folder: Path, files: list[Path]) -> None:
    """Copy side files (tokenizer, generation config, chat template) unchanged."""
    for path in files:
        shutil.copyfile(path, folder / path.name)


def write_provenance(folder: Path, record: dict) -> None:
    """The machine-readable record of what is inside this checkpoint."""
    (folder / PROVENANCE).write_bytes(provenance_bytes(record))


def provenance_bytes(record: dict) -> bytes:
    """The record as its file holds it."""
    return (json.dumps(record, indent=2) + "\n").encode()


def write_model_card(folder: Path, record: dict) -> None:
    """README.md rendered from the provenance record (the Hub card; pushing names the repo)."""
    (folder / "README.md").write_text(render_card(record, "."))


def write_norms(folder: Path, norms: dict[str, np.ndarray]) -> dict:
    """Store DoRA norms in the side folder; returns the record's entry for them."""
    path = Path(folder) / NORMS_FILE
    path.parent.mkdir(exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(norms.items())}, path)
    return {
        "file": NORMS_FILE,
        "sha256": sha256_of([path]),
        "vectors": len(norms),
    }


def recorded_files(folder: Path) -> list[str]:
    """Files the record hashes, relative: the top level's (but the record) and the side folder's."""
    folder = Path(folder)
    side = folder / SIDE_FOLDER
    paths = [*folder.iterdir(), *(side.rglob("*") if side.is_dir() else [])]
    names = (p.relative_to(folder).as_posix() for p in paths if p.is_file())
    return sorted(n for n in names if n != PROVENANCE)


def record_files(folder: Path, record: dict, known: dict[str, str]) -> None:
    """Put in the record the hash of every file it covers (`known` ones not redone), by
    relative path, and the hash's name."""
    names = [n for n in recorded_files(folder) if n not in known]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # hashers release the GIL
        digests = pool.map(lambda n: digest_of([Path(folder) / n], FILES_HASH), names)
    record["files_hash"] = FILES_HASH
    record["files"] = dict(sorted({**known, **dict(zip(names, digests, strict=True))}.items()))


def read_provenance(folder: Path) -> dict | None:
    """The provenance record of a merged folder, or None when it has none."""
    path = Path(folder) / PROVENANCE
    if not path.is_file():
        return None
    return read_json_object(path)
