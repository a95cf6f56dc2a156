"""The common merge on the CPU with numpy alone: W = W0 + sum_i c_i * B_i @ A_i for 2-D weights.

Plain LoRA on Linear, Conv1D (fan_in_fan_out) and embedding weights stored in bfloat16 or float32
covers nearly every real merge; doing it without torch saves the second it takes to import. The
arithmetic is the one `delta.merged_blocks` does with torch: float32, rows in cache-sized blocks
(conversion, rank-r update and rounding stay in cache), one rounding to nearest even at the end,
done by a `Rounding` the caller hands in (`kernels.rounding()`: the compiled kernels or numpy
with ml_dtypes' cast, the same bits, which are torch's). DoRA, convolutions, float64, float16
and CUDA go through torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Stored and output dtypes this path handles (safetensors names).
DTYPES = frozenset({"BF16", "F32"})
# Rows per block are chosen so one float32 block (1 MiB) and its delta stay in cache.
BLOCK_ELEMENTS = 1 << 18
# Elements added to each row of a BLAS output buffer. Rows a multiple of 4 KiB apart (2,048
# float32 columns, and most models' widths) fall in the same L1 cache sets, and OpenBLAS's
# AVX-512 sgemm wrote them 2-3x slower (docs/benchmarks.md, 2 December 2026 on AMD EPYC).
STRIDE_PAD = 16


def padded_rows(buffer: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """rows x cols of `buffer` (flat, at least rows * (cols + STRIDE_PAD) long), each row
    STRIDE_PAD elements past the last one's end: an output for BLAS."""
    stride = cols + STRIDE_PAD
    return buffer[: rows * stride].reshape(rows, stride)[:, :cols]


_local = threading.local()


class Rounding(Protocol):
    """float32 blocks rounded to nearest even bfloat16 (`CAST`, or the compiled
    `kernels.BFLOAT16` with the same bits: `kernels.rounding` picks)."""

    def round(self, acc: np.ndarray, into: np.ndarray) -> None:
        """Round the float32 block into `into`, bit for bit as the cast to bfloat16 does."""

    def round_sum(self, w0: np.ndarray, delta: np.ndarray, into: np.ndarray) -> None:
        """Round bfloat16 W0's rows plus one float32 term into `into`: the bits of widening
        W0, adding the term and `round`, in one pass. The term's rows may lie apart in a wider
        buffer (`padded_rows`)."""


class BlockCheck(Protocol):
    """A check shown each block `merge_rows` makes (`verify.in_pass`)."""

    def __call__(self, first: int, w0: np.ndarray, rounded: np.ndarray) -> None:
        """Measure a block: its first row in W, W0's rows, the rounded rows."""


class _Cast:
    """`Rounding` by numpy with ml_dtypes' cast: the bits the compiled kernels are held to."""

    def round(self, acc: np.ndarray, into: np.ndarray) -> None:
        """The cast of a float32 block."""
        np.copyto(into, acc, casting="unsafe")

    def round_sum(self, w0: np.ndarray, delta: np.ndarray, into: np.ndarray) -> None:
        """Widen, add and cast in one numpy `add`."""
        np.add(w0, delta, out=into, dtype=np.float32, casting="unsafe")


CAST = _Cast()


@dataclass(frozen=True)
class Factor:
    """One term c * dW in float32: dW = B @ A, or (B @ A)^T for Conv1D weights and embeddings.

    dW covers rows `at` to `at + rows` of W (all of W but for one expert of a stacked tensor).
    """

    a: np.ndarray  # (r, in), or (r, rows of dW) when transposed
    b: np.ndarray  # (out, r), already times the coefficient c
    transposed: bool
    at: int = 0

    @property
    def rows(self) -> int:
        """Rows of dW."""
        return self.a.shape[1] if self.transposed else self.b.shape[0]


def factor(a: np.ndarray, b: np.ndarray, coef: float, transposed: bool, at: int = 0) -> Factor:
    """A term in float32, its coefficient folded into B (r values per row, not one per weight)."""
    return Factor(
        np.ascontiguousarray(a, dtype=np.float32),
        np.ascontiguousarray(np.asarray(b, dtype=np.float32) * np.float32(coef)),
        transposed,
        at,
    )


