"""The merge pipeline: open the base and adapters, plan, then stream every tensor to the sink."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loramerge import __version__, dtypes, hub
from loramerge.adapter import Adapter, load_adapter
from loramerge.card import read_license
from loramerge.errors import LoramergeError
from loramerge.execute import Progress, Route, resolve_device, write_tensors
from loramerge.hashing import sha256_started
from loramerge.plan import Plan, TensorPlan, build_plan
from loramerge.sink.atomic import AtomicFile, AtomicFolder
from loramerge.sink.direct_io import Cached
from loramerge.sink.formats import SINGLE_FILE, GGUFInfo, open_sink
from loramerge.sink.hf_folder import (
    copy_files,
    record_files,
    updated_config,
    write_config,
    write_model_card,
    write_norms,
    write_provenance,
)
from loramerge.sink.nf4_folder import NF4Options
from loramerge.sink.safetensors_writer import Entry
from loramerge.source.checkpoint import Checkpoint, open_weights
from loramerge.source.model_folder import model_folder, read_config
from loramerge.source.nf4 import is_nf4, qlora_base

if TYPE_CHECKING:
    from loramerge.sink.gguf_rewrite import GGUFBase

# Files of a model folder that are weights or that the merge writes itself.
_NOT_COPIED = {"config.json", "README.md", "loramerge.json", "adapter_config.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".gguf")
_TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
}


@dataclass
class MergeResult:
    """What a merge did (or, for a dry run, would do)."""

    output: Path
    plan: Plan
    adapters: list[dict]
    dry_run: bool
    command: str = "merge"
    bytes_written: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    verification: dict | None = None
    record: dict | None = None
    drift: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The JSON object `--json` prints."""
        return {
            "command": self.command,
            "output": str(self.output),
            "dry_run": self.dry_run,
            "tensors_total": len(self.plan.tensors),
            "tensors_modified": len(self.plan.modified),
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "files": self.files,
            "adapters": self.adapters,
            "notes": self.plan.notes,
            "verification": self.verification,
            "drift": self.drift,
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class MergeOptions:
    """Knobs of a merge, as the CLI names them."""

    weights: tuple[float, ...] = ()
    dtype: str = "auto"
    device: str = "auto"
    compute_dtype: str = "float32"
    max_shard_size: int = 5_000_000_000
    overwrite: bool = False
    allow_pickle: bool = False
    dry_run: bool = False
    verify: bool = False
    allow_nonfinite: bool = False
    to: str | None = None  # the output format (sink.formats.FORMATS); None: the base's own
    qlora_base: bool = False  # merge into dequant(NF4(W0)): the base a QLoRA adapter saw
    quant: NF4Options = NF4Options()  # how quantizing formats quantize
    # --to gguf: the file type (sink.gguf_file.GGUF_TYPES); None: f16, or a GGUF base's own types
    gguf_type: str | None = None


def merge(
    base: Path,
    adapters: list[Path],
    output: Path,
    options: MergeOptions = MergeOptions(),
    progress: Progress | None = None,
) -> MergeResult:
    """Merge `adapters` (each times its weight) into `base`, writing a new folder `output`.

    Each input may be a local path or a Hub repo id `org/name[@revision]`.
    """
    base = hub.resolve(base, allow_pickle=options.allow_pickle, headers_only=options.dry_run)
    adapters = [hub.resolve(a, allow_pickle=options.allow_pickle) for a in adapters]
    weights = list(options.weights) or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise LoramergeError(f"got {len(weights)} weights for {len(adapters)} adapters")
    job = Job("merge", Path(base), adapters, weights, [False] * len(adapters), Path(output))
    job.verify_against = (job.source, adapters, weights)
    return run(job, options, progress)


@dataclass
class Job:
    """One write: a source checkpoint and the adapters to add to it or take out of it."""

    command: str  # "merge", "unmerge" or "rebase"
    source: Path  # the base, or the merged model for unmerge and rebase
    adapters: list[Path]
    weights: list[float]
    undo: list[bool]  # per adapter: take it out instead of adding it
    output: Path
    # The provenance record of the source (unmerge, rebase) to derive the new one from.
    record: dict | None = None
    # DoRA norms of undo terms, by (adapter index, tensor), and stored norms to carry over.
    norms: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    carried_norms: dict[str, np.ndarray] = field(default_factory=dict)
    # What `--verify` checks the output against: (base, adapters, weights), and the merged
    # model an unmerge started from (its magnitudes count in the ulp scale).
    verify_against: tuple[Path, list[Path], list[float]] | None = None
    # The models this output is computed from by subtraction (the source, then its own), newest
    # first: their magnitudes count in the ulp scale of every check, and the record keeps them.
    verify_through: list[Path] = field(default_factory=list)
    # Whether the caller checks the output against `verify_against` once it is written
    # (unmerge's drift report), as `--verify` does.
    read_back: bool = False
    # Sources of adapters taken out that are not among `adapters` (a rebuild from the base).
    removed: list[str] = field(default_factory=list)
    # Run once the output is written and before it is renamed into place, with the rows of
    # `source_check` measured in the pass; raising keeps the output out (a rebuild checks its
    # source here).
    before_commit: Callable[[dict], None] | None = None
    # A merged model to check against the source + adapters inside the pass, as (model,
    # adapters, weights, the models it was computed from): a rebuild's source.
    source_check: tuple[Path, list[Path], list[float], list[Path]] | None = None
    # The rows of the output's check measured in the pass (`verify_against`), by tensor.
    checked: dict = field(default_factory=dict)
    # The sha256 of adapters' weights the caller has already computed, by adapter path.
    hashes: dict[Path, str] = field(default_factory=dict)


def run(job: Job, options: MergeOptions, progress: Progress | None = None) -> MergeResult:
    """Plan the job, stream every tensor into a new folder, write the record, rename into place."""
    start = time.perf_counter()
    checked = [job.source_check[0]] if job.source_check else []  # a rebuild's merged model
    _check_output_is_not_input(job.output, [job.source, *job.adapters, *checked])
    if job.output.exists() and not options.overwrite:
        raise LoramergeError(f"{job.output} already exists; pass --overwrite to replace it")
    device = resolve_device(options.device)
    out_dtype = None if options.dtype == "auto" else dtypes.from_name(options.dtype)
    if options.compute_dtype not in ("float32", "float64"):
        raise LoramergeError(
            f"compute dtype must be float32 or float64, not {options.compute_dtype}"
        )
    config = read_config(job.source)
    opened: list[Adapter] = []
    with open_weights(job.source, stem="model", allow_pickle=options.allow_pickle) as stored:
        checkpoint, source_notes = _base_view(stored, config, options)
        if config is not None:  # a dequantized NF4 base is no longer quantized
            config = {k: v for k, v in config.items() if k != "quantization_config"}
        try:
            for path in job.adapters:
                opened.append(load_adapter(path, allow_pickle=options.allow_pickle))
            # the record's hashes of the adapters, computed on threads from now on and waited
            # for where the record is first needed (`_record_adapters`)
            known = [job.hashes.get(path) for path in job.adapters]
            digests = [] if options.dry_run else list(map(_sha256, opened, known))
            if stored.gguf is not None and options.gguf_type and out_dtype is None:
                out_dtype = "F32"  # retyped: quantized from the float32 merge, not a bf16 one
            plan = build_plan(checkpoint, config, opened, job.weights, out_dtype, job.undo)
            plan.notes.extend(source_notes)
            if not options.allow_nonfinite:
                _check_finite(opened)
            described = [
                _describe_adapter(a, w, plan, i)
                for i, (a, w) in enumerate(zip(opened, job.weights, strict=True))
            ]
            result = MergeResult(job.output, plan, described, options.dry_run, job.command)
            if options.dry_run:
                return result
            _check_free_space(job.output, plan.nbytes)
            record = _provenance(job, config, described, plan, options, device)
            if options.qlora_base:
                record["qlora_base"] = _round_trip(options)
            elif is_nf4(stored):
                record["base"]["quantization"] = checkpoint.description
            side_from, missing = model_folder(job.source)
            to, gguf_base = _output_format(options, stored)
            if gguf_base is not None:
                record["base"]["format"] = "gguf"
            single = to in SINGLE_FILE
            atomic = AtomicFile if single else AtomicFolder
            # a single file holds the record from its header on; a folder's is written last
            entries = _record_adapters(record, job, described, digests) if single else None
            with atomic(job.output, overwrite=options.overwrite) as out:
                result.warnings.extend(out.recovered)
                tokenizer_from = _tokenizer_source(opened, job.undo)
                if tokenizer_from is not None:
                    record["notes"].append(f"tokenizer files taken from adapter {tokenizer_from}")
                info = GGUFInfo(
                    options.gguf_type,
                    tokenizer_from or side_from,
                    job.source.name,
                    record,
                    gguf_base,
                )
                with _pass_checks(job, options, stored, checkpoint, to, device) as checks:
                    writer = open_sink(
                        to,
                        out.path,
                        [Entry(t.name, t.dtype, t.shape) for t in plan.tensors],
                        options.max_shard_size,
                        replace(options.quant, device=device),
                        # as the output's config.json will say (a GGUF file's own metadata)
                        updated_config(config, plan.config_updates) if config else config,
                        info,
                        # what a check after the pass reads back goes through the page cache:
                        # all of it, or the tensors copied unchanged when the rest is checked in it
                        cached=_cached(
                            _output_checked(job, options), checks.read_back(plan, checkpoint)
                        ),
                    )
                    requantized = writer.description.get("requantized_tensors", 0)
                    if requantized:
                        result.warnings.append(
                            f"{requantized} tensors of the GGUF base were quantized already and "
                            f"are quantized again to {options.gguf_type}: their errors add up "
                            "(start from the float checkpoint where you have it)"
                        )
                    norms: dict[tuple[int, str], np.ndarray] = {}
                    hooks = checks.hook if checks.any else None
                    route = Route(device, options.compute_dtype, job.norms, norms, hooks)
                    try:
                        result.bytes_written = write_tensors(
                            writer, plan, checkpoint, opened, route, progress
                        )
                        writer.finish()
                    except BaseException:
                        writer.abort()
                        raise
                    job.checked, source_rows = checks.results()
                result.files = [job.output.name] if single else list(writer.files)
                if entries is None:
                    entries = _record_adapters(record, job, described, digests)
                record["output"] = writer.description
                result.record = record
                if single:
                    result.bytes_written = out.path.stat().st_size
                    if norms or job.carried_norms:
                        result.warnings.append(
                            "DoRA magnitude norms are not stored in a GGUF file: it cannot be "
                            "unmerged exactly"
                        )
                    if options.verify and job.verify_against:
                        result.verification = _verify(
                            out.path, *job.verify_against, options, job.verify_through
                        )
                    _before_commit(job, source_rows)
                    out.commit()
                    return _finished(result, start)
                stored = {**job.carried_norms, **_norm_keys(norms, entries)}
                if stored:
                    record["dora_norms"] = write_norms(out.path, stored)
                if options.verify and job.verify_against:
                    result.verification = record["verification"] = _verify(
                        out.path, *job.verify_against, options, job.verify_through, job.checked
                    )
                record["files"] = dict(writer.hashes)
                if missing:
                    result.warnings.append(
                        f"{missing}: the output holds the weights but no config or tokenizer, "
                        "so transformers cannot load it as a model folder"
                    )
                    record["notes"].append(f"no side files: {missing}")
                updates = {**plan.config_updates, **writer.config_updates}
                _write_side_files(out.path, side_from, config, updates, record, tokenizer_from)
                _before_commit(job, source_rows)
                out.commit()
        finally:
            for adapter in opened:
                adapter.close()
    return _finished(result, start)


def _cached(checked: bool, read_back: frozenset[str] | None) -> Cached:
    """What of the output a check reads back once it is written (`direct_io.Cached`): nothing
    unchecked, all of it unless its check measures merged tensors in the pass, else the copies
    it reads back (`_PassChecks.read_back`)."""
    if not checked:
        return "none"
    return "all" if read_back is None else read_back


def _before_commit(job: Job, source_rows: dict) -> None:
    """The job's last word on a written output (`Job.before_commit`), if it has one."""
    if job.before_commit is not None:
        job.before_commit(source_rows)


class _PassChecks:
    """The checks measured inside the pass (`verify.in_pass`): the output's and the source's."""

    def __init__(self, output=None, source=None) -> None:
        self._output, self._source = output, source

    def __enter__(self) -> _PassChecks:
        return self

    def __exit__(self, *exc) -> None:
        for check in (self._output, self._source):
            if check is not None:
                check.close()

    @property
    def any(self) -> bool:
        """Whether some check is measured in the pass."""
        return self._output is not None or self._source is not None

    def read_back(self, plan: Plan, checkpoint: Checkpoint) -> frozenset[str] | None:
        """The tensors copied unchanged that the output's check reads back after the pass (those
        it checks but cannot measure in it; not one it does not check, such as an untied head
        the base ties), when it measures merged tensors in the pass; else None."""
        check = self._output
        if check is None:
            return None
        measured = {
            t.name for t in plan.tensors if check.measures(t, checkpoint.tensors[t.source].dtype)
        }
        if not any(t.modified and t.name in measured for t in plan.tensors):
            return None
        copies = (t for t in plan.tensors if not t.modified and t.name not in measured)
        return frozenset(t.name for t in copies if check.checks(t.name))

    def hook(self, plan: TensorPlan, stored_dtype: str):
        """Both checks' block hooks for a tensor, as one (None when neither measures it)."""
        hooks = [c.hook(plan, stored_dtype) for c in (self._output, self._source) if c is not None]
        hooks = [h for h in hooks if h is not None]
        return hooks[0] if len(hooks) == 1 else (_Both(*hooks) if hooks else None)

    def results(self) -> tuple[dict, dict]:
        """(the output check's rows, the source check's rows)."""
        return tuple({} if c is None else c.results() for c in (self._output, self._source))


class _Both:
    """Two checks shown the same blocks (a rebuild's source and, with --verify, its output)."""

    def __init__(self, first, second) -> None:
        self._checks = (first, second)

    def __call__(self, *block) -> None:
        for check in self._checks:
            check(*block)


def _pass_checks(
    job: Job, options: MergeOptions, stored, checkpoint, to: str, device: str
) -> _PassChecks:
    """The checks this job runs after its pass that can be measured inside it: the pass reads a
    plain stored safetensors checkpoint, and writes one, with numpy (on the CPU, in float32)."""
    plain = stored.gguf is None and checkpoint is stored and not is_nf4(stored)
    numpy = device == "cpu" and options.compute_dtype == "float32"
    checked = _output_checked(job, options) or job.source_check is not None
    if not checked or not plain or not numpy or to != "safetensors" or options.qlora_base:
        return _PassChecks()
    from loramerge.verify.in_pass import PassCheck  # loaded only when a check runs

    output = source = None
    pickle = options.allow_pickle
    if _output_checked(job, options):
        base, adapters, weights = job.verify_against
        output = PassCheck(
            (job.source, stored), base, adapters, weights, job.verify_through, None, pickle
        )
    if job.source_check is not None:  # a gate: its figures are only read for a refusal
        merged, adapters, weights, through = job.source_check
        source = PassCheck(
            (job.source, stored), job.source, adapters, weights, through, merged, pickle, True
        )
    return _PassChecks(output, source)


def _output_checked(job: Job, options: MergeOptions) -> bool:
    """Whether the output is checked once written: `--verify`, or the caller's own check."""
    return job.verify_against is not None and (options.verify or job.read_back)


def _finished(result: MergeResult, start: float) -> MergeResult:
    """The result with its duration."""
    result.seconds = time.perf_counter() - start
    return result


def _round_trip(options: MergeOptions) -> dict | None:
    """How `--qlora-base` passes the base through NF4 (the record's "qlora_base"), or None."""
    if not options.qlora_base:
        return None
    return {"blocksize": options.quant.blocksize, "double_quant": options.quant.double_quant}


def _output_format(options: MergeOptions, stored: Checkpoint) -> tuple[str, GGUFBase | None]:
    """`--to`, by default the base's own format; a GGUF base's header when it is rewritten."""
    gguf = stored.gguf
    if gguf is None:
        to = options.to or "safetensors"
        if options.gguf_type is not None and to != "gguf":
            raise LoramergeError(f"--gguf-type {options.gguf_type} applies to --to gguf only")
        return to, None
    if options.to not in (None, "gguf"):
        raise LoramergeError(
            f"a GGUF base merges into a GGUF file, not --to {options.to} (convert the Hugging "
            "Face checkpoint instead)"
        )
    from loramerge.sink.gguf_rewrite import GGUFBase  # (the gguf package: GGUF bases only)

    return "gguf", GGUFBase(gguf.model.header, gguf.gguf_names)


def _base_view(stored, config: dict | None, options: MergeOptions):
    """The base as the merge reads it: NF4 weights dequantized, or with `--qlora-base` the
    Linear weights passed through NF4 and back; plus notes saying so."""
    if not options.qlora_base:
        if is_nf4(stored):
            count = stored.description["quantized_tensors"]
            return stored, [f"NF4 base: {count} weights dequantized on read"]
        return stored, []
    if is_nf4(stored):
        raise LoramergeError(
            "--qlora-base: the base is already NF4, so merging into it is merging into the "
            "dequantized weights; drop --qlora-base"
        )
    quant = options.quant
    view = qlora_base(stored, config, quant.blocksize, quant.double_quant)
    return view, [
        f"--qlora-base: merged into dequant(NF4(W0)) for {view.description['tensors']} Linear "
        f"weights (blocksize {quant.blocksize}, double quantization {quant.double_quant})"
    ]


def _verify(
    folder: Path, base: Path, adapters, weights, options: MergeOptions, through, done=None
) -> dict:
    """Run the weight check on what was just written (`done`: the rows measured in the pass);
    the verdict goes into the record."""
    from loramerge.verify import verify_weights  # torch, loaded only when a check runs

    report = verify_weights(
        folder,
        base,
        adapters,
        weights,
        allow_pickle=options.allow_pickle,
        through=through,
        qlora_base=_round_trip(options),
        done=done,
    )
    return {
        "passed": report.passed,
        "verdict": report.verdict(),
        "tolerance_ulp": report.tolerance_ulp,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _check_finite(adapters: list[Adapter]) -> None:
    """NaN or Inf in an adapter would spread into every weight it touches: refuse it."""
    for adapter in adapters:
        bad = adapter.nonfinite()
        if bad:
            raise LoramergeError(
                f"{adapter.path}: NaN or Inf in {len(bad)} tensor(s), e.g. {bad[0]}; pass "
                "--allow-nonfinite to merge anyway"
            )


def _check_free_space(output: Path, nbytes: int) -> None:
    """Refuse up front when the output cannot fit (tensor bytes plus 1% for headers and files)."""
    folder = output.absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    needed = int(nbytes * 1.01) + (1 << 20)
    if needed > free:
        raise LoramergeError(
            f"{output} needs {_size(needed)} but only {_size(free)} are free on {folder}"
        )


def _size(nbytes: int) -> str:
    """Bytes for a person: 3 significant digits in the largest decimal unit under them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


def _check_output_is_not_input(output: Path, inputs: list[Path]) -> None:
    """Refuse an output that is an input, holds one, or lies inside an input folder (writing
    there would change the input)."""
    out = output.resolve()
    for path in inputs:
        src = path.resolve()
        if src == out or out in src.parents:
            raise LoramergeError(f"output {output} would overwrite input {path}")
        if src in out.parents and src.is_dir():
            raise LoramergeError(f"output {output} is inside input {path}: it would change it")


def _describe_adapter(adapter: Adapter, weight: float, plan: Plan, index: int) -> dict:
    """The provenance entry of one adapter (the sha256 is filled in when writing)."""
    overrides = {m.module: m.scale for m in adapter.modules if m.scale != adapter.default_scale}
    return {
        "source": hub.source_name(adapter.path),
        "weights_file": adapter.weights.files[0].name,
        "weight": weight,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "scale": adapter.default_scale,
        "scale_overrides": overrides,
        "use_rslora": adapter.use_rslora,
        "use_dora": adapter.use_dora,
        "lora_modules": len(adapter.modules),
        "replaced_tensors": sorted(f.target for f in adapter.full),
        "trainable_token_rows": sorted(r.target for r in adapter.token_rows),
        "targets": sorted(t.name for t in plan.tensors if index in _adapters_of(t)),
    }


def _adapters_of(tensor: TensorPlan) -> set[int]:
    """Indices of the adapters that change one planned tensor."""
    found = {x.adapter for x in (*tensor.lora, *tensor.bias)} | {x.adapter for x in tensor.rows}
    return found | ({tensor.replace.adapter} if tensor.replace else set())


def _norm_keys(norms: dict[tuple[int, str], np.ndarray], entries: list[dict]) -> dict:
    """Stored-norm names: '<adapter sha256 prefix>:<tensor>' (stable across rebases)."""
    return {norm_key(entries[i]["sha256"], name): n for (i, name), n in norms.items()}


def norm_key(sha256: str, tensor: str) -> str:
    """Name of one stored DoRA norm vector."""
    return f"{sha256[:16]}:{tensor}"


def _provenance(job: Job, config, described: list[dict], plan: Plan, options, device) -> dict:
    """The new record, its adapters left to `_record_adapters` (they wait for the hashes)."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    added = [e for e, undo in zip(described, job.undo, strict=True) if not undo]
    removed = [e for e, undo in zip(described, job.undo, strict=True) if undo]
    previous = job.record or {}
    step = {"op": job.command, "adapters": [e["source"] for e in added], "at": now}
    if removed or job.removed:
        step["removed"] = [e["source"] for e in removed] + job.removed
    out_dtypes = sorted({t.dtype for t in plan.tensors if t.modified} or {"unchanged"})
    base = previous.get("base") or {
        "source": hub.source_name(job.source),
        "architectures": (config or {}).get("architectures"),
        "license": read_license(job.source),
    }
    return {
        "format": "loramerge.provenance",
        "format_version": 1,
        "tool": {"name": "loramerge", "version": __version__},
        "created": now,
        "base": base,
        "adapters": [],
        "history": [*previous.get("history", []), step],
        "dtype": options.dtype if options.dtype != "auto" else f"auto ({', '.join(out_dtypes)})",
        "compute_dtype": options.compute_dtype,
        "device": device.split(":")[0],
        "tensors": {"total": len(plan.tensors), "modified": len(plan.modified)},
        "notes": list(plan.notes),
        **({"computed_from": [str(p) for p in job.verify_through]} if job.verify_through else {}),
    }


def _record_adapters(
    record: dict, job: Job, described: list[dict], digests: list[Callable[[], str]]
) -> list[dict]:
    """The record's adapters: the source's own minus those taken out, plus those added, each
    with the sha256 of its weights (waited for here); returns every adapter's entry."""
    entries = [{**d, "sha256": h()} for h, d in zip(digests, described, strict=True)]
    gone = {e["sha256"] for e, undo in zip(entries, job.undo, strict=True) if undo}
    kept = [a for a in (job.record or {}).get("adapters", []) if a["sha256"] not in gone]
    added = [e for e, undo in zip(entries, job.undo, strict=True) if not undo]
    record["adapters"] = kept + added
    return entries


def _sha256(adapter: Adapter, known: str | None) -> Callable[[], str]:
    """The sha256 of an adapter's weights: the one the caller already has, or begun now."""
    return (lambda: known) if known is not None else sha256_started(adapter.weights.files)


def _tokenizer_source(adapters: list[Adapter], undo: list[bool]) -> Path | None:
    """The last added adapter that carries tokenizer files (its vocabulary wins), if any."""
    added = [a for a, taken_out in zip(adapters, undo, strict=True) if not taken_out]
    return next(
        (
            a.path
            for a in reversed(added)
            if any(f.name in _TOKENIZER_FILES for f in _side_files(a.path))
        ),
        None,
    )


def _write_side_files(folder, source, config, updates, record, tokenizer_from) -> None:
    """config.json, tokenizer and generation files, model card and provenance."""
    if config is not None:
        write_config(folder, config, updates)
    side = _side_files(source) if source else []
    if tokenizer_from is not None:
        side = [f for f in side if f.name not in _TOKENIZER_FILES]
        side += [f for f in _side_files(tokenizer_from) if f.name in _TOKENIZER_FILES]
    copy_files(folder, side)
    write_model_card(folder, record)
    # every file but the record itself (written last); shards were hashed as they were written
    record_files(folder, record, known=record.get("files", {}))
    write_provenance(folder, record)


def _side_files(folder: Path) -> list[Path]:
    """Top-level regular files of a model folder that are neither weights nor ours."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in _NOT_COPIED
        and not p.name.endswith(_WEIGHT_SUFFIXES)
    )
