"""The weight check: recompute every expected tensor in float64 and measure the candidate.

Candidate and base are streamed one tensor at a time, merged tensors in row blocks, so memory
stays bounded like a merge. Tensors no adapter touches must be bit-identical to the base (or, if
the candidate changed their dtype, exactly the base rounded once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loramerge import dtypes
from loramerge.adapter import Adapter, load_adapter
from loramerge.compare import Distance, ulp
from loramerge.delta import add_bias, merged_blocks
from loramerge.jsonfile import read_json_object
from loramerge.plan import TensorPlan, as_matrix, build_plan
from loramerge.source.checkpoint import Checkpoint, open_weights
from loramerge.transform import tensor_inputs
from loramerge.verify.quantized import NF4Candidate, open_quantized

_CPU = torch.device("cpu")


@dataclass
class TensorCheck:
    """The verdict on one tensor."""

    name: str
    kind: str  # "merged", "untouched", "missing", "extra", "shape"
    dtype: str = ""
    elements: int = 0
    max_abs: float = 0.0
    max_ulp: float = 0.0
    max_ulp_at_value: float = 0.0
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
        worst = max((t.max_ulp for t in merged), default=0.0)
        exact = sum(t.exact_share * t.elements for t in merged)
        total = sum(t.elements for t in merged) or 1
        line = (
            f"{len(merged)} merged tensors within {worst:.3g} ulp (tolerance "
            f"{self.tolerance_ulp:g}; {exact / total:.4%} of elements correctly rounded), "
            f"{sum(t.passed for t in untouched)}/{len(untouched)} untouched tensors bit-identical"
        )
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
            "ulp_definition": "ulps of the candidate dtype at max(|W0|, |expected|)",
            "tensors": [asdict(t) for t in self.tensors],
            "forward": self.forward,
        }


def verify_weights(
    candidate: Path,
    base: Path,
    adapters: list[Path],
    weights: list[float] | None = None,
    *,
    tolerance_ulp: float = 1.0,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
    through: Path | None = None,
) -> VerifyReport:
    """Check CANDIDATE == BASE + sum w_i * adapter_i, tensor by tensor, against float64.

    `through`: a checkpoint the candidate was computed from (the merged model of an unmerge);
    its magnitudes join max(|W0|, |expected|) in the ulp scale, as values the element passed.
    """
    candidate, base = Path(candidate), Path(base)
    weights = list(weights or [1.0] * len(adapters))
    config = read_json_object(base / "config.json") if (base / "config.json").is_file() else None
    report = VerifyReport(
        str(candidate),
        str(base),
        [{"source": str(a), "weight": w} for a, w in zip(adapters, weights, strict=True)],
        tolerance_ulp,
    )
    quantized = open_quantized(candidate, allow_pickle)
    if quantized is not None:
        with open_weights(base, stem="model", allow_pickle=allow_pickle) as base_ck:
            try:
                _check_all_quantized(
                    report, quantized, base_ck, config, adapters, weights, progress
                )
            finally:
                quantized.close()
        return report
    opened: list[Adapter] = []
    with (
        open_weights(base, stem="model", allow_pickle=allow_pickle) as base_ck,
        open_weights(candidate, stem="model", allow_pickle=allow_pickle) as cand_ck,
        open_weights(through or candidate, stem="model", allow_pickle=allow_pickle) as via,
    ):
        try:
            opened = [load_adapter(a, allow_pickle=allow_pickle) for a in adapters]
            plan = build_plan(base_ck, config, opened, weights, None)
            planned = {t.name for t in plan.tensors}
            for tensor in plan.tensors:
                passed = via if through is not None else None
                report.tensors.append(
                    _check(tensor, base_ck, cand_ck, opened, tolerance_ulp, passed)
                )
                if progress:
                    progress(tensor.nbytes, plan.nbytes)
            report.tensors += _extras(sorted(set(cand_ck.tensors) - planned))
        finally:
            for adapter in opened:
                adapter.close()
    return report


def _extras(names: list[str]) -> list[TensorCheck]:
    return [TensorCheck(n, "extra", passed=False, note="not in base + adapters") for n in names]


def _check_all_quantized(report, reader, base_ck, config, adapters, weights, progress) -> None:
    """The weight check of a GGUF or NF4 candidate: each tensor against its format's bound."""
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
                    _check(tensor, base_ck, reader.checkpoint, opened, report.tolerance_ulp, None)
                )
            else:
                report.tensors.append(
                    _check_quantized(tensor, base_ck, reader, opened, report.tolerance_ulp)
                )
            if progress:
                progress(tensor.nbytes, plan.nbytes)
        report.tensors += _extras(reader.extra(located))
    finally:
        for adapter in opened:
            adapter.close()


