"""ggml tensor types as bytes: llama.cpp's reference quantizers and dequantizers in numpy.

`quantize(rows, qtype)` returns the bytes llama.cpp's `quantize_row_*_ref` writes (what
`llama-quantize` writes without an importance matrix); `dequantize(data, qtype)` is the inverse
its `dequantize_row_*` computes. Both work on the last axis, block by block, in bounded chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import kquants, legacy

T = GGMLQuantizationType

_CODECS: dict[GGMLQuantizationType, tuple[Callable, Callable]] = {
    T.F16: (legacy.quantize_f16, legacy.dequantize_f16),
    T.BF16: (legacy.quantize_bf16, legacy.dequantize_bf16),
    T.Q8_0: (legacy.quantize_q8_0, legacy.dequantize_q8_0),
    T.Q4_0: (legacy.quantize_q4_0, legacy.dequantize_q4_0),
    T.Q4_1: (legacy.quantize_q4_1, legacy.dequantize_q4_1),
    T.Q5_0: (legacy.quantize_q5_0, legacy.dequantize_q5_0),
    T.Q5_1: (legacy.quantize_q5_1, legacy.dequantize_q5_1),
    T.Q2_K: (kquants.quantize_q2_k, kquants.dequantize_q2_k),
    T.Q3_K: (kquants.quantize_q3_k, kquants.dequantize_q3_k),
    T.Q4_K: (kquants.quantize_q4_k, kquants.dequantize_q4_k),
    T.Q5_K: (kquants.quantize_q5_k, kquants.dequantize_q5_k),
    T.Q6_K: (kquants.quantize_q6_k, kquants.dequantize_q6_k),
}

SUPPORTED: frozenset[GGMLQuantizationType] = frozenset({T.F32, *_CODECS})

# Elements per chunk: a chunk's float32 intermediates stay within a few tens of MiB.
CHUNK = 1 << 18


def block_size(qtype: GGMLQuantizationType) -> int:
    """Elements per block (1 for the float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    """Bytes of a row of n elements; n must be a whole number of blocks."""
    size, type_size = GGML_QUANT_SIZES[qtype]
    if n % size:
        raise ValueError(f"a row of {n} elements is not a whole number of {qtype.name} blocks")
    return n // size * type_size


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Rows (last axis) of float values -> uint8 array (*rows, row_bytes): llama.cpp's bytes."""
    nbytes = row_bytes(qtype, data.shape[-1])
    out = np.empty(data.size // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1], np.uint8)
    at = 0
    for piece in iter_quantize(data, qtype):
        out[at : at + piece.size] = piece
        at += piece.size
    return out.reshape(*data.shape[:-1], nbytes)


def iter_quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> Iterator[np.ndarray]:
    """quantize's bytes in order, a bounded chunk at a time (flat uint8 arrays), for streaming.

    Only one chunk is widened to float32 at a time, whatever the input's float dtype; F32 from
    float32 and BF16 from bfloat16 without NaNs are the input's own bytes, in one piece.
    """
    row_bytes(qtype, data.shape[-1])
    size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).reshape(-1, size)
    step = max(1, CHUNK // size)
    encode = _CODECS[qtype][0] if qtype != T.F32 else None
    same = qtype == T.BF16 and blocks.dtype.name == "bfloat16"
    if (qtype == T.F32 and blocks.dtype == np.float32) or (same and not _any_nan(blocks)):
        yield blocks.reshape(-1).view(np.uint8)
        return
    with np.errstate(all="ignore"):
        for at in range(0, blocks.shape[0], step):
            if same:
                yield _quiet_nans(blocks[at : at + step].view(np.uint16)).reshape(-1).view(np.uint8)
                continue
            x = blocks[at : at + step].astype(np.float32, copy=False)  # encoders only read x
            yield (encode(x) if encode else x).reshape(-1).view(np.uint8)


def _any_nan(values: np.ndarray) -> bool:
    """Whether bfloat16 values hold a NaN: |bits| above inf's, a chunk at a time."""
    bits = values.reshape(-1).view(np.uint16)
    magnitude = np.empty(min(bits.size, CHUNK), np.uint16)
    for at in range(0, bits.size, CHUNK):
        piece = magnitude[: min(CHUNK, bits.size - at)]
        np.bitwise_and(bits[at : at + CHUNK], 0x7FFF, out=piece)
        if piece.max() > 0x7F80:
            return True
    return False


def _quiet_nans(bits: np.ndarray) -> np.ndarray:
    """BF16 bits as llama.cpp writes them from their float32 widening: unchanged, NaNs quiet."""
    nan = (bits & 0x7FFF) > 0x7F80
    return np.where(nan, bits | 64, bits) if nan.any() else bits


def dequantize(
    data: np.ndarray, qtype: GGMLQuantizationType, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 array (*rows, row_bytes) -> float32 (*rows, n): llama.cpp's dequantize_row_*
    (into `out`, a contiguous float32 array of as many elements, if given)."""
    raw = np.ascontiguousarray(data).view(np.uint8)
    size, type_size = GGML_QUANT_SIZES[qtype]
    if raw.shape[-1] % type_size:
        raise ValueError(
            f"{raw.shape[-1]} bytes per row is not a whole number of {qtype.name} blocks"
        )
    n = raw.shape[-1] // type_size * size
    if qtype == T.F32 and out is None:
        return raw.view(np.float32).reshape(*raw.shape[:-1], n)
    blocks = raw.reshape(-1, type_size)
    if out is None:
        out = np.empty((*raw.shape[:-1], n), np.float32)
    elif not out.flags.c_contiguous or out.dtype != np.float32:
        raise ValueError("dequantize writes into a contiguous float32 array")
    flat = out.reshape(blocks.shape[0], size)  # a view: `out` is contiguous
    if qtype == T.F32:
        flat[...] = blocks.view(np.float32)
        return out.reshape(*raw.shape[:-1], n)
    if qtype == T.BF16:  # no intermediate: the bfloat16 bits become the float32s' high halves
        np.left_shift(blocks.view(np.uint16), 16, out=flat.view(np.uint32), dtype=np.uint32)
        return out.reshape(*raw.shape[:-1], n)
    decode = _CODECS[qtype][1]
    step = max(1, CHUNK // size)
    for at in range(0, blocks.shape[0], step):
        flat[at : at + step] = decode(blocks[at : at + step]).reshape(-1, size)
    return out.reshape(*raw.shape[:-1], n)
