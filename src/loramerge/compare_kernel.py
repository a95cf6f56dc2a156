"""The weight check's float64 pass over every element, compiled with numba (one pass, no
temporaries): the figures `compare.Distance` keeps, for bfloat16 and float32 candidates.

Each element gets the figures `compare._settle` computes with numpy (the error in float64, ulps
from exponent bits; whether it is the correctly rounded value, decided here from its error in
ulps at the value rather than by rounding again), so nothing needs deciding in float32 first.
Imported only when a check runs.
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import overload

from loramerge.intrinsics import float32_of, float64_of, float_bits, wide_vectors


def _widened(x):
    """An element as float64: bfloat16 held as its uint16 bits, or float32 (typed below)."""


@overload(_widened, inline="always")
def _widened_typed(x):
    if x == types.uint16:
        return lambda x: np.float64(float32_of(np.int64(x) << 16))
    return lambda x: np.float64(x)


def _last_bit(got):
    """The lowest mantissa bit of a candidate element (typed below): 0 when it is even."""


@overload(_last_bit, inline="always")
def _last_bit_typed(got):
    if got == types.uint16:
        return lambda got: np.int64(got) & 1
    return lambda got: np.int64(float_bits(got)) & 1


_ABS = 0x7FFFFFFFFFFFFFFF
_INF = 0x7FF0000000000000


@njit(inline="always")
def _per_spacing(bits: int, mantissa: int, emin: int, finite: bool) -> float:
    """1 / the format's spacing at the magnitude whose float64 bits (sign cleared) are `bits`
    (`compare.ulp`): a power of two, so x times it is exactly x / spacing; 0 where the
    magnitude is not finite (spacing inf), unless `finite` says it is. The spacing's biased
    exponent is max(biased, 1023 + emin) - mantissa, so its reciprocal's is 2046 + mantissa
    minus that."""
    biased = bits >> 52
    per = float64_of((2046 + mantissa - max(biased, 1023 + emin)) << 52)
    return per if finite or biased < 2047 else 0.0


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
    # each call below is inlined with its flags constants, so the loop tests none of them; the
    # common two first assume every value finite, and measure again in full if one is not
    g, w, d, s, a, m, e, o = got, want, delta, scale, allowance, mantissa, emin, out
    if allowance.size > 0:
        _fold(g, w, d, s, a, m, e, o, split, scaled, True, False)
    elif split and not scaled:  # a merged tensor: W0 + its terms
        if not _fold(g, w, d, s, a, m, e, o, True, False, False, True):
            _fold(g, w, d, s, a, m, e, o, True, False, False, False)
    elif scaled and not split:  # an unmerged one against the base, the merged model its scale
        if not _fold(g, w, d, s, a, m, e, o, False, True, False, True):
            _fold(g, w, d, s, a, m, e, o, False, True, False, False)
    else:
        _fold(g, w, d, s, a, m, e, o, split, scaled, False, False)


@njit(inline="always", fastmath={"reassoc"})
def _fold(
    got, want, delta, scale, allowance, mantissa, emin, out, split, scaled, judged_by, finite
):
    """`measure`'s loop; without an allowance the judged maximum is the ulp maximum. With
    `finite`, the loop leaves out what only non-finite values need, and when the candidate or
    the expected value has one it folds nothing in and returns False.

    An element is the correctly rounded value of w when it is nearer than half a spacing at
    |w| (no other number of the format is: the spacing below |w|'s binade is finer only under
    its lower end, w's own side), or exactly half when its last bit is even (a tie goes to the
    even neighbour), with w's sign (a zero keeps it); a finite element's error near that half
    is exact in float64. Non-finite: inf is right from |w| >= `overflow` (the largest finite
    number plus half its spacing; both formats top out at 2^128), NaN from NaN."""
    overflow = float_bits((2.0 - 2.0 ** (-mantissa - 1)) * 2.0**127)
    exact, nonfinite = 0, 0
    # max_abs comes in finite (a non-finite error counts as 0 below), so with `finite` it ends
    # inf or NaN (bits >= _INF) exactly when the candidate or the expected value has one
    max_abs, max_ulp = float_bits(out[2]), 0  # max_ulp: this call's, so judged can share it
    max_at_value, max_judged = float_bits(out[4]), float_bits(out[5])
    sq = 0.0
    for i in range(got.size):
        value = _widened(got[i])
        given = _widened(want[i])
        w = given + delta[i] if split else given
        value_bits = float_bits(value) & _ABS
        want_bits = float_bits(w) & _ABS
        error = abs(value - w)
        if not finite:
            # an inf or NaN on either side that is not the same one on the other: NaN and inf
            # count 0 in the error below, so only this count fails them
            special = (value_bits >= _INF) | (want_bits >= _INF)
            same = (float_bits(value) == float_bits(w)) | (value_bits > _INF) & (want_bits > _INF)
            nonfinite += special & ~same
            error = error if error < np.inf else 0.0  # nan_to_num(nan=0, posinf=0)
        other = _widened(scale[i]) if scaled else given
        magnitude = max(want_bits, float_bits(other) & _ABS)
        # a scale array's own inf or NaN is not in the candidate or the expected value
        per = _per_spacing(magnitude, mantissa, emin, finite and not scaled)
        max_abs = max(max_abs, float_bits(error))
        max_ulp = max(max_ulp, float_bits(error * per))
        if judged_by:
            beyond = error - allowance[i]
            beyond = beyond if beyond > 0.0 else 0.0  # a NaN allowance counts as 0
            max_judged = max(max_judged, float_bits(beyond * per))
        at_value = error * _per_spacing(want_bits, mantissa, emin, finite)
        max_at_value = max(max_at_value, float_bits(at_value))
        same_sign = (float_bits(value) ^ float_bits(w)) >= 0
        half = (at_value < 0.5) | ((at_value == 0.5) & (_last_bit(got[i]) == 0))
        if finite:
            exact += half & same_sign
        else:
            both = (value_bits < _INF) & (want_bits < _INF)
            rounds_up = (value_bits == _INF) & (want_bits >= overflow) & (want_bits <= _INF)
            exact += ((both & half) | rounds_up) & same_sign | (value_bits > _INF) & (
                want_bits > _INF
            )
        sq += error * error
    if finite and max_abs >= _INF:
        return False
    out[0] += exact
    out[1] += nonfinite
    out[2] = float64_of(max_abs)
    out[3] = max(out[3], float64_of(max_ulp))
    out[4] = float64_of(max_at_value)
    out[5] = float64_of(max_judged if judged_by else max(max_judged, max_ulp))
    out[6] += sq
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def judge(got, want, delta, mantissa, emin, out):
    """`measure`'s verdict alone, for a check that only passes or refuses (a rebuild's check
    of its source): the largest error and the largest error in ulps of `got` (uint16 bfloat16
    bits) against `want` + `delta`, want's magnitudes in the scale, folded into out[2] and
    out[3]: the values `measure` gives there, bit for bit, in half its time (no share correctly
    rounded, no ulps at the value, no squared error). False, with `out` untouched, when a value
    is not finite (`measure` then counts it)."""
    wide_vectors()
    max_abs, max_ulp = float_bits(out[2]), float_bits(out[3])
    for i in range(got.size):
        given = _widened(want[i])
        w = given + delta[i]
        error = abs(_widened(got[i]) - w)
        magnitude = max(float_bits(w) & _ABS, float_bits(given) & _ABS)
        max_abs = max(max_abs, float_bits(error))
        max_ulp = max(max_ulp, float_bits(error * _per_spacing(magnitude, mantissa, emin, True)))
    if max_abs >= _INF:  # inf or NaN exactly when got or want + delta has one
        return False
    out[2], out[3] = float64_of(max_abs), float64_of(max_ulp)
    return True


# Relative slack for each float64 rounding in `_within` and in the float64 pass it stands for
# (docs/verify.md, "A rebuild's gate from float32 terms").
_SLACK = 2.0**-50


@njit(inline="always")
def _within(got, given, term, bound, tol, mantissa, emin):
    """Whether a bfloat16 element (`got`, uint16 bits) is within `tol` ulps of W0 (`given`, as
    float64) + its terms, as the float64 pass measures it, for every terms value within `bound`
    of `term`: the largest error it allows, over the smallest ulp scale."""
    w = given + term
    error = abs(_widened(got) - w)
    magnitude = abs(w)
    slack = bound + _SLACK * magnitude
    least = max((magnitude - slack) * (1.0 - _SLACK), abs(given))
    spacing = float64_of((max(float_bits(least) >> 52, 1023 + emin) - mantissa) << 52)
    return (error + slack) * (1.0 + _SLACK) <= tol * spacing


@njit(cache=True, nogil=True, error_model="numpy")
def judge_bounded(
    got, want, terms, stride, rows_bound, cols_bound, left, row_step, rank_step, right, tol,
    mantissa, emin, flags, words,
):  # fmt: skip
    """Whether every element of `got` (uint16 bfloat16 bits, a block of rows) is within `tol`
    ulps of `want` + the LoRA term left @ right as the float64 pass (`judge`) measures it,
    decided from the float32 `terms` (rows `stride` elements apart): each within rows_bound[i]
    * cols_bound[j] of the float64 terms. An element that bound cannot place within is
    computed again in float64 from `left` (element (i, k) at i * row_step + k * rank_step: a
    factor or its transpose, uncopied) and `right` (rank x columns), with that sum's own bound;
    False when one is still not placed within (the caller then measures the block in full: a
    refusal, a value that is not finite, or a case too close to call). `flags`: a row's worth
    of scratch bytes (rounded up to a multiple of 8), and `words` the same memory as uint64:
    the row's unplaced columns are found eight at a time."""
    wide_vectors()
    rows, cols = rows_bound.size, cols_bound.size
    rank = right.size // max(cols, 1)
    for i in range(rows):
        bound = rows_bound[i]
        unplaced = 0
        # a row at a time, as slices: LLVM vectorizes these loops, not one over i * stride + j
        candidate, base = got[i * cols : (i + 1) * cols], want[i * cols : (i + 1) * cols]
        spread = terms[i * stride : i * stride + cols]
        for j in range(cols):
            size = bound * cols_bound[j]
            term = np.float64(spread[j])
            out = not _within(candidate[j], _widened(base[j]), term, size, tol, mantissa, emin)
            flags[j] = out
            unplaced += out
        if unplaced == 0:
            continue
        for word in range(words.size):  # the few elements near zero, where float32 is too wide
            if words[word] == 0:
                continue
            for j in range(8 * word, min(8 * word + 8, cols)):
                if flags[j] == 0:
                    continue
                term, size = 0.0, 0.0
                for r in range(rank):
                    x, y = left[i * row_step + r * rank_step], right[r * cols + j]
                    term += x * y
                    size += abs(x) * abs(y)
                # this sum and the float64 pass's, in any order: each within (rank + 1) 2^-53 size
                size *= 4.0 * (rank + 2) * 2.0**-53
                k = i * cols + j
                if not _within(got[k], _widened(want[k]), term, size, tol, mantissa, emin):
                    return False
    return True


