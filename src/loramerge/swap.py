"""unmerge and rebase: take adapters out of a merged model (and put others in), checked against
the model's provenance record.

Without a base, the adapters' terms are subtracted from the merged weights in one pass (DoRA is
inverted with the norms the merge stored); the result carries the rounding of the first merge,
and when the recorded base is at hand the drift is measured. With `--base`, the output is
rebuilt from the base itself and kept only if the merged model really is base + what its record
says (checked before the output is renamed into place); it is bit-identical to merging the
remaining adapters into the base directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from loramerge import hub
from loramerge.adapter import load_adapter
from loramerge.errors import LoramergeError
from loramerge.merge import Job, MergeOptions, MergeResult, Progress, norm_key, run
from loramerge.sink.hf_folder import LEGACY_NORMS_FILE, NORMS_FILE, read_provenance
from loramerge.source.checkpoint import is_gguf, open_weights


@dataclass
class _Removal:
    """An adapter to take out, matched against the record."""

    path: Path
    sha256: str
    weight: float
    use_dora: bool
    entry: dict | None  # its entry in the record, when found
    targets: list[str] = field(default_factory=list)


def unmerge(
    merged: Path,
    adapters: list[Path],
    output: Path,
    options: MergeOptions | None = None,
    *,
    base: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Take `adapters` out of `merged` (each with the weight it was merged with, or -w)."""
    options = options or MergeOptions()
    return _swap("unmerge", merged, adapters, [], options, output, base, force, progress)


