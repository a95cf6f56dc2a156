"""Distances between a stored tensor and its exact (float64) value, in units a user can judge.

An error is counted in ulps of the stored dtype taken at the largest magnitude the element
passed through, max(|W0|, |expected|): a sum cannot be more exact than the rounding of its
inputs, and near a cancellation (expected ~ 0 while |W0| is not) an ulp at the tiny result would
call correct float arithmetic wrong. The ulp at the value itself and the share of elements that
are exactly the correctly rounded value are reported too.

The figures are those of an elementwise float64 pass. bfloat16 and float32 candidates go through
that pass compiled (`compare_kernel`, numba); most elements of a float16 candidate are decided
from the float32 rounding of the expected value, in integer steps of its bits, and only the
elements that cannot be decided that way are settled in float64 (docs/verify.md gives the
argument). No torch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from loramerge import kernels

# dtype -> (mantissa bits, smallest normal exponent)
_FORMAT = {
    np.dtype(ml_dtypes.bfloat16): (7, -126),
    np.dtype(np.float16): (10, -14),
    np.dtype(np.float32): (23, -126),
    np.dtype(np.float64): (52, -1022),
}
_CHUNK = 1 << 18  # elements per step: every temporary stays a few MiB whatever the tensor
# float32 steps kept clear of a rounding boundary: the float64 value is within one step of its
# float32 rounding, so two steps decide (and a few more spare the fallback in `_add_fast`)
_WINDOW = 4


def format_of(dtype: np.dtype) -> tuple[int, int]:
    """(mantissa bits, smallest normal exponent) of a float dtype the checks measure."""
    return _FORMAT[np.dtype(dtype)]


def nonfinite_mismatches(value: np.ndarray, want: np.ndarray) -> int:
    """Elements where the candidate or the expected value (float64) is inf or NaN and the other
    is not the same one (NaN matches any NaN): the error counts those as 0, so this count is
    what fails them."""
    special = ~np.isfinite(value) | ~np.isfinite(want)
    same = (value == want) | (np.isnan(value) & np.isnan(want))
    return int(np.count_nonzero(special & ~same))


def ulp(magnitude: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Spacing of `dtype` numbers at each |magnitude| (float64), from the exponent bits; inf
    where the magnitude is not finite."""
    mantissa, emin = _FORMAT[np.dtype(dtype)]
    biased = np.abs(np.asarray(magnitude, np.float64)).view(np.int64) >> 52
    exponent = np.maximum(biased - 1023, emin)  # subnormals (and zero) share the smallest spacing
    exponent -= mantissa
    spacing = np.ldexp(1.0, exponent.astype(np.int32))
    spacing[biased == 2047] = np.inf
    return spacing


