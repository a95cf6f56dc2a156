"""`export-adapter`: a PEFT LoRA adapter as a GGUF adapter llama.cpp loads with `--lora`, each
module's own scale (rsLoRA, rank_pattern, alpha_pattern, the user's weight) folded into its B.

The adapter is planned against the base like a merge (names, shapes, refusals), then each
module's factors go to the GGUF adapter sink. Anything a LoRA pair cannot carry (whole tensors,
DoRA, biases, trainable tokens, tied embeddings) is refused with the advice to merge instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import gguf
import numpy as np

from loramerge import __version__, hub
from loramerge.adapter import Adapter, LoraModule, load_adapter
from loramerge.blocked import factor
from loramerge.errors import LoramergeError
from loramerge.gguf_names import (
    ARCHITECTURES,
    TensorNames,
    UnsupportedArchitecture,
    architecture,
)
from loramerge.plan import build_plan, check_weights
from loramerge.quant import ggml
from loramerge.sink.atomic import AtomicFile, check_replaceable
from loramerge.sink.gguf_adapter import GGUFAdapterFile, Pair, Slot, adapter_slots, describe
from loramerge.source.checkpoint import open_weights
from loramerge.source.gguf_file import GGUFModel
from loramerge.source.model_folder import read_config

_MERGE_INSTEAD = (
    "a llama.cpp LoRA adapter cannot carry it; merge instead (loramerge merge ... --to gguf)"
)


@dataclass(frozen=True)
class ExportOptions:
    """Knobs of export-adapter, as the CLI names them."""

    outtype: str = "f32"
    weight: float = 1.0
    overwrite: bool = False
    allow_pickle: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class _Target:
    """One module to export: the base tensor it adapts (HF name, shape) and its coefficient."""

    name: str
    shape: tuple[int, int]
    module: LoraModule
    coef: float


@dataclass
class ExportResult:
    """What export-adapter wrote (or, for a dry run, would write: `tensors`, nothing written)."""

    output: Path
    record: dict
    bytes_written: int
    seconds: float
    tensors: list[Slot] = field(default_factory=list)
    dry_run: bool = False

    def summary(self) -> dict:
        """The JSON object `--json` prints."""
        summary = {
            "command": "export-adapter",
            "output": str(self.output),
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "lora_pairs": self.record["output"]["lora_pairs"],
            "scales": self.record["adapters"][0]["scales"],
            "outtype": self.record["output"]["outtype"],
        }
        if self.dry_run:
            summary["dry_run"] = True
            summary["tensor_types"] = self.record["output"]["tensor_types"]
            summary["tensor_bytes"] = sum(t.nbytes for t in self.tensors)
            summary["tensors"] = [
                {"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes}
                for t in self.tensors
            ]
        return summary


def export_adapter(
    adapter: Path, base: Path, output: Path, options: ExportOptions = ExportOptions()
) -> ExportResult:
    """Write `adapter` (planned against `base`: a folder, .safetensors or .gguf) to `output`."""
    start = time.perf_counter()
    output = Path(output)
    if output.suffix != ".gguf":
        raise LoramergeError(f"{output}: a GGUF adapter is one file; name it *.gguf")
    check_weights([options.weight])
    adapter = hub.resolve(adapter, allow_pickle=options.allow_pickle)
    loaded = load_adapter(adapter, allow_pickle=options.allow_pickle)
    try:
        _refuse_unexportable(loaded)
        if Path(base).suffix == ".gguf":
            config, names, targets = _gguf_targets(Path(base), loaded, options.weight)
        else:
            needs_values = any(f.base_copy for f in loaded.full)  # compared with the base
            base = hub.resolve(base, headers_only=not needs_values)
            config, names, targets = _checkpoint_targets(Path(base), loaded, options)
        for path in (adapter, base):
            if output.absolute() == Path(path).absolute():
                raise LoramergeError(f"output {output} would overwrite input {path}")
        record = _record(loaded, base, config, targets, options)
        pairs = [Pair(t.name, t.shape, t.module.rank) for t in targets]
        if options.dry_run:
            return _dry_run(loaded, output, record, targets, pairs, names, options, start)
        with AtomicFile(output, overwrite=options.overwrite) as out:
            sink = GGUFAdapterFile(
                out.path, pairs, names, config, options.outtype, loaded.path.name, record
            )
            try:
                for target in targets:
                    module = target.module
                    a, b = _factors(loaded, module)
                    term = factor(a, b, target.coef, module.transposed)
                    # dW = B @ A in the base tensor's layout (embeddings store (B @ A)^T)
                    a, b = (term.b.T, term.a.T) if module.transposed else (term.a, term.b)
                    sink.write(target.name, a, b)
                sink.finish()
            except BaseException:
                sink.abort()
                raise
            record["output"] = sink.description
            size = out.path.stat().st_size
            out.commit()
    finally:
        loaded.close()
    return ExportResult(output, record, size, time.perf_counter() - start)


def _dry_run(
    adapter: Adapter,
    output: Path,
    record: dict,
    targets: list[_Target],
    pairs: list[Pair],
    names: TensorNames,
    options: ExportOptions,
    start: float,
) -> ExportResult:
    """Every check a real run makes (the output, the factors, the types), and the tensors it
    would write; nothing is written."""
    check_replaceable(output.absolute(), options.overwrite, folder=False)
    for target in targets:
        _factors(adapter, target.module)
    slots = adapter_slots(pairs, names, options.outtype)
    record["output"] = describe(slots, options.outtype, names.arch.name)
    tensors = [s for pair in slots.values() for s in pair]
    return ExportResult(output, record, 0, time.perf_counter() - start, tensors, dry_run=True)


def _factors(adapter: Adapter, module: LoraModule) -> tuple[np.ndarray, np.ndarray]:
    """A module's (A, B), refused when either holds NaN or Inf."""
    a, b = adapter.weights.read(module.a_key), adapter.weights.read(module.b_key)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise LoramergeError(f"{adapter.path}: NaN or Inf in the LoRA factors of {module.module}")
    return a, b


