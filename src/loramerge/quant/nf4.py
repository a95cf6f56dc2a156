"""NF4 (bitsandbytes' 4-bit NormalFloat) as pure numpy functions: quantize, dequantize, no I/O.

The arithmetic is bitsandbytes 0.50.2's CPU reference, step for step, so the bytes agree:

- per block of `blocksize` elements (the last one may be shorter), absmax = max |x| in float32;
  a full block is scaled by x * (1 / max(absmax, 1e-38)), the short last block by x / absmax
  (whose stored absmax is the clamped one), both clamped to [-1, 1];
- the code is the nearest NF4 value, ties to the lower one: the count of the 15 float32
  midpoints strictly below the scaled value (torch.bucketize);
- two codes per byte, the first element in the high nibble; an odd count is padded with the
  code of 0.0;
- double quantization: offset = the float32 mean of the absmax vector, summed in the order torch
  sums it on the CPU (`torch_sum`), and absmax - offset quantized in blocks of 256 with the
  signed 8-bit dynamic map: x / block absmax, the nearest code by float32 distance, ties to the
  lower one (bitsandbytes' C++ kernel).

Dequantization is code[nibble] * absmax in float32, rounded once to the stored dtype.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), float32.
CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# The 127 positive values below 1 of bitsandbytes' create_dynamic_map(signed=True): for
# i = 0..6, the midpoints of linspace(0.1, 1, 2**i + 1) times 10**(i - 6), as torch computes
# them in float32. The map is their negatives, 0, themselves and 1.0, sorted.
_DYNAMIC_POSITIVE = np.array(
    [
        5.500000384017767e-07,
        3.250000190746505e-06,
        7.749999895168003e-06,
        2.1249998098937795e-05,
        4.374999844003469e-05,
        6.625000241911039e-05,
        8.874999912222847e-05,
        0.00015625001105945557,
        0.0002687500382307917,
        0.0003812500217463821,
        0.000493750034365803,
        0.0006062500760890543,
        0.0007187500596046448,
        0.0008312499849125743,
        0.0009437500848434865,
        0.001281249918974936,
        0.001843750011175871,
        0.002406249986961484,
        0.002968749962747097,
        0.0035312497057020664,
        0.004093749914318323,
        0.0046562496572732925,
        0.0052187503315508366,
        0.005781250074505806,
        0.006343749817460775,
        0.006906250026077032,
        0.0074687497690320015,
        0.008031249977648258,
        0.008593750186264515,
        0.009156249463558197,
        0.009718749672174454,
        0.011406250298023224,
        0.014218750409781933,
        0.017031250521540642,
        0.019843751564621925,
        0.02265625074505806,
        0.025468749925494194,
        0.028281250968575478,
        0.031093750149011612,
        0.033906251192092896,
        0.03671875223517418,
        0.039531249552965164,
        0.04234374687075615,
        0.04515625163912773,
        0.047968748956918716,
        0.05078125,
        0.053593751043081284,
        0.05640624836087227,
        0.05921875312924385,
        0.062031250447034836,
        0.06484375149011612,
        0.0676562562584877,
        0.07046874612569809,
        0.07328125089406967,
        0.07609374821186066,
        0.07890625298023224,
        0.08171875774860382,
        0.08453124761581421,
        0.08734375238418579,
        0.09015624970197678,
        0.09296875447034836,
        0.09578125923871994,
        0.09859374910593033,
        0.10703125596046448,
        0.12109375,
        0.13515624403953552,
        0.14921875298023224,
        0.16328124701976776,
        0.17734375596046448,
        0.19140625,
        0.20546874403953552,
        0.21953125298023224,
        0.23359374701976776,
        0.24765624105930328,
        0.26171875,
        0.2757812738418579,
        0.28984373807907104,
        0.30390626192092896,
        0.3179687261581421,
        0.33203125,
        0.3460937440395355,
        0.36015623807907104,
        0.37421876192092896,
        0.3882812261581421,
        0.40234375,
        0.4164062440395355,
        0.43046873807907104,
        0.44453126192092896,
        0.4585937261581421,
        0.47265625,
        0.48671871423721313,
        0.500781238079071,
        0.5148437023162842,
        0.5289062261581421,
        0.54296875,
        0.5570312738418579,
        0.5710937976837158,
        0.585156261920929,
        0.5992187261581421,
        0.61328125,
        0.6273437738418579,
        0.6414062976837158,
        0.655468761920929,
        0.6695312261581421,
        0.68359375,
        0.6976562738418579,
        0.7117187976837158,
        0.725781261920929,
        0.7398437261581421,
        0.75390625,
        0.7679687738418579,
        0.782031238079071,
        0.796093761920929,
        0.8101562261581421,
        0.82421875,
        0.8382812738418579,
        0.852343738079071,
        0.866406261920929,
        0.8804687261581421,
        0.89453125,
        0.9085937738418579,
        0.922656238079071,
        0.936718761920929,
        0.9507812261581421,
        0.96484375,
        0.9789062738418579,
        0.992968738079071,
    ],
    dtype=np.float32,
)
DYNAMIC_MAP = np.concatenate([-_DYNAMIC_POSITIVE[::-1], [0.0], _DYNAMIC_POSITIVE, [1.0]]).astype(
    np.float32
)
NESTED_BLOCKSIZE = 256
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)

MIDPOINTS = ((CODE[:-1] + CODE[1:]) / np.float32(2)).astype(np.float32)
TINY = np.float32(1e-38)
_TORCH_LANES = 8  # bitsandbytes clamps absmax to this before dividing by it
# Elements per work chunk: a multiple of every blocksize, small enough to stay in cache.
_CHUNK = 1 << 16


@dataclass(frozen=True)
class NF4:
    """One tensor in NF4: what bitsandbytes' QuantState holds, as numpy arrays."""

    packed: np.ndarray  # uint8, shape (ceil(n / 2), 1)
    absmax: np.ndarray  # float32 per block; uint8 codes when double-quantized
    shape: tuple[int, ...]
    dtype: str  # torch name of the source dtype: "bfloat16", "float16" or "float32"
    blocksize: int
    nested_absmax: np.ndarray | None = None  # float32 per 256 blocks (double quantization)
    offset: float | None = None  # float32 mean of the block absmax (double quantization)

    @property
    def double_quant(self) -> bool:
        """Whether the block absmax is itself quantized."""
        return self.nested_absmax is not None


