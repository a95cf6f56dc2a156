"""The quantizers' hot loops compiled with numba: the K-quants' searches, and Q8_0.

Each K-quant search (make_qkx2/q3/qx_quants) takes sub-blocks as the columns of a (sub-block
length, count) float32 array and runs llama.cpp's loop for every column at once: the element
loop is the outer one and the column loop the inner one, so each column's sums still accumulate
left to right in float32 as in C while the compiler vectorizes across columns. Columns are taken
a cache-sized tile at a time. No fastmath: LLVM then keeps C's rounding (no fused multiply-add,
no reassociation).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from loramerge.intrinsics import float_bits, wide_vectors

from .common import F32, GROUP_MAX_EPS

MAGIC = F32(12582912.0)  # 1.5 * 2**23
TILE = 256  # columns per tile: a tile's float32 working set stays within L2


@njit(inline="always")
def _nearest_int(v: np.float32) -> int:
    """ggml's nearest_int: the low mantissa bits of v + 1.5 * 2**23, as an integer."""
    return (float_bits(v + MAGIC) & 0x7FFFFF) - 0x400000


@njit(inline="always")
def _clip(v: int, lo: int, hi: int) -> int:
    return min(max(v, lo), hi)


@njit(cache=True, nogil=True, error_model="numpy")
def make_qkx2_quants(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants per column: (scale, the_min, L) for x ~ scale * L - the_min."""
    wide_vectors()
    n, count = x.shape
    scale = np.zeros(count, F32)
    the_min = np.zeros(count, F32)
    L = np.zeros((n, count), np.int32)
    laux = np.empty((n, TILE), np.int32)
    mn = np.empty(TILE, F32)
    mx = np.empty(TILE, F32)
    sum_w = np.empty(TILE, F32)
    sum_x = np.empty(TILE, F32)
    best = np.empty(TILE, F32)
    iscale = np.empty(TILE, F32)
    sum_l = np.empty(TILE, F32)
    sum_l2 = np.empty(TILE, F32)
    sum_xl = np.empty(TILE, F32)
    this_scale = np.empty(TILE, F32)
    this_min = np.empty(TILE, F32)
    cur = np.empty(TILE, F32)
    take = np.empty(TILE, np.bool_)
    flat = np.empty(TILE, np.bool_)
    fmax = F32(nmax)
    for t0 in range(0, count, TILE):
        m = min(TILE, count - t0)
        for c in range(m):
            v = x[0, t0 + c]
            mn[c] = v
            mx[c] = v
            sum_w[c] = w[0, t0 + c]
            sum_x[c] = w[0, t0 + c] * v
        for i in range(1, n):
            for c in range(m):
                v = x[i, t0 + c]
                mn[c] = min(mn[c], v)  # Python's min keeps the first unless v < it, as C does
                mx[c] = max(mx[c], v)
                sum_w[c] += w[i, t0 + c]
                sum_x[c] += w[i, t0 + c] * v
        for c in range(m):
            if mn[c] > 0:
                mn[c] = 0
            flat[c] = mx[c] == mn[c]
            iscale[c] = fmax / (mx[c] - mn[c])
            scale[t0 + c] = F32(1) / iscale[c]
            best[c] = 0
        for i in range(n):
            for c in range(m):
                li = _clip(_nearest_int(iscale[c] * (x[i, t0 + c] - mn[c])), 0, nmax)
                L[i, t0 + c] = li
                diff = scale[t0 + c] * F32(li) + mn[c] - x[i, t0 + c]
                diff = abs(diff) if use_mad else diff * diff
                best[c] += w[i, t0 + c] * diff
        for step in range(nstep + 1):
            grid = F32(rmin) + F32(rdelta) * F32(step) + fmax
            for c in range(m):
                iscale[c] = grid / (mx[c] - mn[c])
                sum_l[c] = 0
                sum_l2[c] = 0
                sum_xl[c] = 0
            for i in range(n):
                for c in range(m):
                    li = _clip(_nearest_int(iscale[c] * (x[i, t0 + c] - mn[c])), 0, nmax)
                    laux[i, c] = li
                    wl = w[i, t0 + c] * F32(li)
                    sum_l[c] += wl
                    sum_l2[c] += wl * F32(li)
                    sum_xl[c] += wl * x[i, t0 + c]
            for c in range(m):
                det = sum_w[c] * sum_l2[c] - sum_l[c] * sum_l[c]
                this_scale[c] = (sum_w[c] * sum_xl[c] - sum_x[c] * sum_l[c]) / det
                this_min[c] = (sum_l2[c] * sum_x[c] - sum_l[c] * sum_xl[c]) / det
                if this_min[c] > 0:
                    this_min[c] = 0
                    this_scale[c] = sum_xl[c] / sum_l2[c]
                take[c] = det > 0
                cur[c] = 0
            for i in range(n):
                for c in range(m):
                    diff = this_scale[c] * F32(laux[i, c]) + this_min[c] - x[i, t0 + c]
                    diff = abs(diff) if use_mad else diff * diff
                    cur[c] += w[i, t0 + c] * diff
            for c in range(m):
                take[c] = take[c] and cur[c] < best[c] and not flat[c]
                if take[c]:
                    best[c] = cur[c]
                    scale[t0 + c] = this_scale[c]
                    mn[c] = this_min[c]
            for i in range(n):
                for c in range(m):
                    if take[c]:
                        L[i, t0 + c] = laux[i, c]
        for c in range(m):
            the_min[t0 + c] = -mn[c]
            if flat[c]:
                scale[t0 + c] = 0
        for i in range(n):
            for c in range(m):
                if flat[c]:
                    L[i, t0 + c] = 0
    return scale, the_min, L


@njit(inline="always")
def _first_absmax(x, t0, m, mx, amax):
    """Per column of the tile: the first element of largest magnitude, and that magnitude."""
    for c in range(m):
        mx[c] = 0
        amax[c] = 0
    for i in range(x.shape[0]):
        for c in range(m):
            ax = abs(x[i, t0 + c])
            if ax > amax[c]:
                amax[c] = ax
                mx[c] = x[i, t0 + c]


@njit(inline="always")
def _qx_sums(x, t0, m, nmax, iscale, lq, sumlx, suml2):
    """One make_qx_quants pass over a tile: lq = clip(_nearest_int(iscale * x)) and its sums."""
    for c in range(m):
        sumlx[c] = 0
        suml2[c] = 0
    for i in range(x.shape[0]):
        for c in range(m):
            v = x[i, t0 + c]
            li = _clip(_nearest_int(iscale[c] * v), -nmax, nmax - 1)
            lq[i, c] = li
            w = v * v
            sumlx[c] += w * v * F32(li)
            suml2[c] += w * F32(li) * F32(li)


@njit(cache=True, nogil=True, error_model="numpy")
def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1, no weights) per column: (scale, L + nmax)."""
    wide_vectors()
    n, count = x.shape
    scale = np.zeros(count, F32)
    L = np.zeros((n, count), np.int32)
    lq = np.empty((n, TILE), np.int32)
    mx = np.empty(TILE, F32)
    amax = np.empty(TILE, F32)
    iscale = np.empty(TILE, F32)
    sumlx = np.empty(TILE, F32)
    suml2 = np.empty(TILE, F32)
    best = np.empty(TILE, F32)
    take = np.empty(TILE, np.bool_)
    fmax = F32(nmax)
    for t0 in range(0, count, TILE):
        m = min(TILE, count - t0)
        _first_absmax(x, t0, m, mx, amax)
        for c in range(m):
            iscale[c] = -fmax / mx[c]
        _qx_sums(x, t0, m, nmax, iscale, lq, sumlx, suml2)
        for c in range(m):
            scale[t0 + c] = sumlx[c] / suml2[c] if suml2[c] != 0 else F32(0)
            best[c] = scale[t0 + c] * sumlx[c]
        for i in range(n):
            for c in range(m):
                L[i, t0 + c] = lq[i, c] + nmax
        for step in range(-9, 10):
            if step == 0:
                continue
            grid = -(fmax + F32(0.1) * F32(step))
            for c in range(m):
                iscale[c] = grid / mx[c]
            _qx_sums(x, t0, m, nmax, iscale, lq, sumlx, suml2)
            for c in range(m):
                take[c] = suml2[c] > 0 and sumlx[c] * sumlx[c] > best[c] * suml2[c]
                if take[c]:
                    scale[t0 + c] = sumlx[c] / suml2[c]
                    best[c] = scale[t0 + c] * sumlx[c]
            for i in range(n):
                for c in range(m):
                    if take[c]:
                        L[i, t0 + c] = lq[i, c] + nmax
        for c in range(m):
            if amax[c] < GROUP_MAX_EPS:
                scale[t0 + c] = 0
        for i in range(n):
            for c in range(m):
                if amax[c] < GROUP_MAX_EPS:
                    L[i, t0 + c] = 0
    return scale, L


@njit(cache=True, nogil=True, error_model="numpy")
def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=true) per column: (scale, L + nmax), refined element by element."""
    wide_vectors()
    n, count = x.shape
    scale = np.zeros(count, F32)
    L = np.zeros((n, count), np.int32)
    mx = np.empty(TILE, F32)
    amax = np.empty(TILE, F32)
    iscale = np.empty(TILE, F32)
    sumlx = np.empty(TILE, F32)
    suml2 = np.empty(TILE, F32)
    for t0 in range(0, count, TILE):
        m = min(TILE, count - t0)
        _first_absmax(x, t0, m, mx, amax)
        for c in range(m):
            iscale[c] = F32(-nmax) / mx[c]
        _qx_sums(x, t0, m, nmax, iscale, L[:, t0:], sumlx, suml2)
        # C stops after a pass that changes nothing; a further pass would change nothing either.
        for _ in range(5):
            for i in range(n):
                for c in range(m):
                    v = x[i, t0 + c]
                    w = v * v
                    li = L[i, t0 + c]
                    slx = sumlx[c] - w * v * F32(li)
                    if slx > 0:
                        sl2 = suml2[c] - w * F32(li) * F32(li)
                        new = _clip(_nearest_int(v * sl2 / slx), -nmax, nmax - 1)
                        if new != li:
                            slx += w * v * F32(new)
                            sl2 += w * F32(new) * F32(new)
                            if sl2 > 0 and slx * slx * suml2[c] > sumlx[c] * sumlx[c] * sl2:
                                L[i, t0 + c] = new
                                sumlx[c] = slx
                                suml2[c] = sl2
        for c in range(m):
            zero = amax[c] < GROUP_MAX_EPS
            scale[t0 + c] = 0 if zero or not suml2[c] > 0 else sumlx[c] / suml2[c]
        for i in range(n):
            for c in range(m):
                L[i, t0 + c] = 0 if amax[c] < GROUP_MAX_EPS else L[i, t0 + c] + nmax
    return scale, L


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q8_0_ref on blocks (rows of 32): (d, q) with q = roundf(x * (1 / d))."""
    wide_vectors()
    n, size = x.shape
    d = np.empty(n, F32)
    q = np.empty((n, size), np.int8)
    for b in range(n):
        amax = F32(0)
        for j in range(size):
            a = abs(x[b, j])
            amax = amax if amax > a else a  # C's MAX(amax, fabsf(v))
        d[b] = amax / F32(127)
        inv = F32(1) / d[b] if d[b] != 0 else F32(0)
        for j in range(size):
            v = x[b, j] * inv
            t = np.trunc(v)
            if abs(v - t) >= F32(0.5):  # roundf: halves away from zero
                t += np.copysign(F32(1), v)
            q[b, j] = np.int8(t)
    return d, q
