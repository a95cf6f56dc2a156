"""ggml's 32-element block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and the float types, as bytes."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .common import F32, fp16, half_at, u8


def _inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0))


def _absmax_signed(x: np.ndarray) -> np.ndarray:
    """Per block (row): the first element of largest magnitude, sign kept (+0.0 if none is > 0)."""
    m = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    return np.where(m != 0, m, F32(0))


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Element j in the low nibble of byte j, element j + 16 in its high nibble."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 quants, packed into one little-endian uint32 per block."""
    weights = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
    return (((q >> 4) & 1).astype(np.uint32) * weights).sum(axis=1, dtype=np.uint32)[:, None]


def quantize_f16(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 of every element."""
    return x.astype(np.float16).view(np.uint8)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: nearest even (ml_dtypes' cast), NaNs' high bits made quiet."""
    x = np.ascontiguousarray(x, F32)
    with np.errstate(invalid="ignore"):
        h = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # ml_dtypes writes one canonical NaN; ggml keeps the payload's high bits
        h[nan] = (x.view(np.uint32)[nan] >> 16).astype(np.uint16) | 64
    return h.view(np.uint8)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref: d = absmax / 127, q = roundf(x / d) (numba-compiled)."""
    from .compiled import quantize_q8_0

    d, q = quantize_q8_0(x)
    return u8(fp16(d[:, None])[0], q)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_0_ref: d = max / -8, q = min(15, (int8)(x / d + 8.5))."""
    d = _absmax_signed(x) / F32(-8)
    q = np.minimum(15, np.trunc(x * _inverse(d) + F32(8.5)).astype(np.int32))
    return u8(fp16(d)[0], _nibbles(q))


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_1_ref: d = (max - min) / 15, q = min(15, (int8)((x - min) / d + 0.5))."""
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / F32(15)
    q = np.minimum(15, np.trunc((x - lo) * _inverse(d) + F32(0.5)).astype(np.int32))
    return u8(fp16(d)[0], fp16(lo)[0], _nibbles(q))


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_0_ref: d = max / -16, q = min(31, (int8)(x / d + 16.5)), bit 4 in qh."""
    d = _absmax_signed(x) / F32(-16)
    q = np.minimum(31, np.trunc(x * _inverse(d) + F32(16.5)).astype(np.int32))
    return u8(fp16(d)[0], _high_bits(q), _nibbles(q & 15))


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_1_ref: d = (max - min) / 31, q = (uint8)((x - min) / d + 0.5)."""
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / F32(31)
    q = np.trunc((x - lo) * _inverse(d) + F32(0.5)).astype(np.int32) & 0xFF
    return u8(fp16(d)[0], fp16(lo)[0], _high_bits(q), _nibbles(q & 15))


def _unnibble(qs: np.ndarray) -> np.ndarray:
    """Inverse of _nibbles: 32 quants per block."""
    return np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32)


def _unhigh(qh: np.ndarray) -> np.ndarray:
    """Inverse of _high_bits: bit 4 of each of the 32 quants."""
    bits = np.ascontiguousarray(qh).view(np.uint32)
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4


def dequantize_f16(b: np.ndarray) -> np.ndarray:
    """Half floats back to float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def dequantize_bf16(b: np.ndarray) -> np.ndarray:
    """bfloat16 back to float32 (the high half of the bits)."""
    return np.left_shift(np.ascontiguousarray(b).view(np.uint16), 16, dtype=np.uint32).view(F32)


def dequantize_q8_0(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q8_0: q * d."""
    return b[:, 2:].view(np.int8).astype(F32) * half_at(b, 0)


def dequantize_q4_0(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q4_0: (q - 8) * d."""
    return (_unnibble(b[:, 2:]) - 8).astype(F32) * half_at(b, 0)


def dequantize_q4_1(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q4_1: q * d + m."""
    return _unnibble(b[:, 4:]).astype(F32) * half_at(b, 0) + half_at(b, 2)


def dequantize_q5_0(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q5_0: ((q | high) - 16) * d."""
    q = _unnibble(b[:, 6:]) | _unhigh(b[:, 2:6])
    return (q - 16).astype(F32) * half_at(b, 0)


def dequantize_q5_1(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q5_1: (q | high) * d + m."""
    q = _unnibble(b[:, 8:]) | _unhigh(b[:, 4:8])
    return q.astype(F32) * half_at(b, 0) + half_at(b, 2)