def _check_quantized(plan, base, reader, adapters, tol: float) -> TensorCheck:
    """|dequantized - expected| <= format bound + tol ulps of the source dtype, elementwise."""
    values, bound, kind = reader.read(plan.name, tuple(plan.shape))
    values = as_matrix(values, plan)
    start, blocks = _expected_blocks(plan, base, adapters)
    expected = as_matrix(torch.empty(tuple(plan.shape), dtype=torch.float64), plan)
    for r0, r1, block in blocks:
        expected[r0:r1] = block
    source = dtypes.to_torch(base.tensors[plan.source].dtype)
    scale = _larger(start, expected.abs())
    allowed = bound(expected) + tol * ulp(scale, source)
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


def _check(
    plan: TensorPlan,
    base: Checkpoint,
    candidate: Checkpoint,
    adapters: list[Adapter],
    tol: float,
    through: Checkpoint | None,
) -> TensorCheck:
    """Measure one candidate tensor against its expected value."""
    info = candidate.tensors.get(plan.name)
    if info is None:
        return TensorCheck(plan.name, "missing", passed=False, note="missing from candidate")
    if tuple(info.shape) != tuple(plan.shape):
        note = f"shape {list(info.shape)}, expected {list(plan.shape)}"
        return TensorCheck(plan.name, "shape", info.dtype, passed=False, note=note)
    got = as_matrix(_tensor(candidate, plan.name), plan)
    passed = None
    if through is not None and plan.name in through.tensors:
        passed = as_matrix(_tensor(through, plan.name).to(torch.float64).abs(), plan)
    distance = Distance()
    if not plan.modified:
        stored = _tensor(base, plan.source)
        if got.dtype == stored.dtype and torch.equal(_bytes(got), _bytes(stored)):
            distance.add_identical(got.numel())
        else:  # a changed dtype must still be the base rounded once
            distance.add(got, stored, _larger(stored, passed))
        exact = distance.exact == distance.elements
        # Computed from another model (an unmerge): its rounding may remain, within tolerance.
        ok = exact or (through is not None and distance.max_ulp <= tol and not distance.nonfinite)
        note = "" if ok else "differs from the base tensor no adapter touches"
        return _result(plan.name, "untouched", info.dtype, distance, ok, note)
    start, blocks = _expected_blocks(plan, base, adapters)
    for r0, r1, block in blocks:
        scale = _larger(start[r0:r1], None if passed is None else passed[r0:r1])
        distance.add(got[r0:r1], block, scale)
    within = distance.max_ulp <= tol and distance.nonfinite == 0
    note = "" if within else f"{distance.max_ulp:.3g} ulp"
    if distance.nonfinite:
        note = f"{distance.nonfinite} non-finite values"
    return _result(plan.name, "merged", info.dtype, distance, within, note)


def _expected_blocks(plan: TensorPlan, base: Checkpoint, adapters: list[Adapter]):
    """(W0, blocks of (r0, r1, expected rows in float64)): what one tensor should hold."""
    start, terms, biases = tensor_inputs(plan, base, adapters, _CPU, torch.float64)
    if terms:
        return start, merged_blocks(start, terms, torch.float64)
    if biases:
        expected = add_bias(start, biases, compute_dtype=torch.float64, out_dtype=torch.float64)
    else:
        expected = start.to(torch.float64)
    return start, iter([(0, expected.shape[0], expected)])


def _larger(start: torch.Tensor, passed: torch.Tensor | None) -> torch.Tensor:
    """Elementwise max(|W0|, |value passed through|), the ulp scale with `expected`."""
    magnitude = start.to(torch.float64).abs()
    return (
        magnitude
        if passed is None or passed.shape != magnitude.shape
        else magnitude.maximum(passed)
    )


def _tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    return dtypes.as_torch(checkpoint.read(name))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _result(name, kind, dtype, distance: Distance, passed: bool, note: str) -> TensorCheck:
    return TensorCheck(
        name=name,
        kind=kind,
        dtype=dtype,
        elements=distance.elements,
        max_abs=distance.max_abs,
        max_ulp=distance.max_ulp,
        max_ulp_at_value=distance.max_ulp_at_value,
        exact_share=distance.exact_share,
        rmse=distance.rmse,
        passed=passed,
        note=note,
    )