def quantize(
    values: np.ndarray,
    blocksize: int = 64,
    double_quant: bool = True,
    threads: int = 1,
) -> NF4:
    """NF4 of a float tensor, byte for byte what bitsandbytes.functional.quantize_4bit writes
    on the CPU; `threads` splits the work (numpy releases the GIL)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    packed = np.empty(-(-flat.size // 2), dtype=np.uint8)
    absmax = np.empty(-(-flat.size // blocksize), dtype=np.float32)
    quantize_codes(flat, blocksize, packed, absmax, threads)
    shape, dtype = tuple(values.shape), values.dtype.name
    return assemble(packed, absmax, shape, dtype, blocksize, double_quant)


def quantize_codes(
    flat: np.ndarray, blocksize: int, packed: np.ndarray, absmax: np.ndarray, threads: int = 1
) -> None:
    """The first level of `quantize` for flat values (a run of whole blocks but for the last):
    their packed codes into `packed` and each block's absmax into `absmax` (float32)."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, not {blocksize}")
    if flat.dtype.name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"NF4 quantizes bfloat16, float16 or float32, not {flat.dtype}")
    n = flat.size
    full = (n // blocksize) * blocksize
    starts = range(0, full, _CHUNK)
    _run(
        threads,
        lambda s: _quantize_full(flat, s, min(full, s + _CHUNK), blocksize, packed, absmax),
        starts,
    )
    if full < n:
        _quantize_tail(flat, full, blocksize, packed, absmax)


def assemble(
    packed: np.ndarray,
    absmax: np.ndarray,
    shape: tuple[int, ...],
    dtype: str,
    blocksize: int,
    double_quant: bool,
) -> NF4:
    """The NF4 state of a tensor from its packed codes and float32 block absmax, the absmax
    double-quantized (offset: their mean, summed in torch's CPU order) if asked."""
    blocks = absmax.size
    if not double_quant:
        return NF4(packed.reshape(-1, 1), absmax, shape, dtype, blocksize)
    offset = np.float32(torch_sum(absmax) / np.float32(blocks))
    codes, nested = quantize_blockwise(absmax - offset, DYNAMIC_MAP, NESTED_BLOCKSIZE)
    return NF4(packed.reshape(-1, 1), codes, shape, dtype, blocksize, nested, float(offset))


def _run(threads: int, work: Callable[[int], None], starts: range) -> None:
    if threads <= 1 or len(starts) < 2:
        for start in starts:
            work(start)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, starts))


