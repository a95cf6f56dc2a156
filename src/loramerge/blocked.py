"""The common merge on the CPU with numpy alone: W = W0 + sum_i c_i * B_i @ A_i for 2-D weights.

Plain LoRA on Linear, Conv1D (fan_in_fan_out) and embedding weights stored in bfloat16 or float32
covers nearly every real merge; doing it without torch saves the second it takes to import. The
arithmetic is the one `delta.merged_blocks` does with torch: float32, rows in cache-sized blocks
(conversion, rank-r update and rounding stay in cache), one rounding to nearest even at the end
(ml_dtypes rounds float32 to bfloat16 exactly as torch does). DoRA, convolutions, float64,
float16 and CUDA go through torch.
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

_local = threading.local()


class BlockCheck(Protocol):
    """A check shown each block `merge_rows` makes (`verify.in_pass`)."""

    def round(self, acc: np.ndarray, into: np.ndarray) -> None:
        """Round the float32 block into `into`, bit for bit as the cast to its dtype does."""

    def round_sum(self, w0: np.ndarray, delta: np.ndarray, into: np.ndarray) -> None:
        """Round W0's rows plus one float32 term into `into`: the bits of widening W0, adding
        the term and `round`, in one pass."""

    def __call__(self, first: int, w0: np.ndarray, rounded: np.ndarray) -> None:
        """Measure a block: its first row in W, W0's rows, the rounded rows."""


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
    check: BlockCheck | None = None,
) -> None:
    """out = W0 + sum of the factors, rounded once to out's dtype; `out` may be `w0` itself.

    `w0` holds rows `first` onwards of W (a part of a bigger tensor; `first` a multiple of
    `block_rows`). `check` (rows of a 16-bit out only) rounds each block (compiled, as its
    kernels are loaded anyway) and is shown it before it overwrites W0's rows.
    """
    rows, cols = w0.shape
    step = block_rows(cols)
    acc_buffer, delta_buffer = _scratch(step * cols)
    in_place = out is w0 and w0.dtype == np.float32  # accumulate in W0's rows: no copies
    with np.errstate(all="ignore"):  # NaN and overflow merge as IEEE says (--allow-nonfinite)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            block, n = w0[r0:r1], (r1 - r0) * cols
            acc = block if in_place else acc_buffer[:n].reshape(r1 - r0, cols)
            delta = delta_buffer[:n].reshape(r1 - r0, cols)
            # (factor, its first row in the block, first row past it) for the rows of W they share
            terms = [
                (f, lo - first - r0, hi - first - r0)
                for f in factors
                for lo, hi in [(max(first + r0, f.at), min(first + r1, f.at + f.rows))]
                if lo < hi
            ]
            if len(terms) == 1 and terms[0][1:] == (0, r1 - r0) and not in_place:
                _term(terms[0][0], first + r0 - terms[0][0].at, delta)
                if check is None:  # widened, added and rounded a cache-sized piece at a time
                    np.add(block, delta, out=out[r0:r1], dtype=np.float32, casting="unsafe")
                    continue
                rounded = _rounded(out.dtype, n).reshape(block.shape)
                check.round_sum(block, delta, rounded)  # widen, add and round in one pass
            else:
                if not in_place:
                    np.copyto(acc, block)  # bfloat16 -> float32 is exact
                for f, b0, b1 in terms:
                    _term(f, first + r0 + b0 - f.at, delta[: b1 - b0])
                    acc[b0:b1] += delta[: b1 - b0]
                if in_place:
                    continue
                if check is None:
                    np.copyto(out[r0:r1], acc, casting="unsafe")  # the one rounding, to even
                    continue
                rounded = _rounded(out.dtype, n).reshape(block.shape)
                check.round(acc, rounded)
            check(first + r0, block, rounded)
            np.copyto(out[r0:r1], rounded)


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


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's two float32 block buffers, reused from tensor to tensor (no fresh pages)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None or buffers[0].size < n:
        buffers = _local.buffers = (np.empty(n, np.float32), np.empty(n, np.float32))
    return buffers