def rebase(
    merged: Path,
    remove: list[Path],
    add: list[Path],
    output: Path,
    options: MergeOptions | None = None,
    *,
    base: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Take `remove` out of `merged` and put `add` in (weights -w apply to `add`), in one pass."""
    options = options or MergeOptions()
    return _swap("rebase", merged, remove, add, options, output, base, force, progress)


@dataclass
class _Swap:
    """Everything one unmerge or rebase works from, once the removals are matched."""

    command: str
    merged: Path
    record: dict | None
    removals: list[_Removal]
    kept: list[dict]  # record entries of the adapters that stay inside
    add: list[Path]
    add_weights: list[float]
    output: Path
    options: MergeOptions
    force: bool


def _swap(command, merged, remove, add, options, output, base, force, progress) -> MergeResult:
    pickle = options.allow_pickle
    merged, output = hub.resolve(merged, allow_pickle=pickle), Path(output)
    remove = [hub.resolve(p, allow_pickle=pickle) for p in remove]
    add = [hub.resolve(p, allow_pickle=pickle) for p in add]
    record = _record(merged)
    user_weights = list(options.weights)
    remove_weights = user_weights if command == "unmerge" else []
    add_weights = user_weights if command == "rebase" else []
    for given, paths, what in ((remove_weights, remove, "removed"), (add_weights, add, "added")):
        if given and len(given) != len(paths):
            raise LoramergeError(f"got {len(given)} weights for {len(paths)} {what} adapters")
    removals = [_match(record, p, w, force, options) for p, w in _pair(remove, remove_weights)]
    swap = _Swap(
        command,
        merged,
        record,
        removals,
        _kept(record, removals),
        add,
        add_weights or [1.0] * len(add),
        output,
        options,
        force,
    )
    warnings = [] if record else [f"{merged} has no provenance record: nothing can be checked"]
    if base is not None:
        swap.options = options = _as_recorded(options, record)
        result = run(_rebuild_job(swap, hub.resolve(base, allow_pickle=pickle)), options, progress)
    else:
        job = _subtract_job(swap)
        result = run(job, options, progress)
        if not options.dry_run:
            result.drift = _drift(output, job, options.allow_pickle)
    if options.verify and result.verification is None and not options.dry_run:
        warnings.append("--verify: the recorded base is not at hand, nothing to verify against")
    result.warnings = warnings
    return result


def _as_recorded(options: MergeOptions, record: dict | None) -> MergeOptions:
    """A rebuild from the base merges as the recorded merge did: into dequant(NF4(W0)) when
    that was a `--qlora-base` merge, with its blocksize and double quantization."""
    qlora = (record or {}).get("qlora_base")
    if not qlora:
        return options
    quant = replace(options.quant, blocksize=qlora["blocksize"], double_quant=qlora["double_quant"])
    return replace(options, qlora_base=True, quant=quant)


def _record(merged: Path) -> dict | None:
    """The provenance record of a merged folder or GGUF file (None when it has none)."""
    if merged.is_dir():
        return read_provenance(merged)
    if is_gguf(merged):
        from loramerge.source.gguf_file import GGUFModel  # the gguf package, only now

        with GGUFModel(merged) as model:
            return model.provenance()
    return None


def _pair(paths: list[Path], weights: list[float]) -> list[tuple[Path, float | None]]:
    return list(zip(paths, weights or [None] * len(paths), strict=True))


def _match(record, path: Path, weight: float | None, force: bool, options) -> _Removal:
    """Find an adapter to remove in the record (by the sha256 of its weights)."""
    adapter = load_adapter(path, allow_pickle=options.allow_pickle)
    try:
        sha, use_dora = adapter.sha256(), adapter.use_dora
    finally:
        adapter.close()
    entries = (record or {}).get("adapters", [])
    entry = next((e for e in entries if e.get("sha256") == sha), None)
    if entry is None and record is not None and not force:
        inside = ", ".join(f"{e['source']} (w={e['weight']:g})" for e in entries) or "nothing"
        raise LoramergeError(
            f"{path} is not inside this model according to its record (inside: {inside}); "
            "pass --force to take it out anyway"
        )
    recorded = entry["weight"] if entry else 1.0
    targets = entry.get("targets", []) if entry else []
    return _Removal(path, sha, recorded if weight is None else weight, use_dora, entry, targets)


def _kept(record, removals: list[_Removal]) -> list[dict]:
    """Record entries of the adapters that stay inside."""
    gone = {r.sha256 for r in removals}
    return [e for e in (record or {}).get("adapters", []) if e["sha256"] not in gone]


def _subtract_job(swap: _Swap) -> Job:
    """The one-pass job: subtract (or invert DoRA) the removed terms, add the new ones."""
    removals = swap.removals
    job = Job(
        swap.command,
        swap.merged,
        [r.path for r in removals] + swap.add,
        [r.weight for r in removals] + swap.add_weights,
        [True] * len(removals) + [False] * len(swap.add),
        swap.output,
        record=swap.record,
        verify_against=_base_at_hand(swap),
        verify_through=[swap.merged, *_computed_from(swap.record)],
        read_back=True,  # the drift report, when the base is at hand
        hashes=_hashes(removals),
    )
    stored = _stored_norms(swap.merged, swap.record)
    kept_targets = {t for e in swap.kept for t in e.get("targets", [])}
    for index, removal in enumerate(removals):
        if not removal.use_dora:
            continue
        shared = sorted(kept_targets & set(removal.targets))
        if shared:
            raise LoramergeError(
                f"{removal.path} is DoRA and other adapters inside also change {shared[0]}; "
                "DoRA cannot be taken out of a shared tensor: pass --base BASE"
            )
        keys = {t: norm_key(removal.sha256, t) for t in removal.targets}
        if not removal.targets or any(k not in stored for k in keys.values()):
            raise LoramergeError(
                f"{removal.path} is DoRA, and undoing it needs the norms loramerge stores when it "
                "merges (not found in this model): pass --base BASE"
            )
        for tensor, key in keys.items():
            job.norms[(index, tensor)] = stored[key]
    keep = {e["sha256"][:16] for e in swap.kept}
    job.carried_norms = {k: v for k, v in stored.items() if k.split(":", 1)[0] in keep}
    return job


def _stored_norms(merged: Path, record) -> dict[str, np.ndarray]:
    """The DoRA norms the merge stored, where the record says (empty when there are none)."""
    entry = (record or {}).get("dora_norms")
    name = entry.get("file") if isinstance(entry, dict) else None
    if name is None:
        return {}
    if name not in (NORMS_FILE, LEGACY_NORMS_FILE):
        raise LoramergeError(f"{merged}: the record's DoRA norms file {name!r} is not loramerge's")
    if not (merged / name).is_file():
        return {}
    with open_weights(merged / name, stem="model", allow_pickle=False) as norms:
        return {key: norms.read(key).copy() for key in norms.tensors}


def _base_at_hand(swap: _Swap):
    """(base, adapters, weights) of the exact result, when the recorded files are all here."""
    if not swap.record:
        return None
    base = Path(swap.record["base"]["source"])
    sources = [Path(e["source"]) for e in swap.kept]
    if not base.exists() or not all(p.is_dir() for p in sources):
        return None
    return base, sources + swap.add, [e["weight"] for e in swap.kept] + swap.add_weights


def _drift(output: Path, job: Job, allow_pickle: bool) -> dict:
    """How far the subtracted result is from the exact one, per tensor (when the base is here)."""
    exact = job.verify_against
    if exact is None:
        return {
            "measured": False,
            "reason": "the recorded base (or a remaining adapter) is not at hand",
            "bound": "1 ulp at max(|W0|, |W0 + delta|) per element",
        }
    from loramerge.verify import verify_weights  # torch, loaded only when a check runs

    report = verify_weights(
        output, *exact, allow_pickle=allow_pickle, through=job.verify_through, done=job.checked
    )
    changed = [t for t in report.tensors if t.exact_share < 1.0 or t.max_ulp > 0]
    total = sum(t.elements for t in report.tensors) or 1
    return {
        "measured": True,
        "against": f"{exact[0]} + {[str(p) for p in exact[1]]}",
        "ulp_definition": "ulps of the output dtype at max(|exact|, |every model it was "
        "computed from|)",
        "max_ulp": max((t.max_ulp for t in report.tensors), default=0.0),
        # a quantized output: the worst error against one quantization's bound of the exact one
        "max_bound_ratio": max(
            (t.bound_ratio for t in report.tensors if t.bound_ratio is not None), default=None
        ),
        "exact_share": sum(t.exact_share * t.elements for t in report.tensors) / total,
        "tensors": [
            {"name": t.name, "max_ulp": t.max_ulp, "exact_share": t.exact_share}
            for t in sorted(changed, key=lambda t: -t.max_ulp)
        ],
    }


def _rebuild_job(swap: _Swap, base: Path) -> Job:
    """Check MERGED is BASE + its adapters, then merge what should remain into BASE afresh."""
    pickle = swap.options.allow_pickle
    kept = [hub.resolve(e["source"], allow_pickle=pickle) for e in swap.kept]
    missing = [e["source"] for e, path in zip(swap.kept, kept, strict=True) if not path.is_dir()]
    if missing:
        raise LoramergeError(
            f"rebuilding from --base needs every adapter that stays inside; not found: {missing}"
        )
    inside = kept + [r.path for r in swap.removals]
    inside_weights = [e["weight"] for e in swap.kept] + [r.weight for r in swap.removals]
    allow_pickle = swap.options.allow_pickle

    def check_source(done: dict | None = None) -> None:
        from loramerge.verify import verify_weights  # loaded only when a check runs

        qlora = (swap.record or {}).get("qlora_base")
        check = verify_weights(
            swap.merged,
            base,
            inside,
            inside_weights,
            allow_pickle=allow_pickle,
            qlora_base=qlora,
            done=done,
        )
        if not check.passed and not swap.force:
            worst = ", ".join(f"{t.name} ({t.note or t.kind})" for t in check.failures()[:5])
            raise LoramergeError(
                f"{swap.merged} is not {base} + its adapters within 1 ulp (worst tensors: "
                f"{worst}); pass --force to rebuild from the base anyway"
            )

    if swap.options.dry_run:  # nothing is written: the check refuses now, as a real run would
        check_source()
    adapters = kept + swap.add
    weights = [e["weight"] for e in swap.kept] + swap.add_weights
    record = swap.record or {}
    return Job(
        swap.command,
        base,
        adapters,
        weights,
        [False] * len(adapters),
        swap.output,
        record={"base": record.get("base"), "history": record.get("history", [])},
        verify_against=(base, adapters, weights),
        removed=[hub.source_name(r.path) for r in swap.removals],
        before_commit=None if swap.options.dry_run else check_source,
        source_check=(swap.merged, inside, inside_weights, _computed_from(swap.record)),
        hashes=_hashes(swap.removals),  # an adapter taken out and added again: hashed already
    )


def _hashes(removals: list[_Removal]) -> dict[Path, str]:
    """The sha256 `_match` computed for each adapter taken out, by its path."""
    return {r.path: r.sha256 for r in removals}


def _computed_from(record: dict | None) -> list[Path]:
    """The models a merged model's record says it was computed from by subtraction."""
    return [Path(p) for p in (record or {}).get("computed_from", [])]
