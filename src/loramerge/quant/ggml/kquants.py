"""ggml's K-quants (Q2_K to Q6_K): quantize_row_q*_K_ref without an importance matrix, as bytes.

Each function takes blocks of 256 float32 values (rows of a (n, 256) array) and works on the
sub-blocks as columns of a (sub-block length, count) array, in the same order and float32
arithmetic as the C code (sums accumulate left to right): the per-sub-block searches in compiled
loops (`compiled`), the steps around them as numpy operations over all sub-blocks at once.
"""

from __future__ import annotations

import numpy as np

from .common import F32, GROUP_MAX_EPS, first_absmax, fp16, half_at, nearest_int, seqsum, u8

QK_K = 256


def _columns(x: np.ndarray, size: int) -> np.ndarray:
    """(n, 256) blocks -> (size, n * 256 / size): one sub-block per column."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _rows(cols: np.ndarray) -> np.ndarray:
    """Inverse of _columns: (size, count) -> (n, 256)."""
    return np.ascontiguousarray(cols.T).reshape(-1, QK_K)


def _positive_max(a: np.ndarray) -> np.ndarray:
    """Per row: C's `if (v > m) m = v` from m = 0, so never -0.0."""
    m = a.max(axis=1)
    return np.where(m > 0, m, F32(0))


def _search():
    """The numba-compiled searches (`compiled`), imported only when a K-quant is written."""
    from . import compiled

    return compiled


def _requantize(
    x: np.ndarray, L: np.ndarray, d: np.ndarray, offset: np.ndarray, lo: int, hi: int
) -> np.ndarray:
    """For sub-blocks with d != 0: L = clip(nearest_int((x + offset) / d), lo, hi)."""
    fresh = np.clip(nearest_int((x + offset) / d), lo, hi)
    return np.where(d != 0, fresh, L)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Per 128 values: byte l holds values l, l + 32, l + 64, l + 96 in bit pairs."""
    g = L.reshape(-1, 2, 4, 32)
    return (g[:, :, 0] | g[:, :, 1] << 2 | g[:, :, 2] << 4 | g[:, :, 3] << 6).astype(np.uint8)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins in 12 bytes (the inverse of get_scale_min_k4)."""
    out = np.zeros((ls.shape[0], 12), np.int32)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out.astype(np.uint8)


def _scale_min_k(
    x: np.ndarray, nmax: int, rmin: float, nstep: int
) -> tuple[np.ndarray, np.ndarray]:
    """The Q4_K/Q5_K front half: sub-block fits, 6-bit scales and mins, fp16 super-scales, L."""
    xc = _columns(x, 32)
    av_x = np.sqrt(seqsum(xc * xc) / F32(32))
    scales, mins, L = _search().make_qkx2_quants(
        xc, av_x + np.abs(xc), nmax, rmin, 0.1, nstep, False
    )
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    d_bits, d = fp16(max_scale / F32(63))
    m_bits, dmin = fp16(max_min / F32(63))
    sub_d = (d[:, None] * ls.astype(F32)).reshape(-1)
    sub_m = (dmin[:, None] * lm.astype(F32)).reshape(-1)
    L = _rows(_requantize(xc, L, sub_d, sub_m, 0, nmax))
    return u8(d_bits[:, None], m_bits[:, None], _pack_scales_k4(ls, lm)), L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: 8 sub-blocks of 32, 4-bit quants with 6-bit scales and mins."""
    head, L = _scale_min_k(x, 15, -1.0, 20)
    g = L.reshape(-1, 4, 2, 32)
    return u8(head, (g[:, :, 0] | g[:, :, 1] << 4).astype(np.uint8).reshape(-1, 128))


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref: as Q4_K with 5-bit quants, the fifth bit in qh."""
    head, L = _scale_min_k(x, 31, -0.5, 15)
    g = L.reshape(-1, 4, 2, 32)
    high = (g >> 4).astype(np.uint8)
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    qh = (high << shifts).sum(axis=(1, 2), dtype=np.uint8)
    low = g & 15
    return u8(head, qh, (low[:, :, 0] | low[:, :, 1] << 4).astype(np.uint8).reshape(-1, 128))


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q2_K_ref: 16 sub-blocks of 16, 2-bit quants with 4-bit scales and mins."""
    xc = _columns(x, 16)
    scales, mins, L = _search().make_qkx2_quants(xc, np.abs(xc), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    iscale = F32(15) / max_scale[:, None]
    imin = F32(15) / max_min[:, None]
    sc = np.where(max_scale[:, None] > 0, nearest_int(iscale * scales) & 0xFF, 0)
    sc = np.where(max_min[:, None] > 0, (sc | (nearest_int(imin * mins) << 4)) & 0xFF, sc)
    d_bits, d = fp16(max_scale / F32(15))
    m_bits, dmin = fp16(max_min / F32(15))
    sub_d = (d[:, None] * (sc & 0xF).astype(F32)).reshape(-1)
    sub_m = (dmin[:, None] * (sc >> 4).astype(F32)).reshape(-1)
    L = _rows(_requantize(xc, L, sub_d, sub_m, 0, 3))
    return u8(sc.astype(np.uint8), _pack_2bit(L).reshape(-1, 64), d_bits[:, None], m_bits[:, None])


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q3_K_ref: 16 sub-blocks of 16, 3-bit quants with 6-bit signed scales."""
    xc = _columns(x, 16)
    scales, L = _search().make_q3_quants(xc, 4)
    scales = scales.reshape(-1, 16)
    max_scale, _ = first_absmax(scales.T)
    iscale = F32(-32) / max_scale
    q = nearest_int(iscale[:, None] * scales)
    q = np.clip(((q + 128) & 0xFF) - 128, -32, 31) + 32
    q = np.where(max_scale[:, None] != 0, q, 0)
    packed = np.zeros((q.shape[0], 12), np.int32)
    packed[:, :8] = (q[:, :8] & 0xF) | ((q[:, 8:] & 0xF) << 4)
    high = (q >> 4).reshape(-1, 4, 4)
    packed[:, 8:] = high[:, 0] | high[:, 1] << 2 | high[:, 2] << 4 | high[:, 3] << 6
    d_bits, d = fp16(np.where(max_scale != 0, F32(1) / iscale, F32(0)))
    sub_d = (d[:, None] * (q - 32).astype(F32)).reshape(-1)
    L = _rows(_requantize(xc, L - 4, sub_d, F32(0), -4, 3) + 4)
    upper = L > 3
    hmask = upper.reshape(-1, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None]
    L = np.where(upper, L - 4, L)
    return u8(
        hmask.sum(axis=1, dtype=np.uint8),
        _pack_2bit(L).reshape(-1, 64),
        packed.astype(np.uint8),
        d_bits[:, None],
    )


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: 16 sub-blocks of 16, 6-bit quants with 8-bit signed scales."""
    xc = _columns(x, 16)
    scales, L = _search().make_qx_quants(xc, 32)
    scales = scales.reshape(-1, 16)
    max_scale, max_abs = first_absmax(scales.T)
    iscale = F32(-128) / max_scale
    d_bits, d = fp16(F32(1) / iscale)
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales))
    sc = ((sc + 128) & 0xFF) - 128
    sub_d = (d[:, None] * sc.astype(F32)).reshape(-1)
    L = _rows(_requantize(xc, L - 32, sub_d, F32(0), -32, 31) + 32)
    g = L.reshape(-1, 2, 4, 32)
    low = g & 0xF
    ql = np.concatenate(
        [low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], axis=2
    )
    qh = (g >> 4) << (2 * np.arange(4)).reshape(1, 1, 4, 1)
    out = u8(
        ql.astype(np.uint8).reshape(-1, 128),
        qh.sum(axis=2).astype(np.uint8).reshape(-1, 64),
        sc.astype(np.int8),
        d_bits[:, None],
    )
    out[max_abs < GROUP_MAX_EPS] = 0
    return out


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of _pack_2bit: (n, 64) bytes -> (n, 256) values 0..3."""
    g = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return (g & 3).reshape(-1, QK_K).astype(np.int32)


