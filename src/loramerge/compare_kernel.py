"""The weight check's float64 pass over every element, compiled with numba (one pass, no
temporaries): the figures `compare.Distance` keeps, for bfloat16 and float32 candidates.

Each element is measured exactly as `compare._settle` measures it with numpy (the error in
float64, ulps from exponent bits, the correctly rounded value by rounding to odd in float32),
so nothing needs deciding in float32 first. Imported only when a check runs.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from loramerge.intrinsics import float32_of, float64_of, float_bits, wide_vectors


def _widened(x):
    """An element as float64: bfloat16 held as its uint16 bits, or float32 (typed below)."""


@overload(_widened, inline="always")
def _widened_typed(x):
    if x == types.uint16:
        return lambda x: np.float64(float32_of(np.int64(x) << 16))
    return lambda x: np.float64(x)


def _is_nearest(got, want):
    """Whether `got` is `want` (float64) rounded once to got's format (typed below)."""


@overload(_is_nearest, inline="always")
def _is_nearest_typed(got, want):
    if got == types.uint16:
        return lambda got, want: np.int64(got) == _bf16_nearest(want)
    return lambda got, want: float_bits(np.float32(want)) == float_bits(got)


_ABS = 0x7FFFFFFFFFFFFFFF
_INF = 0x7FF0000000000000


@njit(inline="always")
def _per_spacing(bits: int, mantissa: int, emin: int) -> float:
    """1 / the format's spacing at the magnitude whose float64 bits (sign cleared) are `bits`
    (`compare.ulp`): a power of two, so x times it is exactly x / spacing; 0 where the
    magnitude is not finite (spacing inf)."""
    biased = bits >> 52
    exponent = max(biased - 1023, emin) - mantissa
    return float64_of(np.int64(1023 - exponent) << 52) if biased < 2047 else 0.0


@njit(inline="always")
def _bf16_nearest(want: float) -> int:
    """`compare.round_once(want, bfloat16)` as uint16 bits: float32 rounded to odd, then to
    nearest even (bfloat16's own cast, NaN apart: a NaN is compared as NaN)."""
    single = np.float32(want)
    back = np.float64(single)
    bits = np.int64(float_bits(single)) & 0xFFFFFFFF
    if abs(back) > abs(want):
        bits -= 1
    if back != want:
        bits |= 1
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


# fastmath "reassoc" alone: only the squared error's sum may be reordered (so it vectorizes);
# no flag lets the compiler assume away NaN or inf.
@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def measure(got, want, delta, scale, allowance, mantissa, emin, out):
    """Fold every element of `got` (uint16 bfloat16 bits or float32) against `want` (the same,
    or float64), plus `delta` (float64) when it is not empty, into `out`: (exact, nonfinite,
    max_abs, max_ulp, max_ulp_at_value, max_ulp_judged, squared error); counts and the squared
    error add, maxima take the larger.

    `scale`: an array (uint16 bfloat16 bits, float32 or float64) whose magnitudes join |want|
    in the ulp scale; empty: `want`'s own array is the scale (W0 when `delta` is given);
    `allowance`: float64 per element, or empty.
    The loop has no branches, so it vectorizes: non-negative floats compare as their bits, so
    the maxima are integer maxima of bits, and a NaN or inf in the scale (exponent 2047) wins
    such a maximum as np.maximum lets it win.
    """
    wide_vectors()
    split, scaled = delta.size > 0, scale.size > 0
    if allowance.size > 0:  # each call below is inlined with its flag a constant
        _fold(got, want, delta, scale, allowance, mantissa, emin, out, split, scaled, True)
    else:
        _fold(got, want, delta, scale, allowance, mantissa, emin, out, split, scaled, False)


@njit(inline="always", fastmath={"reassoc"})
def _fold(got, want, delta, scale, allowance, mantissa, emin, out, split, scaled, judged_by):
    """`measure`'s loop; without an allowance the judged maximum is the ulp maximum."""
    exact, nonfinite = 0, 0
    max_abs, max_ulp = float_bits(out[2]), 0  # max_ulp: this call's, so judged can share it
    max_at_value, max_judged = float_bits(out[4]), float_bits(out[5])
    sq = 0.0
    for i in range(got.size):
        value = _widened(got[i])
        given = _widened(want[i])
        w = given + delta[i] if split else given
        value_bits = float_bits(value) & _ABS
        want_bits = float_bits(w) & _ABS
        nonfinite += (value_bits >= _INF) & (want_bits < _INF)
        error = abs(value - w)
        error = error if error < np.inf else 0.0  # nan_to_num(nan=0, posinf=0)
        other = _widened(scale[i]) if scaled else given
        magnitude = max(want_bits, float_bits(other) & _ABS)
        per = _per_spacing(magnitude, mantissa, emin)
        max_abs = max(max_abs, float_bits(error))
        max_ulp = max(max_ulp, float_bits(error * per))
        if judged_by:
            beyond = error - allowance[i]
            beyond = beyond if beyond > 0.0 else 0.0  # a NaN allowance counts as 0
            max_judged = max(max_judged, float_bits(beyond * per))
        at_value = error * _per_spacing(want_bits, mantissa, emin)
        max_at_value = max(max_at_value, float_bits(at_value))
        exact += _is_nearest(got[i], w) | ((value_bits > _INF) & (want_bits > _INF))
        sq += error * error
    out[0] += exact
    out[1] += nonfinite
    out[2] = float64_of(max_abs)
    out[3] = max(out[3], float64_of(max_ulp))
    out[4] = float64_of(max_at_value)
    out[5] = float64_of(max_judged if judged_by else max(max_judged, max_ulp))
    out[6] += sq
