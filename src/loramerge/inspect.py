"""Describe what is on disk: a base checkpoint, an adapter, or a merged folder with provenance."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from loramerge import hub
from loramerge.adapter import load_adapter
from loramerge.errors import LoramergeError
from loramerge.jsonfile import read_json_object
from loramerge.sink.hf_folder import read_provenance
from loramerge.source.checkpoint import is_gguf, open_weights

_LISTED = 16  # array values longer than this are described by their length


def inspect_path(path: Path, *, allow_pickle: bool = False) -> dict:
    """A JSON-ready description of PATH (or Hub repo id); the kind decides which fields appear."""
    path = hub.resolve(path, allow_pickle=allow_pickle, headers_only=True)
    if not path.exists():
        raise LoramergeError(f"{path} does not exist")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _inspect_adapter(path, allow_pickle)
    if is_gguf(path):
        return _inspect_gguf(path)
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
        "path": hub.source_name(path),
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
        wrapped = [m for m in adapter.modules if m.kind == "parameter"]
        report = {
            "kind": "adapter",
            "path": hub.source_name(path),
            "peft_type": config["peft_type"],
            "base_model": config.get("base_model_name_or_path"),
            "rank": adapter.rank,
            "alpha": adapter.alpha,
            "scale": adapter.default_scale,
            "use_rslora": adapter.use_rslora,
            "use_dora": adapter.use_dora,
            "rank_pattern": config.get("rank_pattern") or {},
            "alpha_pattern": config.get("alpha_pattern") or {},
            "target_modules": config.get("target_modules"),
            "target_parameters": config.get("target_parameters") or [],
            "lora_modules": len(adapter.modules),
            "module_kinds": dict(Counter(m.kind for m in adapter.modules)),
            # a parameter wrapper's scale depends on which parameter it adapts: known at merge
            "scales": sorted({m.scale for m in adapter.modules if m.kind != "parameter"}),
            "wrapped_parameters": sorted(
                {f"{m.module} ({' or '.join(m.candidates)})" for m in wrapped}
            ),
            "modules_to_save": sorted(f.target for f in adapter.full),
            "trainable_token_rows": sorted(r.target for r in adapter.token_rows),
            "tensors": len(adapter.weights.tensors),
            "bytes": sum(i.nbytes for i in infos),
            "files": [p.name for p in adapter.weights.files],
        }
        provenance = read_provenance(path)  # written by loramerge combine or extract
        return {**report, "provenance": provenance} if provenance else report
    finally:
        adapter.close()


def _inspect_gguf(path: Path) -> dict:
    """A GGUF model or LoRA adapter: general.* and adapter.* keys, types, sizes, the record."""
    from loramerge.source.gguf_file import GGUFModel  # the gguf package, only for GGUF files

    with GGUFModel(path) as model:
        fields = model.header.fields
        tensors = list(model.tensors.values())
        provenance = model.provenance()
        kind = model.value("general.type")
        file_type = model.value("general.file_type")
    adapter = kind == "adapter"
    report = {
        "kind": "adapter" if adapter else ("merged" if provenance else "checkpoint"),
        "path": hub.source_name(path),
        "format": f"gguf v{model.header.version}",
        "architecture": model.architecture,
        "general": {k: _shown(f.value) for k, f in fields.items() if k.startswith("general.")},
        "file_type": _file_type(file_type),
        "tensors": len(tensors),
        "tensor_types": dict(sorted(Counter(t.qtype.name for t in tensors).items())),
        "parameters": sum(math.prod(t.shape) for t in tensors),
        "bytes": sum(t.nbytes for t in tensors),
        "file_bytes": path.stat().st_size,
        "metadata_keys": len(fields),
    }
    if "tokenizer.ggml.model" in fields:
        tokens = fields.get("tokenizer.ggml.tokens")
        report["tokenizer"] = {
            "model": fields["tokenizer.ggml.model"].value,
            "tokens": len(tokens.value) if tokens else 0,
        }
    if adapter:
        report["adapter"] = {
            k: _shown(f.value) for k, f in fields.items() if k.startswith("adapter.")
        }
    report["tensor_list"] = [
        {"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes}
        for t in tensors
    ]
    if provenance:
        report["provenance"] = provenance
    return report


def _shown(value: object) -> object:
    """A metadata value as inspect shows it: long arrays by their length."""
    if isinstance(value, list) and len(value) > _LISTED:
        return f"[{len(value)} values]"
    return value


def _file_type(value: object) -> str | None:
    """general.file_type by its llama.cpp name (MOSTLY_Q4_K_M, ...)."""
    if not isinstance(value, int):
        return None
    import gguf

    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return str(value)


def _json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}