def _quantize_full(flat, start: int, end: int, blocksize: int, packed, absmax) -> None:
    """Elements [start, end) of whole blocks: x * (1 / absmax), nearest code, packed.

    Even and odd elements are kept apart (the high and low nibbles), each block's halves side by
    side, so every step is a contiguous pass over buffers this thread reuses.
    """
    half = (end - start) // 2
    even, odd, scaled, index, codes, bounds, above = _scratch(half)
    _to_float32(flat[start:end:2], even)
    _to_float32(flat[start + 1 : end : 2], odd)
    rows = blocksize // 2
    amax = np.maximum(_abs_max(even, rows), _abs_max(odd, rows))
    _check_finite(amax)
    absmax[start // blocksize : end // blocksize] = amax
    with np.errstate(over="ignore"):
        recip = (np.float32(1) / np.maximum(amax, TINY))[:, None]
    out = packed[start // 2 : end // 2]
    for values, shift in ((even, 4), (odd, 0)):
        np.multiply(values.reshape(-1, rows), recip, out=scaled.reshape(-1, rows))
        _TABLE.codes(scaled, index, codes, bounds, above)
        if shift:
            np.left_shift(codes, shift, out=out)
        else:
            np.bitwise_or(out, codes, out=out)


_local = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, ...]:
    """This thread's work buffers for `n` values (reused: no fresh pages per chunk)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None or buffers[0].size < n:
        buffers = _local.buffers = (
            np.empty(n, np.float32),  # even elements
            np.empty(n, np.float32),  # odd elements
            np.empty(n, np.float32),  # scaled
            np.empty(n, np.intp),  # table index
            np.empty(n, np.uint8),  # codes
            np.empty(n, np.float32),  # bounds
            np.empty(n, np.bool_),  # above the bound
        )
    return tuple(b[:n] for b in buffers)


def _to_float32(source: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 by shifting its bits into the high half (exact); else a cast."""
    if source.dtype.name == "bfloat16":
        np.left_shift(
            source.view(np.uint16), np.uint32(16), out=out.view(np.uint32), dtype=np.uint32
        )
    else:
        np.copyto(out, source, casting="unsafe")


def _abs_max(values: np.ndarray, rows: int) -> np.ndarray:
    """max |x| per row, on the bits (NaN sorts above Inf, so it still shows)."""
    bits = values.view(np.uint32).reshape(-1, rows)
    return (bits & np.uint32(0x7FFFFFFF)).max(axis=1).view(np.float32)


def _quantize_tail(flat, start: int, blocksize: int, packed, absmax) -> None:
    """The short last block: x / max(absmax, 1e-38), the clamped absmax stored."""
    x = flat[start:].astype(np.float32)
    amax = np.maximum(np.abs(x).max(), TINY)
    _check_finite(amax)
    absmax[-1] = amax
    scaled = x / amax
    if scaled.size % 2:
        scaled = np.append(scaled, np.float32(0))  # bitsandbytes pads with 0.0
    codes = _TABLE.codes(scaled)
    out = packed[start // 2 :]
    np.left_shift(codes[0::2], 4, out=out)
    np.bitwise_or(out, codes[1::2], out=out)


def _check_finite(absmax) -> None:
    if not np.all(np.isfinite(absmax)):
        raise ValueError("NaN or Inf among the values: NF4 cannot hold them")


class _Table:
    """Codes by table on the top 16 bits of the float32 scaled value (65536 cells, each an
    interval of values): the count of midpoints below the cell, plus, in the 15 cells that hold
    a midpoint, whether the value is above it (still the exact float32 comparison)."""

    def __init__(self) -> None:
        top = np.arange(1 << 16, dtype=np.uint32) << 16
        ends = np.stack([top.view(np.float32), (top | 0xFFFF).view(np.float32)])
        with np.errstate(invalid="ignore"):
            lowest = np.nanmin(np.where(np.isnan(ends), np.inf, ends), axis=0)
        self.base = np.searchsorted(MIDPOINTS, lowest, side="left").astype(np.uint8)
        self.bound = np.full(1 << 16, np.inf, dtype=np.float32)
        cells = MIDPOINTS.view(np.uint32) >> 16
        self.base[cells] = np.arange(len(MIDPOINTS), dtype=np.uint8)
        self.bound[cells] = MIDPOINTS

    def codes(self, scaled, index=None, codes=None, bounds=None, above=None) -> np.ndarray:
        """Codes of float32 values (into the given buffers, if any)."""
        if index is None:
            index, codes = np.empty(scaled.size, np.intp), np.empty(scaled.size, np.uint8)
            bounds, above = np.empty(scaled.size, np.float32), np.empty(scaled.size, np.bool_)
        np.copyto(index, scaled.view(np.uint16)[1::2])
        self.base.take(index, out=codes, mode="clip")
        self.bound.take(index, out=bounds, mode="clip")
        np.greater(scaled, bounds, out=above)
        np.add(codes, above.view(np.uint8), out=codes)
        return codes


_TABLE = _Table()


def quantize_blockwise(
    values: np.ndarray, code: np.ndarray, blocksize: int
) -> tuple[np.ndarray, np.ndarray]:
    """8-bit blockwise quantization as bitsandbytes' CPU kernel does it: (codes, block absmax).

    The kernel divides by the block absmax and looks the code up in a table of 65536 cells over
    [-1, 1]: cell floor((x + 1) * 32767.5 + 0.5), computed in float32, holds the code nearest
    to the cell's centre. An all-zero block (0 / 0) gets code 0.
    """
    n = values.size
    blocks = -(-n // blocksize)
    padded = np.zeros(blocks * blocksize, dtype=np.float32)
    padded[:n] = values
    grid = padded.reshape(blocks, blocksize)
    absmax = np.abs(grid).max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        normed = (grid / absmax[:, None]).reshape(-1)[:n]
        cell = np.floor((normed + np.float32(1)) * np.float32(32767.5) + np.float32(0.5))
    cell = np.nan_to_num(cell, nan=0.0)
    return _cell_table(code).take(np.clip(cell, 0, 65535).astype(np.intp)), absmax


def _cell_table(code: np.ndarray) -> np.ndarray:
    """For each of the 65536 cells over [-1, 1], the index of the code nearest its centre."""
    centre = (np.arange(65536) / 32767.5 - 1).astype(np.float32).astype(np.float64)
    table = code.astype(np.float64)
    left = np.clip(np.searchsorted(table, centre, side="right") - 1, 0, len(table) - 2)
    right_closer = np.abs(centre - table[left + 1]) < np.abs(centre - table[left])
    return (left + right_closer).astype(np.uint8)


def torch_sum(values: np.ndarray) -> np.float32:
    """float32 sum of a 1-D array in the order torch's CPU kernel adds (one thread).

    torch (SumKernel.cpp, cascade_sum) reads 8 floats per vector (its sum kernel is the AVX2 one
    even on AVX-512 machines) and sums the vectors with `row_sum`; then it adds the scalar tail
    and the 8 lanes one by one. Fewer than 8 values are summed by `row_sum` as scalars. With
    several threads, torch sums arrays of 32768 or more elements in per-thread pieces instead.
    """
    lanes = _TORCH_LANES
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    vectors = x.size // lanes
    if vectors == 0:
        return np.float32(_row_sum(x))
    acc = _row_sum(x[: vectors * lanes].reshape(vectors, lanes))
    total = _sequential(x[vectors * lanes :], np.float32(0))
    return _sequential(acc, total)


def _row_sum(items: np.ndarray) -> np.ndarray:
    """torch's row_sum: four interleaved rows summed by a cascade, the leftover items added to
    the first, then the four partial sums left to right."""
    rows = items.shape[0] // 4
    partial = _cascade(items[: rows * 4].reshape(rows, 4, *items.shape[1:]))
    for v in range(rows * 4, items.shape[0]):
        partial[0] = partial[0] + items[v]
    acc = partial[0]
    for k in range(1, 4):
        acc = acc + partial[k]
    return acc


def _sequential(values: np.ndarray, start: np.float32) -> np.float32:
    """start + values[0] + values[1] + ... in float32, left to right."""
    total = np.float32(start)
    for v in values:
        total = np.float32(total + v)
    return total


def _cascade(grid: np.ndarray) -> np.ndarray:
    """torch's multi_row_sum over axis 0 (4 levels), vectorised over the other axes."""
    size = grid.shape[0]
    power = max(4, _ceil_log2(size) // 4)
    step = 1 << power
    zero = np.zeros(grid.shape[1:], dtype=np.float32)
    full = (size // step) * step
    chunks = _running(grid[:full].reshape(-1, step, *grid.shape[1:]))  # level 0 sums
    levels = [chunks]
    carries = []
    for _ in range(2):  # levels 1 and 2 hand a sum up every `step` of theirs
        below = levels[-1]
        whole = (below.shape[0] // step) * step
        carries.append(_running(below[whole:][None])[0] if whole < below.shape[0] else zero)
        levels.append(_running(below[:whole].reshape(-1, step, *below.shape[1:])))
    top = _running(levels[-1][None])[0] if levels[-1].shape[0] else zero
    acc = _running(grid[full:][None])[0] if full < size else zero.copy()
    for carry in (*carries, top):
        acc = acc + carry
    return acc


def _running(groups: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sums along axis 1 (from 0), vectorised over axis 0 and the rest."""
    acc = np.zeros((groups.shape[0], *groups.shape[2:]), dtype=np.float32)
    for j in range(groups.shape[1]):
        acc += groups[:, j]
    return acc


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def block_absmax(state: NF4, nested_code: np.ndarray = DYNAMIC_MAP) -> np.ndarray:
    """The float32 absmax of every block, the nested quantization undone as bitsandbytes does."""
    if not state.double_quant:
        return state.absmax
    scales = np.repeat(state.nested_absmax, NESTED_BLOCKSIZE)[: state.absmax.size]
    return (nested_code[state.absmax] * scales + np.float32(state.offset)).astype(np.float32)


def dequantize(
    state: NF4, code: np.ndarray = CODE, nested_code: np.ndarray = DYNAMIC_MAP
) -> np.ndarray:
    """float32 code[nibble] * absmax in the tensor's shape (round to `state.dtype` after)."""
    n = math.prod(state.shape)
    packed = state.packed.reshape(-1)
    nibbles = np.empty(packed.size * 2, dtype=np.uint8)
    np.right_shift(packed, 4, out=nibbles[0::2])
    np.bitwise_and(packed, 0xF, out=nibbles[1::2])
    values = code[nibbles[:n]]
    absmax = block_absmax(state, nested_code)
    full = (n // state.blocksize) * state.blocksize
    blocks = full // state.blocksize
    values[:full].reshape(blocks, state.blocksize)[...] *= absmax[:blocks, None]
    values[full:] *= absmax[blocks:]
    return values.reshape(state.shape)
