"""The full float64 pass the fast checks must agree with: every figure, every element, in torch.

This is the weight check as it was before the float32 decision step (loramerge.compare), kept as
the tests' oracle and written independently of it: ulps from torch.frexp (the exponent of each
float64 value, no bit tricks), the correctly rounded value from loramerge.delta.round_once (the
torch rounding the merge itself uses), every element measured in float64. Two deliberate changes
from the old code: a ratio that is NaN (a NaN in the scale) counts as 0 for that element, where
the old code dropped the whole chunk's maximum; and a NaN candidate for a NaN expected value is
correctly rounded whatever its payload (the old code wanted torch's own NaN bits).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from loramerge import dtypes
from loramerge.delta import round_once

_FORMAT = {
    torch.bfloat16: (7, -126),
    torch.float16: (10, -14),
    torch.float32: (23, -126),
    torch.float64: (52, -1022),
}
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |magnitude|: 2^(floor(log2 |m|) - mantissa), subnormals included."""
    mantissa, emin = _FORMAT[dtype]
    _, exponent = torch.frexp(magnitude.abs())  # |m| = f * 2^e with f in [0.5, 1)
    exponent = torch.clamp(exponent.to(torch.float64) - 1, min=emin)
    exponent[magnitude == 0] = emin  # frexp(0) is (0, 0): zero has the subnormals' spacing
    spacing = torch.exp2(exponent - mantissa)
    return torch.where(torch.isfinite(magnitude), spacing, torch.inf)


class Float64Distance:
    """Drop-in for compare.Distance that measures every element in float64."""

    def __init__(self) -> None:
        self.elements = self.exact = self.nonfinite = 0
        self.max_abs = self.max_ulp = self.max_ulp_at_value = self.max_ulp_judged = 0.0
        self.squared_error = 0.0
        self.figures = True  # every figure kept (it has no verdict-only pass)
        self.bounded = False  # every element measured (it has no gate)

    def add(
        self,
        candidate: np.ndarray,
        expected: np.ndarray,
        start: Sequence[np.ndarray] = (),
        allowance: np.ndarray | None = None,
    ) -> None:
        """Every element of a block, in float64."""
        got = dtypes.as_torch(np.ascontiguousarray(candidate)).reshape(-1)
        want = torch.from_numpy(np.asarray(expected, np.float64)).reshape(-1)
        value = got.to(torch.float64)
        # an inf or NaN on either side that is not the same one on the other (any NaN is NaN)
        special = ~torch.isfinite(value) | ~torch.isfinite(want)
        same = (value == want) | (torch.isnan(value) & torch.isnan(want))
        self.nonfinite += int((special & ~same).sum())
        error = (value - want).abs().nan_to_num(nan=0.0, posinf=0.0)
        scale = want.abs()
        for other in start:
            magnitude = torch.from_numpy(np.asarray(other).astype(np.float64)).reshape(-1).abs()
            scale = torch.maximum(scale, magnitude)
        self.elements += got.numel()
        if got.numel():
            spacing = ulp(scale, got.dtype)
            self.max_abs = max(self.max_abs, float(error.max()))
            self.max_ulp = max(self.max_ulp, _max(error / spacing))
            beyond = error
            if allowance is not None:
                beyond = (error - torch.from_numpy(allowance).reshape(-1)).clamp(min=0)
            self.max_ulp_judged = max(self.max_ulp_judged, _max(beyond / spacing))
            at_value = error / ulp(want, got.dtype)
            self.max_ulp_at_value = max(self.max_ulp_at_value, _max(at_value))
        rounded = round_once(want, got.dtype)
        same = got.view(_INT[got.element_size()]) == rounded.view(_INT[got.element_size()])
        same |= value.isnan() & want.isnan()
        self.exact += int(same.sum())
        self.squared_error += float((error**2).sum())

    def add_sum(
        self,
        candidate: np.ndarray,
        base: np.ndarray,
        delta: np.ndarray,
        through: Sequence[np.ndarray] = (),
        allowance: np.ndarray | None = None,
    ) -> None:
        """A block whose expected value is base + delta, summed in float64; base in the scale."""
        with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as the check has it
            expected = np.asarray(base).astype(np.float64) + np.asarray(delta).reshape(base.shape)
        self.add(candidate, expected, [base, *through], allowance)

    def add_identical(self, elements: int) -> None:
        """Elements known to be bit-identical."""
        self.elements += elements
        self.exact += elements

    def add_stored(
        self, candidate: np.ndarray, expected: np.ndarray, start: Sequence[np.ndarray] = ()
    ) -> None:
        """A block against a stored expected value: measured like any other, every element."""
        self.add(candidate, np.asarray(expected).astype(np.float64), start)

    @property
    def exact_share(self) -> float:
        """Share of elements exactly the correctly rounded value."""
        return self.exact / self.elements if self.elements else 1.0

    @property
    def rmse(self) -> float:
        """Root mean square error."""
        return (self.squared_error / self.elements) ** 0.5 if self.elements else 0.0


def _max(ratios: torch.Tensor) -> float:
    return float(ratios.nan_to_num(nan=0.0).max())
