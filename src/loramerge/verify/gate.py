"""A rebuild's check of its source (a gate: it only passes or refuses), decided from float32
terms where plain LoRA allows it.

The float64 pass (`compare_kernel.judge`) adds each element's LoRA term, summed in float64, to
W0 and measures the bfloat16 candidate in ulps. For one factor pair over the whole tensor,
W = W0 + L @ R (the coefficient folded into B, as `expected.float64_factors` folds it), the
terms summed in float32 instead are within

    2 (r + 6) 2^-24 max_k |L_ik| sum_k |R_kj|

of the float64 pass's, whatever order either sums in. An element whose error, widened by that
bound, is within the tolerance at the smallest ulp scale the bound allows is within it in the
float64 pass too. The few the bound cannot place (values near zero, whose ulps are tiny) are
summed again in float64 with that sum's own bound; a block with one still not placed is left
to the float64 pass, as is every block of a tensor that fails. So the verdict is the float64
pass's; only the figures of the elements placed this way are not kept (docs/verify.md).
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np

from loramerge import kernels
from loramerge.blocked import STRIDE_PAD, padded_rows
from loramerge.compare import format_of

_MANTISSA, _EMIN = format_of(ml_dtypes.bfloat16)
_local = threading.local()
_ROWS = 1 << 16  # rows of a factor taken at a time for its bound


class Float32Gate:
    """The float32 terms of one tensor and the bound that places each element."""

    def __init__(self, left: np.ndarray, right: np.ndarray) -> None:
        """W's terms are left @ right, both float64 (rows x r, r x columns); `left` may be a
        factor's transpose, which is kept as a view (an embedding's A has a row per token)."""
        rank = left.shape[1]
        self._left, self._right = left, np.ascontiguousarray(right, np.float64)
        self._left32 = left.astype(np.float32)  # in left's layout: a transpose stays one
        self._right32 = self._right.astype(np.float32)
        # the float32 roundings of L and R, then the float32 and the float64 sums, in any
        # order: (r + 4) 2^-24 sum_k |L_ik||R_kj| at most; this bound is twice that, or more
        largest = np.empty(left.shape[0])
        for r0 in range(0, left.shape[0], _ROWS):  # no temporary the size of the factor
            largest[r0 : r0 + _ROWS] = np.abs(left[r0 : r0 + _ROWS]).max(axis=1, initial=0)
        self._rows_bound = 2 * (rank + 6) * 2.0**-24 * largest
        self._cols_bound = np.abs(self._right).sum(axis=0)

    @classmethod
    def of(cls, factors: list, shape: tuple[int, int]) -> Float32Gate | None:
        """The gate of a tensor whose terms (`expected.float64_factors`) are one factor pair
        covering every row, as the matrix `shape`; None for any other."""
        if len(factors) != 1:
            return None
        a, b, transposed, at = factors[0]
        left, right = (a.T, b.T) if transposed else (b, a)
        if at != 0 or (left.shape[0], right.shape[1]) != tuple(shape):
            return None
        return cls(left, right)

    def passes(self, first: int, candidate: np.ndarray, base: np.ndarray, tol: float) -> bool:
        """Whether rows first.. of the candidate (bfloat16, flat) are all within `tol` ulps of
        the base's rows + the terms, as the float64 pass would find; False when that is not
        certain here (the block then goes through the float64 pass)."""
        cols = self._right.shape[1]
        rows = candidate.size // cols
        terms = padded_rows(_scratch(rows * (cols + STRIDE_PAD)), rows, cols)
        np.matmul(self._left32[first : first + rows], self._right32, out=terms)
        got, want = (np.ascontiguousarray(a).reshape(-1).view(np.uint16) for a in (candidate, base))
        return kernels.judge_bounded(
            got,
            want,
            terms,
            self._rows_bound[first : first + rows],
            self._cols_bound,
            self._left[first : first + rows],
            self._right,
            tol,
            _MANTISSA,
            _EMIN,
        )


def _scratch(n: int) -> np.ndarray:
    """This thread's float32 terms buffer, `n` elements of it (rows padded apart)."""
    buffer = getattr(_local, "terms", None)
    if buffer is None or buffer.size < n:
        buffer = _local.terms = np.empty(n, np.float32)
    return buffer[:n]