def _unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: (scales, mins) as (n, 8) ints."""
    s = s.astype(np.int32)
    ls = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return ls, lm


def _per_sub(values: np.ndarray, size: int) -> np.ndarray:
    """(n, 256 / size) per-sub-block values repeated over their elements -> (n, 256)."""
    return np.repeat(values, size, axis=1)


def dequantize_q2_k(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q2_K: d * (sc & 15) * q - dmin * (sc >> 4)."""
    sc = b[:, :16].astype(np.int32)
    dl = _per_sub(half_at(b, 80) * (sc & 0xF).astype(F32), 16)
    ml = _per_sub(half_at(b, 82) * (sc >> 4).astype(F32), 16)
    return dl * _unpack_2bit(b[:, 16:80]).astype(F32) - ml


def dequantize_q3_k(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q3_K: d * (sc - 32) * (q - (high bit ? 0 : 4))."""
    s = b[:, 96:108].astype(np.int32)
    high = (s[:, 8:12, None] >> (2 * np.arange(4)).reshape(1, 1, 4)) & 3
    high = high.transpose(0, 2, 1).reshape(-1, 16)
    sc = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1) | (high << 4)
    dl = _per_sub(half_at(b, 108) * (sc - 32).astype(F32), 16)
    bits = (b[:, None, :32] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = _unpack_2bit(b[:, 32:96]) - 4 * (1 - bits.reshape(-1, QK_K).astype(np.int32))
    return dl * q.astype(F32)


def _dequantize_k4(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: d * sc * q - dmin * m per sub-block of 32."""
    ls, lm = _unpack_scales_k4(b[:, 4:16])
    d1 = _per_sub(half_at(b, 0) * ls.astype(F32), 32)
    m1 = _per_sub(half_at(b, 2) * lm.astype(F32), 32)
    return d1 * q.astype(F32) - m1


def dequantize_q4_k(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q4_K."""
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, QK_K)
    return _dequantize_k4(b, q)


def dequantize_q5_k(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q5_K."""
    qs = b[:, 48:176].reshape(-1, 4, 1, 32).astype(np.int32)
    qh = b[:, 16:48].astype(np.int32).reshape(-1, 1, 1, 32)
    shifts = np.arange(8).reshape(1, 4, 2, 1)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2) | (((qh >> shifts) & 1) << 4)
    return _dequantize_k4(b, q.reshape(-1, QK_K))


def dequantize_q6_k(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q6_K: d * sc * (q - 32)."""
    ql = b[:, :128].reshape(-1, 2, 2, 32).astype(np.int32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32).astype(np.int32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)
    high = (qh >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).reshape(-1, QK_K) - 32
    sc = b[:, 192:208].view(np.int8).astype(F32)
    return _per_sub(half_at(b, 208) * sc, 16) * q.astype(F32)