@njit(cache=True, nogil=True)
def round_to_bfloat16(values, out):
    """out (uint16 bits) = float32 `values` rounded to nearest even bfloat16, bit for bit the
    cast `blocked.merge_rows` makes with ml_dtypes (a NaN becomes the quiet NaN 0x7FC0 with its
    sign; a carry past the largest finite number gives inf), in a quarter of its time."""
    wide_vectors()
    for i in range(values.size):
        out[i] = _bfloat16_bits(values[i])


@njit(cache=True, nogil=True)
def round_sum_to_bfloat16(w0, delta, out, cols, stride):
    """out = the float32 sum of `w0` (uint16 bfloat16 bits) and float32 `delta`, rounded as
    `round_to_bfloat16` rounds: the bits of widening, adding and rounding in three passes
    (`blocked.merge_rows`), in one. `w0` and `out` hold rows of `cols` elements; `delta`'s rows
    start `stride` elements apart (a padded BLAS output, `blocked.STRIDE_PAD`)."""
    wide_vectors()
    for i in range(out.size // max(cols, 1)):
        # a row at a time, as slices: LLVM vectorizes these loops, not one over i * stride + j
        base, terms = w0[i * cols : (i + 1) * cols], delta[i * stride : i * stride + cols]
        into = out[i * cols : (i + 1) * cols]
        for j in range(cols):
            wide = float32_of(np.int64(base[j]) << 16)
            total = wide + terms[j]
            # NaN + NaN is the first operand's NaN on x86 and ARM, as numpy adds; LLVM may swap
            # the operands of an add, so W0's NaN is chosen here, not left to the add
            into[j] = _bfloat16_bits(wide if wide != wide else total)


@njit(inline="always")
def _bfloat16_bits(value):
    """A float32 rounded to nearest even bfloat16, as its uint16 bits."""
    bits = np.uint32(float_bits(value)) & np.uint32(0xFFFFFFFF)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> 16
    nan = np.uint32(0x7FC0) | ((bits >> np.uint32(16)) & np.uint32(0x8000))
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint16(nan if is_nan else rounded)


# --- the kernels as C functions (`kernels` keeps their machine code): pointers and sizes, so a
# later process calls them through ctypes without importing numba
_TYPES = {"u16": types.uint16, "f32": types.float32, "f64": types.float64}


def c_function(name: str):
    """The C function `kernels.kernel` asks for by name ("measure-u16-u16-f64": the kernel,
    then the dtypes of its arrays that vary), compiled now by numba."""
    kind, *codes = name.split("-")
    p, n, f64 = types.CPointer, types.intp, types.float64
    if kind == "measure":
        g, w, s = (_TYPES[c] for c in codes)
        signature = types.void(p(g), p(w), p(f64), n, p(s), n, p(f64), n, n, n, p(f64), n)

        def call(got, want, delta, nd, scale, ns, allowance, na, mantissa, emin, out, size):
            measure(
                *(carray(got, size), carray(want, size), carray(delta, nd)),
                *(carray(scale, ns), carray(allowance, na), mantissa, emin, carray(out, 7)),
            )

    elif kind == "judge":
        signature = types.int32(p(types.uint16), p(types.uint16), p(f64), n, n, p(f64), n)

        def call(got, want, delta, mantissa, emin, out, size):
            w = (carray(got, size), carray(want, size), carray(delta, size))
            return np.int32(judge(*w, mantissa, emin, carray(out, 7)))

    elif kind == "bounded":
        u16, f32, u8, u64 = p(types.uint16), p(types.float32), p(types.uint8), p(types.uint64)
        signature = types.int32(
            *(u16, u16, f32, n, p(f64), n, p(f64), n, p(f64), n, n, n, p(f64), n, f64, n, n),
            *(u8, u64, n),
        )

        def call(
            got, want, terms, stride, u, rows, v, cols, left, extent, row, step, right, rank, tol,
            m, e, flags, words, nwords,
        ):  # fmt: skip
            size = rows * cols
            spread = (rows - 1) * stride + cols if rows else 0
            block = (carray(got, size), carray(want, size), carray(terms, spread), stride)
            bounds = (carray(u, rows), carray(v, cols))
            factors = (carray(left, extent), row, step, carray(right, rank * cols))
            scratch = (carray(flags, 8 * nwords), carray(words, nwords))
            return np.int32(judge_bounded(*block, *bounds, *factors, tol, m, e, *scratch))

    elif kind == "round":
        signature = types.void(p(types.float32), p(types.uint16), n)

        def call(values, out, size):
            round_to_bfloat16(carray(values, size), carray(out, size))

    else:
        signature = types.void(p(types.uint16), p(types.float32), p(types.uint16), n, n, n)

        def call(w0, delta, out, size, cols, stride):
            rows = size // max(cols, 1)
            extent = (rows - 1) * stride + cols if rows else 0
            w = carray(w0, size), carray(delta, extent), carray(out, size)
            round_sum_to_bfloat16(*w, cols, stride)

    return cfunc(signature, nogil=True)(call)


def machine_code(function) -> bytes:
    """A compiled C function's object code (ELF on Linux), as numba's own cache keeps it."""
    return function._library.serialize_using_object_code()[2][0]