def round_once(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 `x` rounded once to `dtype` (bfloat16 and float16 through float32 rounded to odd).

    A cast through float32 would round twice; truncating to float32 and setting the last bit
    when anything was cut makes the second rounding the only one (float32 keeps at least two
    more bits than either 16-bit format).
    """
    dtype = np.dtype(dtype)
    if dtype.itemsize != 2:
        return x.astype(dtype)
    with np.errstate(all="ignore"):
        single = x.astype(np.float32)
        back = single.astype(np.float64)
        bits = single.view(np.int32)
        bits -= np.abs(back) > np.abs(x)  # one step toward zero: truncation
        bits |= back != x  # sticky bit: the value was inexact
    return single.astype(dtype)


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
    # False once a block was judged alone (`add_verdict`): exact, max_ulp_at_value and
    # squared_error then leave elements out, and mean nothing
    figures: bool = True
    # True once elements were placed within the tolerance without being measured
    # (`add_within`): max_abs and the ulp maxima then leave them out too
    bounded: bool = False

    def add(
        self,
        candidate: np.ndarray,
        expected: np.ndarray,
        start: Sequence[np.ndarray] = (),
        allowance: np.ndarray | None = None,
    ) -> None:
        """Fold in a tensor or block against `expected` (read as float64); the magnitudes of the
        `start` arrays (W0, every model the candidate was computed from) join the ulp scale.

        `allowance`: per element, an absolute error the arithmetic may make before the final
        rounding (float32 sums stored in float32); `max_ulp_judged` counts only what exceeds it.
        Works through flat chunks so the temporaries stay small whatever the size.
        """
        flat = [np.asarray(t).reshape(-1) for t in (candidate, expected, *start)]
        allow = None if allowance is None else np.asarray(allowance).reshape(-1)
        if self._add_compiled(flat, allow):
            return
        fast = allow is None and candidate.dtype in _FAST
        for i in range(0, flat[0].size, _CHUNK):
            got, want, *scale = (t[i : i + _CHUNK] for t in flat)
            want = want.astype(np.float64, copy=False)
            if fast:
                self._add_fast(got, want, scale)
            else:
                self._settle(got, want, scale, None if allow is None else allow[i : i + _CHUNK])

    def add_sum(
        self,
        candidate: np.ndarray,
        base: np.ndarray,
        delta: np.ndarray,
        through: Sequence[np.ndarray] = (),
        allowance: np.ndarray | None = None,
    ) -> None:
        """`add` of a block whose expected value is base + delta (W0 as stored, the adapters'
        float64 terms), summed in float64 as it is measured, so no expected array is built;
        base joins the ulp scale, with the `through` arrays."""
        # base's own array is the kernel's scale unless `through` adds others
        flat = [np.asarray(t).reshape(-1) for t in (candidate, base, *through)]
        if through:
            flat.insert(2, flat[1])
        allow = None if allowance is None else np.asarray(allowance).reshape(-1)
        delta = np.asarray(delta, np.float64).reshape(-1)
        if not self._add_compiled(flat, allow, delta):
            with np.errstate(all="ignore"):  # NaN and inf as IEEE says
                expected = base.astype(np.float64) + delta.reshape(base.shape)
            self.add(candidate, expected, [base, *through], allowance)

    def add_verdict(self, candidate: np.ndarray, base: np.ndarray, delta: np.ndarray) -> None:
        """`add_sum` for a check that only passes or refuses (a rebuild's check of its source):
        max_abs and max_ulp, so the verdict, as `add_sum` finds them, in half its time where
        `compare_kernel.judge` takes the block (bfloat16, every value finite); the other
        figures are not kept (`figures`)."""
        self.figures = False
        got, want = np.asarray(candidate).reshape(-1), np.asarray(base).reshape(-1)
        if got.dtype == want.dtype == _BF16 and delta.dtype == np.float64:
            out = np.array([0, 0, self.max_abs, self.max_ulp, 0, 0, 0], np.float64)
            mantissa, emin = _FORMAT[_BF16]
            terms = np.ascontiguousarray(delta).reshape(-1)
            bits = (np.ascontiguousarray(a).view(np.uint16) for a in (got, want))
            if kernels.judge(*bits, terms, mantissa, emin, out):
                self.elements += got.size
                self.max_abs, self.max_ulp = float(out[2]), float(out[3])
                self.max_ulp_judged = max(self.max_ulp_judged, self.max_ulp)
                return
        self.add_sum(candidate, base, delta)

    def add_within(self, elements: int) -> None:
        """Fold in elements a gate placed within its tolerance without measuring them
        (`verify.gate`): they count, and no figure holds them."""
        self.elements += elements
        self.figures, self.bounded = False, True

    def fold(self, other: Distance) -> None:
        """Fold in the figures of other elements measured apart (another block)."""
        self.figures = self.figures and other.figures
        self.bounded = self.bounded or other.bounded
        self.elements += other.elements
        self.exact += other.exact
        self.nonfinite += other.nonfinite
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_ulp = max(self.max_ulp, other.max_ulp)
        self.max_ulp_at_value = max(self.max_ulp_at_value, other.max_ulp_at_value)
        self.max_ulp_judged = max(self.max_ulp_judged, other.max_ulp_judged)
        self.squared_error += other.squared_error

    def add_identical(self, elements: int) -> None:
        """Fold in elements already known to be bit-identical to the expected ones."""
        self.elements += elements
        self.exact += elements

    def add_stored(
        self, candidate: np.ndarray, expected: np.ndarray, start: Sequence[np.ndarray] = ()
    ) -> None:
        """Fold in a block whose expected value is stored in the candidate's own dtype (a tensor
        no adapter touches): equal bits count as exact; only the others are measured."""
        flat = [np.asarray(t).reshape(-1) for t in (candidate, expected, *start)]
        if self._add_compiled(flat, None):  # equal bits count as exact there too
            return
        view = _UINT[candidate.dtype.itemsize]
        for i in range(0, flat[0].size, _CHUNK):
            got, want, *scale = (t[i : i + _CHUNK] for t in flat)
            differ = np.flatnonzero(got.view(view) != want.view(view))
            self.add_identical(got.size - differ.size)
            if differ.size:
                self._settle(
                    got[differ], want[differ].astype(np.float64), [s[differ] for s in scale]
                )

    def _add_compiled(
        self, flat: list[np.ndarray], allowance: np.ndarray | None, delta: np.ndarray | None = None
    ) -> bool:
        """Every element in one compiled float64 pass (`compare_kernel`), when it takes these
        arrays: a bfloat16 or float32 candidate, float inputs. flat is (candidate, expected,
        *scale arrays); the expected value is flat[1], plus `delta` when given, and with no
        scale arrays flat[1]'s own magnitudes are the scale."""
        if flat[0].dtype not in _COMPILED or not all(a.dtype in _KERNEL_INPUT for a in flat[1:]):
            return False
        got, want, *scale = (
            np.ascontiguousarray(a).view(np.uint16) if a.dtype == _BF16 else np.ascontiguousarray(a)
            for a in flat
        )
        if len(scale) > 1:  # one array of the largest magnitudes (a NaN or inf wins, as in ulp)
            scale = [np.maximum.reduce([np.abs(a.astype(np.float64)) for a in flat[2:]])]
        allow = np.empty(0) if allowance is None else np.ascontiguousarray(allowance, np.float64)
        plus = np.empty(0) if delta is None else np.ascontiguousarray(delta)
        out = np.array(
            [0, 0, self.max_abs, self.max_ulp, self.max_ulp_at_value, self.max_ulp_judged, 0],
            np.float64,
        )
        mantissa, emin = _FORMAT[flat[0].dtype]
        own = scale[0] if scale else np.empty(0, want.dtype)
        kernels.measure(got, want, plus, own, allow, mantissa, emin, out)
        self.elements += got.size
        self.exact += int(out[0])
        self.nonfinite += int(out[1])
        self.max_abs, self.max_ulp = float(out[2]), float(out[3])
        self.max_ulp_at_value, self.max_ulp_judged = float(out[4]), float(out[5])
        self.squared_error += float(out[6])
        return True

    def _add_fast(self, got: np.ndarray, want: np.ndarray, scale: list[np.ndarray]) -> None:
        """A bfloat16 or float16 chunk: decide in float32 steps, settle the rest in float64.

        The float64 error of every element is exact (max_abs and the squared error need no
        deciding). An element whose float32-rounded expected value lies within `half - _WINDOW`
        steps of the candidate is correctly rounded, and its ulp error is at most
        (half - _WINDOW + 1) / 2**shift, below that of any settled element closer to a boundary.
        """
        shift = 23 - _FORMAT[got.dtype][0]
        half = 1 << (shift - 1)
        wide, error, steps, far = _scratch(got.size)
        with np.errstate(all="ignore"):
            np.copyto(wide, got)
            np.subtract(wide, want, out=error)  # the float64 error, as a float64 pass has it
            low, high = error.min(initial=0.0), error.max(initial=0.0)
            if not (np.isfinite(low) and np.isfinite(high)):
                self._settle(got, want, scale)  # non-finite values: the whole chunk in float64
                return
            np.copyto(steps.view(np.float32), want, casting="unsafe")  # rounded to nearest
            np.subtract(steps, wide.view(np.int32), out=steps)
            np.add(steps, half - _WINDOW, out=steps)  # |d| <= c  <=>  0 <= d + c <= 2c
            np.greater(steps.view(np.uint32), 2 * (half - _WINDOW), out=far)
        self.squared_error += float(np.dot(error, error))
        self.max_abs = max(self.max_abs, -float(low), float(high))
        undecided = np.flatnonzero(far)
        measured = Distance()
        measured._settle(got[undecided], want[undecided], [s[undecided] for s in scale])
        decided_exact = got.size - undecided.size
        bound = (half - _WINDOW + 1) / (1 << shift)  # the decided elements' largest ulp error
        reached = min(
            max(self.max_ulp, measured.max_ulp),
            max(self.max_ulp_at_value, measured.max_ulp_at_value),
        )
        if reached < bound:
            rest = np.flatnonzero(~far)  # a decided element may hold a maximum: measure them
            measured._settle(got[rest], want[rest], [s[rest] for s in scale])
            decided_exact = 0
        self.elements += got.size
        self.exact += measured.exact + decided_exact
        self.max_ulp = max(self.max_ulp, measured.max_ulp)
        self.max_ulp_judged = max(self.max_ulp_judged, measured.max_ulp_judged)
        self.max_ulp_at_value = max(self.max_ulp_at_value, measured.max_ulp_at_value)

    def _settle(
        self,
        got: np.ndarray,
        want: np.ndarray,
        scale: list[np.ndarray],
        allowance: np.ndarray | None = None,
    ) -> None:
        """The float64 pass over a chunk (or the gathered elements float32 could not decide)."""
        with np.errstate(all="ignore"):
            value = got.astype(np.float64)
            self.nonfinite += nonfinite_mismatches(value, want)
            error = np.abs(value - want)
            np.nan_to_num(error, copy=False, nan=0.0, posinf=0.0)
            magnitude = np.abs(want)
            for other in scale:
                np.maximum(magnitude, np.abs(other.astype(np.float64)), out=magnitude)
            self.elements += got.size
            if got.size:
                spacing = ulp(magnitude, got.dtype)
                self.max_abs = max(self.max_abs, float(error.max()))
                self.max_ulp = max(self.max_ulp, float((error / spacing).max()))
                beyond = error if allowance is None else np.maximum(error - allowance, 0.0)
                self.max_ulp_judged = max(self.max_ulp_judged, float((beyond / spacing).max()))
                at_value = error / ulp(want, got.dtype)
                self.max_ulp_at_value = max(self.max_ulp_at_value, float(at_value.max()))
            rounded = round_once(want, got.dtype)
        view = _UINT[got.dtype.itemsize]
        same = got.view(view) == rounded.view(view)
        same |= np.isnan(value) & np.isnan(want)  # NaN from NaN, whatever its payload
        self.exact += int(np.count_nonzero(same))
        self.squared_error += float(np.dot(error, error))

    @property
    def exact_share(self) -> float:
        """Share of elements that are exactly the correctly rounded expected value."""
        return self.exact / self.elements if self.elements else 1.0

    @property
    def rmse(self) -> float:
        """Root mean square error."""
        return (self.squared_error / self.elements) ** 0.5 if self.elements else 0.0


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's buffers for `_add_fast` (float32, float64, int32, bool), n long: reused,
    so no chunk pays for fresh pages."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None or buffers[0].size < n:
        buffers = _local.buffers = tuple(
            np.empty(_CHUNK, t) for t in (np.float32, np.float64, np.int32, np.bool_)
        )
    return tuple(b[:n] for b in buffers)


_local = threading.local()
_BF16 = np.dtype(ml_dtypes.bfloat16)
_FAST = frozenset({_BF16, np.dtype(np.float16)})
_COMPILED = frozenset({_BF16, np.dtype(np.float32)})  # the candidates compare_kernel takes
_KERNEL_INPUT = _COMPILED | {np.dtype(np.float64)}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
