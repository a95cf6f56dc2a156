"""`combine`: several LoRA adapters with weights -> one adapter whose delta is their weighted sum.

Exact by rank concatenation: per module, A stacked, each B scaled by w_i * s_i, scale 1. With a
rank limit, each module's stacked factors are compressed by a truncated SVD of their product,
found from QR of each factor (never the full matrix); the error is reported per module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loramerge.adapter import Adapter, LoraModule, load_adapter
from loramerge.adapter_build import Factors, adapter_record, lora_config, tensors_of
from loramerge.errors import LoramergeError
from loramerge.lowrank import truncate_factors
from loramerge.merge import _check_output_is_not_input
from loramerge.plan import check_weights
from loramerge.sink.atomic import AtomicFolder
from loramerge.sink.peft_adapter import write_adapter


@dataclass
class CombineResult:
    """What combine wrote: the output and, per module, rank and error."""

    output: Path
    modules: dict[str, dict]
    inputs: list[dict]
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The JSON object `--json` prints."""
        errors = [m["relative_error"] for m in self.modules.values()]
        return {
            "command": "combine",
            "output": str(self.output),
            "inputs": self.inputs,
            "lora_modules": len(self.modules),
            "ranks": sorted({m["rank"] for m in self.modules.values()}),
            "max_relative_error": max(errors, default=0.0),
            "seconds": round(self.seconds, 3),
            "modules": self.modules,
        }


