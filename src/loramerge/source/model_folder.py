"""Where a checkpoint's config.json, tokenizer and generation files are."""

from __future__ import annotations

from pathlib import Path

from loramerge.jsonfile import read_json_object


def model_folder(path: Path) -> tuple[Path | None, str | None]:
    """The folder holding the model's side files, or None with the reason there is none.

    A folder is its own. A single weights file borrows its folder's files when that folder
    describes exactly this file's model: a config.json and no index naming other shards.
    """
    path = Path(path)
    if path.is_dir():
        return path, None
    folder = path.parent
    if not (folder / "config.json").is_file():
        return None, f"no config.json beside {path.name}"
    for index in folder.glob("*.index.json"):
        weight_map = read_json_object(index).get("weight_map")
        if isinstance(weight_map, dict) and set(weight_map.values()) != {path.name}:
            return None, f"{path.name} is one shard of the model {index.name} describes"
    return folder, None


def read_config(path: Path) -> dict | None:
    """config.json of a checkpoint (folder or single file), or None when it has none.

    A GGUF file's config is what its metadata says (architecture, layers, heads, vocabulary).
    """
    if Path(path).suffix == ".gguf" and Path(path).is_file():
        from loramerge.source.gguf_file import GGUFWeights

        weights = GGUFWeights(path)
        weights.close()
        return weights.config
    folder, _ = model_folder(path)
    config = folder / "config.json" if folder else None
    return read_json_object(config) if config and config.is_file() else None