def _refuse_unexportable(adapter: Adapter) -> None:
    """What a GGUF LoRA pair cannot express, refused by name before anything is written."""
    name = adapter.path.name
    for module in adapter.modules:
        what = None
        if module.magnitude_key:
            what = "is DoRA (a magnitude vector rescales the merged weight)"
        elif module.bias_key:
            what = "has a trained lora_B bias (lora_bias)"
        elif module.kind not in ("linear", "embedding"):
            what = f"is LoRA on a {module.kind} ({module.target})"
        if what:
            raise LoramergeError(f"{name}: {module.module} {what}; {_MERGE_INSTEAD}")
    if adapter.token_rows:
        rows = adapter.token_rows[0]
        raise LoramergeError(
            f"{name}: replaces rows of {rows.target} (trainable tokens); {_MERGE_INSTEAD}"
        )


def _checkpoint_targets(
    base: Path, adapter: Adapter, options: ExportOptions
) -> tuple[dict, TensorNames, list[_Target]]:
    """The adapter planned against a safetensors base, as for a merge; the pairs to export."""
    config = read_config(base)
    if config is None:
        raise LoramergeError(f"{base}: export-adapter needs the base's config.json beside it")
    names = TensorNames(_architecture(config), config["num_hidden_layers"])
    with open_weights(base, stem="model", allow_pickle=options.allow_pickle) as checkpoint:
        plan = build_plan(checkpoint, config, [adapter], [options.weight], None)
    name = adapter.path.name
    for tensor in plan.modified:
        if tensor.replace:
            what = "replaces it whole (modules_to_save or a resized vocabulary)"
            raise LoramergeError(f"{name}: {tensor.name}: the adapter {what}; {_MERGE_INSTEAD}")
        if any(term.part for term in tensor.lora):
            raise LoramergeError(
                f"{name}: {tensor.name} is built from several stored tensors; {_MERGE_INSTEAD}"
            )
    if plan.config_updates:
        raise LoramergeError(
            f"{name}: the adapter changes tied embeddings ({'; '.join(plan.notes)}); "
            f"{_MERGE_INSTEAD}"
        )
    targets = [
        _Target(t.name, tuple(t.shape), term.module, term.coef)
        for t in plan.tensors
        for term in t.lora
    ]
    _check_names(names, [t.name for t in targets], adapter)
    return config, names, targets


def _gguf_targets(
    base: Path, adapter: Adapter, weight: float
) -> tuple[dict, TensorNames, list[_Target]]:
    """The pairs to export against a GGUF base: every target's GGUF name must be a tensor of
    the base with the shape the adapter's delta has."""
    config, shapes, model = read_gguf_base(base)
    names = TensorNames(_architecture(config), config["num_hidden_layers"])
    with model:
        equal = {
            full.key: full.base_copy and _gguf_equals(model, names, adapter, full.target, full.key)
            for full in adapter.full
        }
    targets, errors = [], []
    for module in adapter.modules:
        out, cols = _delta_shape(adapter, module)
        try:
            gname = names.gguf_name(module.target)
        except KeyError:
            gname = None
        if gname not in shapes:
            errors.append(f"{module.target} ({gname or 'no GGUF name'}) is not a tensor of {base}")
        elif shapes[gname] != (out, cols):
            errors.append(
                f"{module.module} makes a delta of shape {[out, cols]} but {gname} of the base "
                f"is {list(shapes[gname])}"
            )
        else:
            targets.append(_Target(module.target, (out, cols), module, weight * module.scale))
    for full in adapter.full:
        if not full.base_copy:
            errors.append(f"{full.target} is replaced whole (modules_to_save); {_MERGE_INSTEAD}")
        elif not equal[full.key]:
            errors.append(
                f"{full.key} is a saved copy of the base's {full.target}, which does not equal "
                f"the base's in a float32 or bfloat16 GGUF; pass the safetensors base"
            )
    if errors:
        lines = "\n  - ".join(errors)
        raise LoramergeError(f"{adapter.path.name} does not fit the base:\n  - {lines}")
    if any(t.module.kind == "embedding" for t in targets) and "output.weight" not in shapes:
        raise LoramergeError(
            f"{adapter.path.name}: LoRA on the token embedding of a model whose output head is "
            f"tied to it; {_MERGE_INSTEAD}"
        )
    return config, names, targets