def combine(
    adapters: list[Path],
    output: Path,
    weights: list[float] | None = None,
    *,
    rank: int | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> CombineResult:
    """Write one adapter equal to sum_i w_i * adapter_i (exactly, or compressed to `rank`)."""
    start = time.perf_counter()
    adapters = [Path(a) for a in adapters]
    weights = list(weights) if weights else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise LoramergeError(f"got {len(weights)} weights for {len(adapters)} adapters")
    check_weights(weights)
    if rank is not None and rank <= 0:
        raise LoramergeError(f"--rank must be a positive integer, got {rank}")
    _check_output_is_not_input(Path(output), adapters)
    opened: list[Adapter] = []
    try:
        for path in adapters:
            opened.append(load_adapter(path, allow_pickle=allow_pickle))
        fan_in_fan_out = _check_combinable(opened)
        inputs = [_describe(a, w) for a, w in zip(opened, weights, strict=True)]
        modules, report = [], {}
        for name, terms in _modules(opened).items():
            factors, entry = _combine_module(name, terms, opened, weights, rank)
            modules.append(factors)
            report[name] = entry
        tensors = tensors_of(modules) | _base_copies(opened)
        config = lora_config(
            modules,
            base_model=_common_base(opened),
            fan_in_fan_out=fan_in_fan_out,
            lora_bias=any(f.bias is not None for f in modules),
        )
        record = adapter_record("combine", config["base_model_name_or_path"], inputs, report)
        record["history"][-1]["weights"] = weights
        if rank is not None:
            record["history"][-1]["rank"] = rank
        with AtomicFolder(Path(output), overwrite=overwrite) as folder:
            write_adapter(folder.path, config, tensors, record)
            folder.commit()
    finally:
        for adapter in opened:
            adapter.close()
    result = CombineResult(Path(output), report, inputs, files=sorted(record["files"]))
    result.seconds = time.perf_counter() - start
    return result


def _check_combinable(adapters: list[Adapter]) -> bool:
    """Refuse by name what has no exact LoRA sum; returns the shared fan_in_fan_out."""
    for a in adapters:
        if a.use_dora:
            raise LoramergeError(
                f"{a.path}: DoRA adapters cannot be combined exactly (DoRA rescales each column "
                "by a norm of W0 + dW, which is not a sum of low-rank terms); merge them instead"
            )
        saved = [f.target for f in a.full if not f.base_copy]
        if saved:
            raise LoramergeError(
                f"{a.path}: modules_to_save ({', '.join(saved)}) replace whole tensors, which a "
                "weighted sum of adapters cannot express; merge this adapter instead"
            )
        if a.token_rows:
            raise LoramergeError(
                f"{a.path}: trainable tokens ({a.token_rows[0].target}) replace rows, which a "
                "weighted sum of adapters cannot express; merge this adapter instead"
            )
    layouts = {m.fan_in_fan_out for a in adapters for m in a.modules if m.kind == "linear"}
    if len(layouts) > 1:
        raise LoramergeError(
            "the adapters disagree on fan_in_fan_out; they are for different models"
        )
    return layouts.pop() if layouts else False


def _base_copies(adapters: list[Adapter]) -> dict[str, np.ndarray]:
    """PEFT's saved copies of embedding base layers (maybe resized), carried over; two adapters
    that carry different copies of one layer were trained on different bases: refused."""
    copies: dict[str, tuple[str, np.ndarray]] = {}
    for adapter in adapters:
        for full in adapter.full:
            tensor = adapter.weights.read(full.key)
            seen = copies.setdefault(full.target, (full.key, tensor))[1]
            if seen.shape != tensor.shape or not np.array_equal(seen, tensor):
                raise LoramergeError(
                    f"{adapter.path}: its copy of base layer {full.target} differs from another "
                    "adapter's; they were trained on different bases"
                )
    return dict(copies.values())


def _modules(adapters: list[Adapter]) -> dict[str, list[tuple[int, LoraModule]]]:
    """Module name -> the (adapter index, module) terms that adapt it, in input order."""
    found: dict[str, list[tuple[int, LoraModule]]] = {}
    for index, adapter in enumerate(adapters):
        for module in adapter.modules:
            found.setdefault(module.module, []).append((index, module))
    for name, terms in found.items():
        if len({m.kind for _, m in terms}) > 1:
            raise LoramergeError(f"module {name!r} is LoRA of different kinds in the adapters")
    return dict(sorted(found.items()))


def _combine_module(name, terms, adapters, weights, rank) -> tuple[Factors, dict]:
    """One module: stacked factors (B columns times w*s), compressed when over `rank`."""
    a_parts, b_parts, bias = [], [], None
    shapes = set()
    for index, module in terms:
        adapter = adapters[index]
        a = adapter.weights.read(module.a_key).astype(np.float64)
        b = adapter.weights.read(module.b_key).astype(np.float64)
        coef = weights[index] * module.scale
        a_parts.append(a.reshape(a.shape[0], -1))
        b_parts.append(coef * b.reshape(b.shape[0], b.shape[1]))
        shapes.add((b.shape[0], a.shape[1:], b.shape[2:]))
        if module.bias_key:
            term = coef * adapter.weights.read(module.bias_key).astype(np.float64)
            bias = term if bias is None else bias + term
    if len(shapes) > 1:
        raise LoramergeError(f"module {name!r} has different shapes in the adapters: {shapes}")
    (out_dim, a_tail, b_tail), kind = shapes.pop(), terms[0][1].kind
    a, b = np.concatenate(a_parts, axis=0), np.concatenate(b_parts, axis=1)
    entry = {"rank": a.shape[0], "relative_error": 0.0, "terms": len(terms)}
    if rank is not None and a.shape[0] > rank:
        b, a, s, keep = truncate_factors(b, a, rank)
        total = float(np.sum(s**2))
        lost = float(np.sum(s[keep:] ** 2))
        entry = {
            "rank": keep,
            "concatenated_rank": len(s),
            "relative_error": float(np.sqrt(lost / total)) if total else 0.0,
            "kept_energy": 1.0 - lost / total if total else 1.0,
            "terms": len(terms),
        }
    a = a.reshape(a.shape[0], *a_tail).astype(np.float32)
    b = b.reshape(out_dim, b.shape[1], *b_tail).astype(np.float32)
    return Factors(name, kind, b, a, None if bias is None else bias.astype(np.float32)), entry


def _describe(adapter: Adapter, weight: float) -> dict:
    return {
        "source": str(adapter.path),
        "sha256": adapter.sha256(),
        "weight": weight,
        "rank": adapter.rank,
        "scale": adapter.default_scale,
        "use_rslora": adapter.use_rslora,
        "lora_modules": len(adapter.modules),
    }


def _common_base(adapters: list[Adapter]) -> str | None:
    bases = {a.config.get("base_model_name_or_path") for a in adapters}
    return bases.pop() if len(bases) == 1 else None
