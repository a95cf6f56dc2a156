"""The float helpers ggml-quants.c is built on, in float32 numpy with C's rounding."""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: the low mantissa bits of v + 1.5 * 2**23 (ties to even), as int32."""
    bits = (v.astype(F32, copy=False) + F32(12582912.0)).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 (nearest even): the half's bits and its value back as float32."""
    h = v.astype(np.float16)
    return h.view(np.uint16), h.astype(F32)


def seqsum(terms: np.ndarray) -> np.ndarray:
    """Sum over axis 0 left to right in float32, from 0, as a C loop does."""
    acc = np.zeros(terms.shape[1:], F32)
    for t in terms:
        acc += t
    return acc


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of x (axis 0): the first element of largest magnitude, and that magnitude."""
    ax = np.abs(x)
    idx = ax.argmax(axis=0)
    cols = np.arange(x.shape[1])
    return x[idx, cols], ax[idx, cols]


def half_at(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte offset `at` of each block (row of bytes), as a float32 column."""
    return np.ascontiguousarray(b[:, at : at + 2]).view(np.float16).astype(F32)


def u8(*parts: np.ndarray) -> np.ndarray:
    """Concatenate per-block byte fields (uint8 views of any dtype) along the last axis."""
    return np.concatenate([np.ascontiguousarray(p).view(np.uint8) for p in parts], axis=-1)