def read_gguf_base(path: Path) -> tuple[dict, dict[str, tuple[int, ...]], GGUFModel]:
    """A GGUF model's hyperparameters as a config.json would hold them (what the name map and
    the q/k permutation read), its tensors' shapes (numpy order) by GGUF name, and the open
    file (header parsed safely, nothing mapped)."""
    model = GGUFModel(path)
    arch = model.architecture
    hf = next((n for n, a in ARCHITECTURES.items() if a.name == arch), None)
    layers = model.value(f"{arch}.block_count")
    heads = model.value(f"{arch}.attention.head_count")
    problem = None
    if model.value("general.type") == "adapter":
        problem = f"{path} is a GGUF adapter, not a model"
    elif hf is None or not isinstance(layers, int) or not isinstance(heads, int):
        problem = f"{path}: GGUF architecture {arch!r} is not one loramerge maps"
    if problem:
        model.close()
        raise LoramergeError(problem)
    config = {
        "architectures": [hf],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": model.value(f"{arch}.attention.head_count_kv") or heads,
    }
    shapes = {name: tuple(record.shape) for name, record in model.tensors.items()}
    return config, shapes, model


def _gguf_equals(
    model: GGUFModel, names: TensorNames, adapter: Adapter, target: str, key: str
) -> bool:
    """Whether a base-layer copy PEFT saved equals the GGUF base's tensor exactly (float types
    only: a quantized base cannot show that it is the same base)."""
    gname = names.gguf_name(target)
    record = model.tensors.get(gname)
    exact = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16)
    if record is None or record.qtype not in exact:
        return False
    blocks = model.read_blocks(gname)
    values = ggml.dequantize(blocks.reshape(-1, blocks.shape[-1]), record.qtype)
    copy = adapter.weights.read(key)
    return values.size == copy.size and np.array_equal(
        values.reshape(copy.shape), copy.astype(np.float32)
    )


def _delta_shape(adapter: Adapter, module: LoraModule) -> tuple[int, int]:
    """The (out, in) shape of a module's delta in its base tensor's layout."""
    a = adapter.weights.tensors[module.a_key].shape
    b = adapter.weights.tensors[module.b_key].shape
    return (a[1], b[0]) if module.transposed else (b[0], a[1])


def _architecture(config: dict):
    try:
        return architecture(config)
    except UnsupportedArchitecture as exc:
        raise LoramergeError(str(exc)) from None


def _check_names(names: TensorNames, targets: list[str], adapter: Adapter) -> None:
    """Every target has a GGUF name (one error listing those that do not)."""
    missing = []
    for target in targets:
        try:
            if names.gguf_name(target) is None:
                missing.append(f"{target} (tied to the embedding in GGUF)")
        except KeyError:
            missing.append(target)
    if missing:
        raise LoramergeError(
            f"{adapter.path.name}: no GGUF tensor for {', '.join(missing)}; {_MERGE_INSTEAD}"
        )


def _record(
    adapter: Adapter, base: Path, config: dict, targets: list[_Target], options: ExportOptions
) -> dict:
    """The provenance record stored in the file: base, adapter (hash, scales), the export."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    scales = {t.name: t.coef for t in targets}
    return {
        "format": "loramerge.provenance",
        "format_version": 1,
        "tool": {"name": "loramerge", "version": __version__},
        "created": now,
        "base": {"source": hub.source_name(base), "architectures": config.get("architectures")},
        "adapters": [
            {
                "source": hub.source_name(adapter.path),
                "sha256": None if options.dry_run else adapter.sha256(),
                "weight": options.weight,
                "rank": adapter.rank,
                "alpha": adapter.alpha,
                "scale": adapter.default_scale,
                "use_rslora": adapter.use_rslora,
                "lora_modules": len(targets),
                "scales": sorted(set(scales.values())),
                "scale_folded_into_lora_b": scales,
            }
        ],
        "history": [{"op": "export-adapter", "adapters": [str(adapter.path)], "at": now}],
    }
