"""The weight check: recompute every expected tensor in float64 and measure the candidate.

Candidate and base are streamed one tensor at a time, merged tensors in row blocks, so memory
stays bounded like a merge. Tensors no adapter touches must be bit-identical to the base (or, if
the candidate changed their dtype, exactly the base rounded once).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from loramerge import dtypes, nf4_layout
from loramerge.adapter import Adapter, load_adapter
from loramerge.compare import Distance
from loramerge.errors import LoramergeError
from loramerge.execute import collector_paused
from loramerge.plan import TensorPlan, as_matrix, build_plan
from loramerge.sink.hf_folder import read_provenance
from loramerge.source import nf4 as nf4_source
from loramerge.source.checkpoint import Checkpoint, open_weights
from loramerge.source.model_folder import read_config
from loramerge.source.safetensors_file import read_exact
from loramerge.verify.expected import by_numpy, expected_blocks

_PIECE_BYTES = 8 << 20  # a tensor no adapter touches is compared this much at a time
_SPLIT_BYTES = 256 << 20  # and split among the threads when bigger than this


@dataclass
class TensorCheck:
    """The verdict on one tensor."""

    name: str
    kind: str  # "merged", "untouched", "missing", "extra", "shape"
    dtype: str = ""
    elements: int = 0
    max_abs: float = 0.0
    max_ulp: float = 0.0
    # this, exact_share and rmse are NaN in a verdict-only check's row (`in_pass.PassCheck`)
    max_ulp_at_value: float = 0.0
    # ulps beyond the float32 arithmetic bound (float32 candidates; else equal to max_ulp)
    max_ulp_judged: float = 0.0
    exact_share: float = 1.0
    rmse: float = 0.0
    passed: bool = True
    note: str = ""
    snr_db: float | None = None  # quantized candidates: signal-to-noise of the dequantized tensor
    bound_ratio: float | None = None  # quantized candidates: worst error / allowed error


@dataclass
class VerifyReport:
    """Every tensor's verdict, plus the forward check when one ran."""

    candidate: str
    base: str
    adapters: list[dict]
    tolerance_ulp: float
    tensors: list[TensorCheck] = field(default_factory=list)
    forward: dict | None = None
    # Models the candidate was computed from by subtraction, whose magnitudes join the ulp scale.
    through: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every tensor (and the forward check, if run) is within tolerance."""
        forward_ok = self.forward is None or self.forward.get("passed", False)
        return forward_ok and all(t.passed for t in self.tensors)

    def failures(self) -> list[TensorCheck]:
        """The tensors that failed, worst first."""
        return sorted((t for t in self.tensors if not t.passed), key=lambda t: -t.max_ulp)

    def verdict(self) -> str:
        """One line a person reads first."""
        bounded = [t for t in self.tensors if t.bound_ratio is not None]
        if bounded:
            return self._quantized_verdict(bounded)
        merged = [t for t in self.tensors if t.kind == "merged"]
        untouched = [t for t in self.tensors if t.kind == "untouched"]
        worst = max((t.max_ulp_judged for t in merged), default=0.0)
        raw = max((t.max_ulp for t in merged), default=0.0)
        beyond = f" beyond the float32 arithmetic bound ({raw:.3g} raw)" if raw > worst else ""
        exact = sum(t.exact_share * t.elements for t in merged)
        total = sum(t.elements for t in merged) or 1
        line = (
            f"{len(merged)} merged tensors within {worst:.3g} ulp{beyond} (tolerance "
            f"{self.tolerance_ulp:g}; {exact / total:.4%} of elements correctly rounded), "
            f"{sum(t.exact_share == 1.0 for t in untouched)}/{len(untouched)} untouched tensors "
            "bit-identical"
        )
        rounded = sum(t.passed and t.exact_share < 1.0 for t in untouched)
        if rounded:
            line += f" ({rounded} more within tolerance: rounded on the way through)"
        if self.forward is not None:
            line += f"; forward: {self.forward['summary']}"
        failures = self.failures()
        if failures:
            names = ", ".join(f"{t.name} ({t.note})" for t in failures[:3])
            line += f"; {len(failures)} failed: {names}"
        return ("PASS: " if self.passed else "FAIL: ") + line

    def _quantized_verdict(self, bounded: list[TensorCheck]) -> str:
        worst = max(t.bound_ratio for t in bounded)
        snr = min((t.snr_db for t in bounded if t.snr_db is not None), default=float("inf"))
        formats = ", ".join(sorted({t.dtype for t in bounded}))
        line = (
            f"{len(bounded)} quantized tensors ({formats}) within {worst:.3g}x of their format's "
            f"error bound, lowest SNR {snr:.1f} dB"
        )
        failures = self.failures()
        if failures:
            names = ", ".join(f"{t.name} ({t.note or t.kind})" for t in failures[:3])
            line += f"; {len(failures)} failed: {names}"
        return ("PASS: " if self.passed else "FAIL: ") + line

    def summary(self) -> dict:
        """Everything, JSON-ready."""
        return {
            "command": "verify",
            "passed": self.passed,
            "verdict": self.verdict(),
            "candidate": self.candidate,
            "base": self.base,
            "adapters": self.adapters,
            "tolerance_ulp": self.tolerance_ulp,
            "ulp_definition": "ulps of the candidate dtype at max(|W0|, |expected|, |every "
            "model it was computed from|)",
            "through": self.through,
            "notes": self.notes,
            "tensors": [asdict(t) for t in self.tensors],
            "forward": self.forward,
        }


def verify_weights(
    candidate: Path,
    base: Path,
    adapters: list[Path],
    weights: list[float] | None = None,
    *,
    tolerance_ulp: float | None = None,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
    through: list[Path] | None = None,
    qlora_base: dict | None = None,
    done: dict[str, TensorCheck] | None = None,
) -> VerifyReport:
    """Check CANDIDATE == BASE + sum w_i * adapter_i, tensor by tensor, against float64.

    `qlora_base` (a record's {"blocksize", "double_quant"}): the candidate was merged into
    dequant(NF4(W0)) (`--qlora-base`), so the check starts from that too; by default, what the
    candidate's record says.

    `through`: the checkpoints the candidate was computed from by subtraction (an unmerge's
    merged input, and that one's own inputs); by default, those its record names. Their
    magnitudes join max(|W0|, |expected|) in the ulp scale: each rounding the element went
    through was at that magnitude. The default tolerance is 1 ulp, plus 0.5 ulp for each of
    those earlier roundings beyond the first.

    `done`: rows already measured, by tensor name (`in_pass.PassCheck`, which measured them
    from the same bytes as the write's own pass); those tensors are not read again.
    """
    candidate, base = Path(candidate), Path(base)
    weights = list(weights or [1.0] * len(adapters))
    config = read_config(base)
    report = VerifyReport(
        str(candidate),
        str(base),
        [{"source": str(a), "weight": w} for a, w in zip(adapters, weights, strict=True)],
        1.0 if tolerance_ulp is None else tolerance_ulp,
    )
    record = read_provenance(candidate) if candidate.is_dir() else None
    if qlora_base is None and (record or {}).get("qlora_base"):
        qlora_base = record["qlora_base"]
        report.notes.append(
            f"the record says the merge read the base through NF4 (--qlora-base, blocksize "
            f"{qlora_base['blocksize']}): checked against dequant(NF4(W0)) + the adapters"
        )
    if through is None:
        through = [Path(p) for p in (record or {}).get("computed_from", [])]
    quantized = open_quantized(candidate, allow_pickle)
    if quantized is not None:
        with ExitStack() as stack:
            stack.callback(quantized.close)
            base_ck = stack.enter_context(_open_base(base, allow_pickle, qlora_base))
            via = [
                stack.enter_context(open_weights(p, stem="model", allow_pickle=allow_pickle))
                for p in _at_hand(through, report)
            ]
            _check_all_quantized(
                report, quantized, base_ck, config, adapters, weights, progress, via
            )
        return report
    if tolerance_ulp is None:
        report.tolerance_ulp = tolerance(len(through))
    through = _at_hand(through, report)
    opened: list[Adapter] = []
    with ExitStack() as stack:
        base_ck = stack.enter_context(_open_base(base, allow_pickle, qlora_base))
        cand_ck = stack.enter_context(
            open_weights(candidate, stem="model", allow_pickle=allow_pickle)
        )
        via = [
            stack.enter_context(open_weights(p, stem="model", allow_pickle=allow_pickle))
            for p in through
        ]
        try:
            opened = [load_adapter(a, allow_pickle=allow_pickle) for a in adapters]
            plan = build_plan(base_ck, config, opened, weights, None)
            planned = {t.name for t in plan.tensors}
            check = partial(
                _check,
                base=base_ck,
                candidate=cand_ck,
                adapters=opened,
                tol=report.tolerance_ulp,
                through=via,
            )
            torch_too = any(t.modified and not by_numpy(t, base_ck) for t in plan.tensors)
            with (
                collector_paused(),
                _single_threaded_math(torch_too),
                ThreadPoolExecutor(_workers()) as pool,
            ):
                done = done or {}
                left = [t for t in plan.tensors if t.name not in done]
                jobs = _schedule([(t, span) for t in left for span in _spans(t, cand_ck)])
                part = partial(_untouched_part, base=base_ck, candidate=cand_ck, through=via)
                outcomes = pool.map(lambda j: part(j[0], span=j[1]) if j[1] else check(j[0]), jobs)
                results = _joined(jobs, outcomes, cand_ck, report.tolerance_ulp, bool(via))
                for tensor in plan.tensors:
                    report.tensors.append(done.get(tensor.name) or results[tensor.name])
                    if progress:
                        progress(tensor.nbytes, plan.nbytes)
            report.tensors += _extras(sorted(set(cand_ck.tensors) - planned))
        finally:
            for adapter in opened:
                adapter.close()
    return report


def _schedule(jobs: list) -> list:
    """Whole tensors first, the largest first, then the parts of split ones, which fill the
    threads while the last whole ones finish (a 4 GiB embedding checked whole must not start
    after a 4 GiB head's parts)."""
    return sorted(jobs, key=lambda job: (job[1] is not None, -job[0].nbytes))


def _joined(
    jobs: list, outcomes, candidate: Checkpoint, tol: float, through: bool
) -> dict[str, TensorCheck]:
    """Each tensor's row: a whole tensor's as its check gave it, a split one's from its parts'
    figures folded together (`Distance.fold`)."""
    rows: dict[str, TensorCheck] = {}
    parts: dict[str, Distance] = {}
    for (tensor, span), outcome in zip(jobs, outcomes, strict=True):
        if span is None:
            rows[tensor.name] = outcome
        else:
            parts.setdefault(tensor.name, Distance()).fold(outcome)
    for name, distance in parts.items():
        dtype = candidate.tensors[name].dtype
        rows[name] = untouched_result(name, dtype, distance, tol, through)
    return rows


def _open_base(base: Path, allow_pickle: bool, qlora: dict | None):
    """The base as the candidate's merge read it: as stored, or through NF4 (`--qlora-base`)."""
    checkpoint = open_weights(base, stem="model", allow_pickle=allow_pickle)
    if qlora is None:
        return checkpoint
    config = read_config(base)
    return nf4_source.qlora_base(checkpoint, config, qlora["blocksize"], qlora["double_quant"])


def open_quantized(candidate: Path, allow_pickle: bool):
    """A reader for a GGUF file or an NF4 checkpoint (torch, loaded only then); None for
    anything else."""
    candidate = Path(candidate)
    if candidate.is_file() and candidate.suffix == ".gguf":
        from loramerge.verify.quantized import GGUFCandidate

        return GGUFCandidate(candidate)
    if candidate.exists() and candidate.suffix != ".gguf":
        checkpoint = open_weights(
            candidate, stem="model", allow_pickle=allow_pickle, dequantize=False
        )
        if any(name.endswith(nf4_layout.STATE) for name in checkpoint.tensors):
            from loramerge.verify.quantized import NF4Candidate

            try:
                return NF4Candidate(checkpoint, read_config(candidate))
            except LoramergeError:
                checkpoint.close()
                raise
        checkpoint.close()
    return None


def _workers() -> int:
    """Tensors checked at once: one per core (numpy, torch and reads release the GIL)."""
    return max(1, min(4, os.cpu_count() or 1))


@contextmanager
def _single_threaded_math(torch_too: bool) -> Iterator[None]:
    """BLAS (and torch, when some tensor needs it) on one thread while the tensors run in
    parallel: on a busy machine, spinning intra-op threads cost more than they give."""
    with threadpool_limits(limits=1, user_api="blas"):
        if not torch_too:
            yield
            return
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def tolerance(through: int) -> float:
    """The default tolerance in ulps of a candidate computed through `through` models by
    subtraction: 1, plus half an ulp for each earlier rounding beyond the first."""
    return 1.0 + 0.5 * max(through - 1, 0)


def models_at_hand(through: list[Path]) -> list[Path]:
    """The models the candidate was computed from that still exist."""
    return [Path(p) for p in through if Path(p).exists()]


def _at_hand(through: list[Path], report: VerifyReport) -> list[Path]:
    """The models the candidate was computed from that still exist; the others are noted."""
    at_hand = models_at_hand(through)
    for source in through:
        if Path(source) not in at_hand:
            report.notes.append(
                f"computed by subtraction from {source}, which is not at hand: its magnitudes "
                "are missing from the ulp scale, so ulps may be overstated"
            )
    report.through += [str(p) for p in at_hand]
    return at_hand


def _extras(names: list[str]) -> list[TensorCheck]:
    return [TensorCheck(n, "extra", passed=False, note="not in base + adapters") for n in names]


def _check_all_quantized(
    report, reader, base_ck, config, adapters, weights, progress, via: list[Checkpoint]
) -> None:
    """The weight check of a GGUF or NF4 candidate: each tensor against its format's bound
    (`via`: the models it was computed from by subtraction, for the ulps of float storage)."""
    from loramerge.verify.quantized import NF4Candidate

    opened = [load_adapter(a) for a in adapters]
    try:
        plan = build_plan(base_ck, config, opened, weights, None)
        located = set()
        for tensor in plan.tensors:
            name = reader.locate(tensor.name)
            if name is None:
                report.tensors.append(
                    TensorCheck(tensor.name, "missing", passed=False, note="missing from candidate")
                )
                continue
            located.add(name)
            if isinstance(reader, NF4Candidate) and not reader.quantized(tensor.name):
                report.tensors.append(
                    _check(tensor, base_ck, reader.checkpoint, opened, report.tolerance_ulp, via)
                )
            else:
                identical = _same_blocks(tensor, base_ck, reader)
                tol = report.tolerance_ulp
                check = _check_quantized(tensor, base_ck, reader, opened, tol, via)
                if identical is not None:  # kept in its type: the blocks must be the base's
                    check.exact_share, check.passed = float(identical), identical
                    check.note = "" if identical else "blocks differ from the base tensor"
                report.tensors.append(check)
            if progress:
                progress(tensor.nbytes, plan.nbytes)
        report.tensors += _extras(reader.extra(located))
    finally:
        for adapter in opened:
            adapter.close()


def _check_quantized(
    plan, base, reader, adapters, tol: float, via: list[Checkpoint]
) -> TensorCheck:
    """|dequantized - expected| <= format bound(expected, slack), elementwise; the slack is tol
    ulps of the source dtype plus the float32 merge's own error bound. A float file computed by
    subtraction from `via` has its half ulp taken at the largest magnitude it passed through, as
    every other candidate's ulps are."""
    import torch

    from loramerge.verify.quantized import FLOAT_TYPES, ulp_of

    values, bound, kind = reader.read(plan.name, tuple(plan.shape))
    values = as_matrix(values, plan)
    start, blocks, allowances = expected_blocks(plan, base, adapters, True)
    expected = as_matrix(torch.empty(tuple(plan.shape), dtype=torch.float64), plan)
    for r0, r1, block in blocks:
        expected[r0:r1] = torch.from_numpy(block)
    # a GGUF base merges in float32 straight into the file's type: no 16-bit rounding between
    source = torch.float32 if base.gguf else dtypes.to_torch(base.tensors[plan.source].dtype)
    w0 = np.asarray(start[0 : start.shape[0]], np.float64).reshape(expected.shape)
    scale = torch.maximum(torch.from_numpy(w0).abs(), expected.abs())
    slack = tol * ulp_of(scale, source)
    for r0, r1, allowance in allowances or ():
        slack[r0:r1] += torch.from_numpy(allowance)
    at = expected
    if kind in FLOAT_TYPES:
        for model in via:
            if plan.name in model.tensors and tuple(model.tensors[plan.name].shape) == plan.shape:
                passed = np.abs(np.asarray(model.read(plan.name), np.float64))
                at = torch.maximum(at.abs(), as_matrix(torch.from_numpy(passed), plan))
    allowed = bound(at, slack)
    error = (values - expected).abs()
    finite = bool(torch.isfinite(values).all())
    ratio = float((error / allowed).max()) if error.numel() else 0.0
    signal = float((expected**2).sum())
    noise = float((error**2).sum())
    snr = 10 * math.log10(signal / noise) if noise and signal else float("inf")
    passed = finite and ratio <= 1.0
    note = "" if passed else (f"{ratio:.3g}x its bound" if finite else "non-finite values")
    return TensorCheck(
        name=plan.name,
        kind="merged" if plan.modified else "untouched",
        dtype=kind,
        elements=error.numel(),
        max_abs=float(error.max()) if error.numel() else 0.0,
        rmse=math.sqrt(noise / max(error.numel(), 1)),
        exact_share=float((error == 0).double().mean()) if error.numel() else 1.0,
        passed=passed,
        note=note,
        snr_db=snr,
        bound_ratio=ratio,
    )


def _same_blocks(plan: TensorPlan, base: Checkpoint, reader) -> bool | None:
    """Whether an untouched tensor of a GGUF base, kept in its type, has the base's blocks
    (None when that does not apply: touched, retyped, or not a GGUF base and candidate)."""
    from loramerge.verify.quantized import GGUFCandidate

    if plan.modified or base.gguf is None or not isinstance(reader, GGUFCandidate):
        return None
    gname = base.gguf.gguf_names.get(plan.source)
    if gname is None:
        return None
    kind, stored = reader.blocks(plan.name)
    if kind != base.gguf.model.tensors[gname].qtype.name:
        return None
    return bool(np.array_equal(stored, base.gguf.model.read_blocks(gname)))


def _check(
    plan: TensorPlan,
    base: Checkpoint,
    candidate: Checkpoint,
    adapters: list[Adapter],
    tol: float,
    through: list[Checkpoint],
) -> TensorCheck:
    """Measure one candidate tensor against its expected value, a block of rows at a time."""
    info = candidate.tensors.get(plan.name)
    if info is None:
        return TensorCheck(plan.name, "missing", passed=False, note="missing from candidate")
    if tuple(info.shape) != tuple(plan.shape):
        note = f"shape {list(info.shape)}, expected {list(plan.shape)}"
        return TensorCheck(plan.name, "shape", info.dtype, passed=False, note=note)
    if not plan.modified:
        distance = _untouched_part(plan, base, candidate, through)
        return untouched_result(plan.name, info.dtype, distance, tol, bool(through))
    got, passed = _Flat(candidate, plan.name), _passed(plan, through)
    distance = Distance()
    split = by_numpy(plan, base)  # blocks of the terms alone, W0 added as they are measured
    start, blocks, allowances = expected_blocks(
        plan, base, adapters, got.dtype.itemsize >= 4, split
    )
    width = math.prod(plan.shape) // max(start.shape[0], 1)  # elements per row of the matrix
    for r0, r1, block in blocks:
        at, count = r0 * width, (r1 - r0) * width
        allowance = None if allowances is None else next(allowances)[2]
        candidate, through = got.read(at, count), [p.read(at, count) for p in passed]
        if split:
            distance.add_sum(candidate, start[r0:r1], block, through, allowance)
        else:
            distance.add(candidate, block, [start[r0:r1], *through], allowance)
    return merged_result(plan.name, info.dtype, distance, tol)


def merged_result(name: str, dtype: str, distance: Distance, tol: float) -> TensorCheck:
    """The row of a merged tensor: within `tol` ulps beyond the arithmetic bound, all finite."""
    within = distance.max_ulp_judged <= tol and distance.nonfinite == 0
    note = "" if within else f"{distance.max_ulp_judged:.3g} ulp"
    if distance.nonfinite:
        note = f"{distance.nonfinite} non-finite values"
    return _result(name, "merged", dtype, distance, within, note)


def untouched_result(
    name: str, dtype: str, distance: Distance, tol: float, through: bool
) -> TensorCheck:
    """The row of a tensor no adapter touches: the base's bits, or, when the candidate was
    computed from another model (an unmerge, `through`), within `tol` ulps of them."""
    exact = distance.exact == distance.elements
    ok = exact or (through and distance.max_ulp <= tol and not distance.nonfinite)
    note = "" if ok else "differs from the base tensor no adapter touches"
    return _result(name, "untouched", dtype, distance, ok, note)


def _untouched_part(
    plan: TensorPlan,
    base: Checkpoint,
    candidate: Checkpoint,
    through: list[Checkpoint],
    span: tuple[int, int] | None = None,
) -> Distance:
    """A tensor no adapter touches against the stored base (elements `span` = (start, count)
    of it, or all), a piece at a time: equal bytes are exact, and only the pieces that differ
    read the models the candidate passed through."""
    got, stored = _Flat(candidate, plan.name), _Flat(base, plan.source)
    passed, distance = _passed(plan, through), Distance()
    start, stop = (span[0], span[0] + span[1]) if span else (0, got.size)
    step = _PIECE_BYTES // max(got.dtype.itemsize, stored.dtype.itemsize)
    for at in range(start, stop, step):
        count = min(step, stop - at)
        mine, theirs = got.read(at, count), stored.read(at, count)
        if mine.dtype == theirs.dtype and same_bytes(mine, theirs):
            distance.add_identical(count)
            continue
        scale = [p.read(at, count) for p in passed]
        if mine.dtype == theirs.dtype:
            distance.add_stored(mine, theirs, scale)
        else:  # a changed dtype must still be the base rounded once
            distance.add(mine, theirs, scale)
    return distance


def _passed(plan: TensorPlan, through: list[Checkpoint]) -> list[_Flat]:
    """The tensor in each model the candidate was computed from that holds it in its shape."""
    return [
        _Flat(m, plan.name)
        for m in through
        if plan.name in m.tensors and tuple(m.tensors[plan.name].shape) == plan.shape
    ]


def _spans(plan: TensorPlan, candidate: Checkpoint) -> list[tuple[int, int] | None]:
    """The element ranges a tensor is checked in: whole (None), on one thread, but for a big
    tensor no adapter touches (an untied output head), which every thread compares a part of."""
    info = candidate.tensors.get(plan.name)
    if plan.modified or info is None or tuple(info.shape) != tuple(plan.shape):
        return [None]
    size = math.prod(plan.shape)
    step = max(1, _SPLIT_BYTES // dtypes.to_numpy(info.dtype).itemsize)
    if size <= step:
        return [None]
    return [(at, min(step, size - at)) for at in range(0, size, step)]


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold the same bytes; a piece that differs almost always differs in its
    first elements already (an unmerge's rounding residue), so those are compared first."""
    a, b = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    head = min(a.size, _HEAD_BYTES)
    words = head + (a.size - head) // 8 * 8  # the rest in 8-byte words: 3x the speed of bytes
    return (
        np.array_equal(a[:head], b[:head])
        and np.array_equal(a[head:words].view(np.uint64), b[head:words].view(np.uint64))
        and np.array_equal(a[words:], b[words:])
    )


_HEAD_BYTES = 4096


class _Flat:
    """One stored tensor, read a flat range of elements at a time (its raw bytes where they
    are stored as such, else the whole tensor once)."""

    def __init__(self, checkpoint: Checkpoint, name: str) -> None:
        self._checkpoint, self._name = checkpoint, name
        self._info = checkpoint.tensors[name]
        self._whole: np.ndarray | None = None
        self._buffer: np.ndarray | None = None
        self.dtype = dtypes.to_numpy(self._info.dtype)
        self.size = math.prod(self._info.shape)
        # a GGUF file's raw range holds its blocks in llama.cpp's layout, not these values
        gguf = getattr(checkpoint, "gguf", None)
        self._raw = None if gguf is not None else checkpoint.raw(name)

    def read(self, at: int, count: int) -> np.ndarray:
        """Elements at .. at + count of the flattened tensor (valid until the next read)."""
        if self._raw is None:
            if self._whole is None:
                self._whole = self._checkpoint.read(self._name).reshape(-1)
            return self._whole[at : at + count]
        if self._buffer is None or self._buffer.size < count:
            self._buffer = np.empty(count, self.dtype)
        out = self._buffer[:count]
        offset = self._raw.offset + at * self.dtype.itemsize
        read_exact(self._raw.fd, memoryview(out.view(np.uint8)), offset, self._info.path)
        return out


def _result(name, kind, dtype, distance: Distance, passed: bool, note: str) -> TensorCheck:
    kept = distance.figures  # NaN for those a verdict-only check did not keep
    maxima = not distance.bounded  # NaN where a gate placed elements without measuring them
    return TensorCheck(
        name=name,
        kind=kind,
        dtype=dtype,
        elements=distance.elements,
        max_abs=distance.max_abs if maxima else math.nan,
        max_ulp=distance.max_ulp if maxima else math.nan,
        max_ulp_at_value=distance.max_ulp_at_value if kept else math.nan,
        max_ulp_judged=distance.max_ulp_judged if maxima else math.nan,
        exact_share=distance.exact_share if kept else math.nan,
        rmse=distance.rmse if kept else math.nan,
        passed=passed,
        note=note,
    )