def block_rows(cols: int) -> int:
    """Rows per block of a matrix with `cols` columns. Blocks start at multiples of this from the
    tensor's first row, whatever part of it is at hand, so the arithmetic (each BLAS call) is
    the same however a tensor is split into parts."""
    return max(1, BLOCK_ELEMENTS // max(cols, 1))


def merge_rows(
    w0: np.ndarray,
    factors: list[Factor],
    out: np.ndarray,
    first: int = 0,
    rounding: Rounding | None = None,
    check: BlockCheck | None = None,
) -> None:
    """out = W0 + sum of the factors, rounded once to out's dtype; `out` may be `w0` itself.

    `w0` holds rows `first` onwards of W (a part of a bigger tensor; `first` a multiple of
    `block_rows`). A bfloat16 `out` is rounded by `rounding`; `check` (bfloat16 rows only) is
    shown each rounded block before it overwrites W0's rows.
    """
    rows, cols = w0.shape
    step = block_rows(cols)
    acc_buffer, delta_buffer = _scratch(step * cols, step * (cols + STRIDE_PAD))
    narrow = out.dtype != np.float32
    if narrow and rounding is None:
        raise ValueError(f"rows rounded to {out.dtype} need a rounding")
    with np.errstate(all="ignore"):  # NaN and overflow merge as IEEE says (--allow-nonfinite)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            block, n = w0[r0:r1], (r1 - r0) * cols
            delta = padded_rows(delta_buffer, r1 - r0, cols)
            # (factor, its first row in the block, first row past it) for the rows of W they share
            terms = [
                (f, lo - first - r0, hi - first - r0)
                for f in factors
                for lo, hi in [(max(first + r0, f.at), min(first + r1, f.at + f.rows))]
                if lo < hi
            ]
            if narrow:
                acc = acc_buffer[:n].reshape(r1 - r0, cols)
                into = _rounded(out.dtype, n).reshape(block.shape)
            else:  # float32 rows are summed where they go (in W0's own rows if out is W0)
                acc = into = block if out is w0 else out[r0:r1]
            one = len(terms) == 1 and terms[0][1:] == (0, r1 - r0)
            if narrow and one and block.dtype == out.dtype:  # widen, add, round in one pass
                _term(terms[0][0], first + r0 - terms[0][0].at, delta)
                rounding.round_sum(block, delta, into)
            else:
                if acc is not block:
                    np.copyto(acc, block)  # bfloat16 -> float32 is exact
                for f, b0, b1 in terms:
                    _term(f, first + r0 + b0 - f.at, delta[: b1 - b0])
                    acc[b0:b1] += delta[: b1 - b0]
                if not narrow:
                    continue
                rounding.round(acc, into)
            if check is not None:
                check(first + r0, block, into)
            np.copyto(out[r0:r1], into)  # (rounded apart: a kernel over W0 in place is scalar)


def _term(f: Factor, d0: int, into: np.ndarray) -> None:
    """Rows d0 onwards of the factor's dW, as many as `into` holds."""
    d1 = d0 + into.shape[0]
    if f.transposed:  # rows d0:d1 of (B@A)^T are A[:, d0:d1]^T @ B^T
        np.matmul(f.a[:, d0:d1].T, f.b.T, out=into)
    else:
        np.matmul(f.b[d0:d1], f.a, out=into)


def _rounded(dtype: np.dtype, n: int) -> np.ndarray:
    """This thread's buffer for a block rounded to `dtype` before it is checked."""
    buffer = getattr(_local, "rounded", None)
    if buffer is None or buffer.dtype != dtype or buffer.size < n:
        buffer = _local.rounded = np.empty(n, dtype)
    return buffer[:n]


def _scratch(n: int, padded: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's float32 block buffers (`n` elements, and `padded` for the terms), reused
    from tensor to tensor (no fresh pages)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None or buffers[0].size < n or buffers[1].size < padded:
        buffers = _local.buffers = (np.empty(n, np.float32), np.empty(padded, np.float32))
    return buffers
