"""Describe what is on disk: a base checkpoint, an adapter, or a merged folder with provenance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from loramerge.adapter import load_adapter
from loramerge.errors import LoramergeError
from loramerge.jsonfile import read_json_object
from loramerge.sink.hf_folder import read_provenance
from loramerge.source.checkpoint import open_weights


def inspect_path(path: Path, *, allow_pickle: bool = False) -> dict:
    """A JSON-ready description of PATH; the kind decides which fields appear."""
    path = Path(path)
    if not path.exists():
        raise LoramergeError(f"{path} does not exist")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _inspect_adapter(path, allow_pickle)
    return _inspect_checkpoint(path, allow_pickle)


def _inspect_checkpoint(path: Path, allow_pickle: bool) -> dict:
    with open_weights(path, stem="model", allow_pickle=allow_pickle) as checkpoint:
        infos = list(checkpoint.tensors.values())
        files = [str(p.name) for p in checkpoint.files]
        quantization = getattr(checkpoint, "description", None)
    config = _json(path / "config.json") if path.is_dir() else {}
    provenance = read_provenance(path) if path.is_dir() else None
    counts = Counter(i.dtype for i in infos)
    report = {
        "kind": "merged" if provenance else "checkpoint",
        "path": str(path),
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "dtype": counts.most_common(1)[0][0] if counts else None,
        "dtypes": dict(counts),
        "tensors": len(infos),
        "parameters": sum(i.numel for i in infos),
        "bytes": sum(i.nbytes for i in infos),
        "files": files,
    }
    if quantization:  # NF4: tensors described as they read, dequantized
        report["quantization"] = {**quantization, **(config.get("quantization_config") or {})}
    if provenance:
        report["provenance"] = provenance
    return report


def _inspect_adapter(path: Path, allow_pickle: bool) -> dict:
    adapter = load_adapter(path, allow_pickle=allow_pickle)
    try:
        config = adapter.config
        infos = adapter.weights.tensors.values()
        return {
            "kind": "adapter",
            "path": str(path),
            "peft_type": config.get("peft_type", "LORA"),
            "base_model": config.get("base_model_name_or_path"),
            "rank": adapter.rank,
            "alpha": adapter.alpha,
            "scale": adapter.default_scale,
            "use_rslora": adapter.use_rslora,
            "use_dora": adapter.use_dora,
            "rank_pattern": config.get("rank_pattern") or {},
            "alpha_pattern": config.get("alpha_pattern") or {},
            "target_modules": config.get("target_modules"),
            "lora_modules": len(adapter.modules),
            "module_kinds": dict(Counter(m.kind for m in adapter.modules)),
            "scales": sorted({m.scale for m in adapter.modules}),
            "modules_to_save": sorted(f.target for f in adapter.full),
            "trainable_token_rows": sorted(r.target for r in adapter.token_rows),
            "tensors": len(adapter.weights.tensors),
            "bytes": sum(i.nbytes for i in infos),
            "files": [p.name for p in adapter.weights.files],
        }
    finally:
        adapter.close()


def _json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}
