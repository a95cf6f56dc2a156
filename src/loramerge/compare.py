"""Distances between a stored tensor and its exact (float64) value, in units a user can judge.

An error is counted in ulps of the stored dtype taken at the largest magnitude the element
passed through, max(|W0|, |expected|): a sum cannot be more exact than the rounding of its
inputs, and near a cancellation (expected ~ 0 while |W0| is not) an ulp at the tiny result would
call correct float arithmetic wrong. The ulp at the value itself and the share of elements that
are exactly the correctly rounded value are reported too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramerge.delta import round_once

_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at each |magnitude| (float64), subnormals included."""
    tiny = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(magnitude.abs().clamp(min=tiny)))
    return torch.exp2(exponent - _MANTISSA_BITS[dtype])


@dataclass
class Distance:
    """Running statistics of candidate - expected over the blocks of one tensor."""

    elements: int = 0
    exact: int = 0
    nonfinite: int = 0
    max_abs: float = 0.0
    max_ulp: float = 0.0  # in ulps at max(|W0|, |expected|)
    max_ulp_at_value: float = 0.0
    # ulps left after taking off each element's allowance for float32 arithmetic (see `add`)
    max_ulp_judged: float = 0.0
    squared_error: float = 0.0
    squared_expected: float = 0.0

    def add(
        self,
        candidate: torch.Tensor,
        expected: torch.Tensor,
        start: torch.Tensor | None = None,
        allowance: torch.Tensor | None = None,
    ) -> None:
        """Fold in a tensor or block; `start` is its W0 (None: the expected value alone).

        `allowance`: per element, an absolute error the arithmetic may make before the final
        rounding (float32 sums stored in float32); `max_ulp_judged` counts only what exceeds it.
        Works through flat chunks so the float64 temporaries stay small whatever the size.
        """
        given = [t for t in (start, allowance) if t is not None]
        flat = [t.reshape(-1) for t in (candidate, expected, *given)]
        for i in range(0, candidate.numel(), _CHUNK):
            chunk = iter([t[i : i + _CHUNK] for t in flat])
            got, want = next(chunk), next(chunk)
            self._add(
                got,
                want,
                next(chunk) if start is not None else None,
                next(chunk) if allowance is not None else None,
            )

    def add_identical(self, elements: int) -> None:
        """Fold in elements already known to be bit-identical to the expected ones."""
        self.elements += elements
        self.exact += elements

    def _add(self, candidate, expected, start, allowance) -> None:
        expected = expected.to(torch.float64)
        got = candidate.to(torch.float64)
        finite = torch.isfinite(got) | ~torch.isfinite(expected)
        self.nonfinite += int((~finite).sum())
        error = (got - expected).abs().nan_to_num(nan=0.0, posinf=0.0)
        scale = expected.abs() if start is None else torch.maximum(expected.abs(), start.abs())
        self.elements += candidate.numel()
        if candidate.numel():  # empty tensors add nothing
            self.max_abs = max(self.max_abs, float(error.max()))
            spacing = ulp(scale, candidate.dtype)
            self.max_ulp = max(self.max_ulp, float((error / spacing).max()))
            beyond = error if allowance is None else (error - allowance).clamp(min=0)
            self.max_ulp_judged = max(self.max_ulp_judged, float((beyond / spacing).max()))
            at_value = error / ulp(expected, candidate.dtype)
            self.max_ulp_at_value = max(self.max_ulp_at_value, float(at_value.max()))
        rounded = round_once(expected, candidate.dtype)
        self.exact += int(_same_bits(candidate, rounded).sum())
        self.squared_error += float((error**2).sum())
        self.squared_expected += float((expected.nan_to_num(nan=0.0) ** 2).sum())

    @property
    def exact_share(self) -> float:
        """Share of elements that are exactly the correctly rounded expected value."""
        return self.exact / self.elements if self.elements else 1.0

    @property
    def rmse(self) -> float:
        """Root mean square error."""
        return (self.squared_error / self.elements) ** 0.5 if self.elements else 0.0


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    view = _INT_VIEW[a.element_size()]
    return a.contiguous().view(view) == b.contiguous().view(view)
