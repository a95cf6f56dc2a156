"""How far a ggml block may sit from the values it was quantized from, read from its own bytes.

Two kinds of type (derivations in docs/verify.md):

- the 32-element types pick each code with the float32 scale before it is rounded to float16,
  so their bound is a multiple of the stored scale (`block_bound`);
- the K-quants pick each code as the point nearest the value on the grid their stored
  (float16 and 4/6-bit) scales and mins define, clamped to the code range; `grid` gives that
  grid per element, found by dequantizing each block with every code at its lowest and at its
  highest value (llama.cpp's own dequantization, so the grid is the one the file means).

Pure numpy on block bytes, no I/O.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import dequantize

T = GGMLQuantizationType
EPS16 = 2.0**-11  # float16 rounding, relative to the rounded value (normal range)
TINY16 = 2.0**-25  # float16 rounding in the subnormal range (absolute)
F32_SLACK = 2.0**-16  # float32 arithmetic of the quantizer, relative to the scale

# type -> (bytes of the scale d, of the min m or None, coefficient of |d|, coefficient of |m|,
# largest |code| + 1 for the subnormal term); bound = c_d |d| + c_m |m| + codes * TINY16.
_LEGACY: dict[GGMLQuantizationType, tuple[int | None, float, float, int]] = {
    # Q8_0: d = absmax / 127, q = round(x / d): half a step, plus 127.5 codes of d's rounding
    T.Q8_0: (None, 0.5 + 127.5 * EPS16 + F32_SLACK, 0.0, 128),
    # Q4_0: d = max / -8, q = min(15, trunc(x / d + 8.5)): a whole step where +8 is clipped to 7
    T.Q4_0: (None, 1.0 + 9 * EPS16 + F32_SLACK, 0.0, 9),
    # Q5_0: the same with 16 and 31
    T.Q5_0: (None, 1.0 + 17 * EPS16 + F32_SLACK, 0.0, 17),
    # Q4_1: d = (max - min) / 15, m = min, q = min(15, trunc((x - min) / d + 0.5)): half a step
    T.Q4_1: (2, 0.5 + 15.5 * EPS16 + F32_SLACK, EPS16, 17),
    # Q5_1: the same with 31
    T.Q5_1: (2, 0.5 + 31.5 * EPS16 + F32_SLACK, EPS16, 33),
}
# K-quants: (byte ranges holding the codes, number of codes)
_GRIDS: dict[GGMLQuantizationType, tuple[tuple[slice, ...], int]] = {
    T.Q2_K: ((slice(16, 80),), 4),
    T.Q3_K: ((slice(0, 96),), 8),
    T.Q4_K: ((slice(16, 144),), 16),
    T.Q5_K: ((slice(16, 176),), 32),
    T.Q6_K: ((slice(0, 192),), 64),
}
LEGACY = frozenset(_LEGACY)
GRIDS = frozenset(_GRIDS)


def _blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1, GGML_QUANT_SIZES[qtype][1])


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float64)[:, 0]


def block_bound(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Per element (flat, in block order): the most a 32-element type's value may be off."""
    m_at, c_d, c_m, codes = _LEGACY[qtype]
    blocks = _blocks(data, qtype)
    bound = c_d * np.abs(_half(blocks, 0)) + codes * TINY16
    if m_at is not None:
        bound += c_m * np.abs(_half(blocks, m_at))
    return np.repeat(bound, GGML_QUANT_SIZES[qtype][0])


def grid(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, int]:
    """Per element (flat, in block order): (value of the lowest code, step between codes),
    and the number of codes, for a K-quant: every representable value is low + k * step."""
    ranges, levels = _GRIDS[qtype]
    blocks = _blocks(data, qtype)
    lowest, highest = blocks.copy(), blocks.copy()
    for part in ranges:
        lowest[:, part] = 0
        highest[:, part] = 0xFF
    low = dequantize(lowest, qtype).reshape(-1).astype(np.float64)
    high = dequantize(highest, qtype).reshape(-1).astype(np.float64)
    return low, (high - low) / (levels - 1), levels


def nearest_distance(
    expected: np.ndarray, low: np.ndarray, step: np.ndarray, levels: int
) -> np.ndarray:
    """|expected - the grid point nearest to it|, codes clamped to the grid's range."""
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(step != 0, np.rint((expected - low) / np.where(step != 0, step, 1)), 0)
    k = np.clip(k, 0, levels - 1)
    return np.abs(low + k * step - expected)
