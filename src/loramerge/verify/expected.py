"""What a merged tensor should hold, in float64, a block of rows at a time.

Plain LoRA on a matrix (nearly every merge) is computed here with numpy, so the common check
never imports torch; DoRA, convolutions, bias, replaced rows and whole replaced tensors go
through `delta` with torch (`torch_expected`, loaded only then). Either way the terms are added
in the same order, the coefficient folded into B, as the merge does.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from loramerge import dtypes
from loramerge.adapter import Adapter
from loramerge.blocked import BLOCK_ELEMENTS
from loramerge.plan import TensorPlan, as_matrix, matrix_shape
from loramerge.source.checkpoint import Checkpoint, read_buffer

# (r0, r1, rows r0:r1 in float64); a yielded block is overwritten by the next one
Blocks = Iterator[tuple[int, int, np.ndarray]]
# (A, B times the coefficient, transposed, first row of W that dW covers), in float64
_Factor = tuple[np.ndarray, np.ndarray, bool, int]


def by_numpy(plan: TensorPlan, base: Checkpoint) -> bool:
    """Whether numpy computes this tensor's expected value: plain LoRA on a float matrix."""
    return (
        bool(plan.lora)
        and base.tensors[plan.source].dtype in dtypes.FLOAT_DTYPES
        and not (plan.replace or plan.rows or plan.bias)
        and (len(plan.shape) == 2 or all(t.part for t in plan.lora))
        and all(t.module.kind != "conv" and not t.module.magnitude_key for t in plan.lora)
    )


def expected_blocks(
    plan: TensorPlan,
    base: Checkpoint,
    adapters: list[Adapter],
    allowance: bool,
    split: bool = False,
) -> tuple[StoredRows | np.ndarray, Blocks, Blocks | None]:
    """(W0 as a matrix, rows by slicing, blocks of the expected value, and, when `allowance`
    is asked for and applies, blocks of the float32 arithmetic error bound aligned with them).

    `split` (numpy route only, see `by_numpy`): the blocks hold the adapters' terms alone, to
    be added to W0's rows where they are measured (`Distance.add_sum`)."""
    if not by_numpy(plan, base):
        from loramerge.verify import torch_expected  # torch, loaded only for these tensors

        return torch_expected.expected_blocks(plan, base, adapters, allowance)
    w0 = StoredRows(base, plan)
    factors = float64_factors(plan, adapters)
    blocks = _blocks(w0, factors, start_from_w0=not split)
    if not allowance:
        return w0, blocks, None
    return w0, blocks, _float32_allowance(w0, factors)


def float64_factors(plan: TensorPlan, adapters: list[Adapter]) -> list[_Factor]:
    """The tensor's plain LoRA terms in float64, each coefficient folded into B as the merge
    folds it."""
    factors = []
    for t in plan.lora:
        read = adapters[t.adapter].weights.read
        a, b = t.factors(read(t.module.a_key), read(t.module.b_key))
        at = t.part.at if t.part else 0
        factors.append(
            (a.astype(np.float64), b.astype(np.float64) * t.coef, t.module.transposed, at)
        )
    return factors


class StoredRows:
    """W0 as the matrix the plan sees, read a band of rows at a time (`w0[r0:r1]`), so a check
    holds no whole tensor; a band stays valid until another one is read. Tensors computed on
    read (pickles, NF4 round trips, a GGUF base's dequantized blocks) are read whole, once."""

    def __init__(self, base: Checkpoint, plan: TensorPlan) -> None:
        info = base.tensors[plan.source]
        self.shape = matrix_shape(plan, tuple(info.shape))
        self.dtype = dtypes.to_numpy(info.dtype)
        self._base, self._name = base, plan.source
        self._whole = None
        if base.raw(plan.source) is None or getattr(base, "gguf", None) is not None:
            whole = base.read(plan.source, read_buffer(info.nbytes))
            self._whole = as_matrix(whole, plan).reshape(self.shape)
        self._band: tuple[int, int] | None = None
        self._buffer = np.empty(0, np.uint8)

    def __getitem__(self, rows: slice) -> np.ndarray:
        r0, r1 = rows.start or 0, self.shape[0] if rows.stop is None else rows.stop
        if self._whole is not None:
            return self._whole[r0:r1]
        cols = self.shape[1]
        if self._band != (r0, r1):
            nbytes = (r1 - r0) * cols * self.dtype.itemsize
            if self._buffer.size < nbytes:
                self._buffer = np.empty(nbytes, np.uint8)
            self._base.read_part(self._name, r0 * cols, r1 * cols, self._buffer)
            self._band = (r0, r1)
        count = (r1 - r0) * cols
        return self._buffer[: count * self.dtype.itemsize].view(self.dtype).reshape(-1, cols)


def _float32_allowance(w0: StoredRows, factors: list[_Factor]) -> Blocks:
    """Blocks of the float32 arithmetic error bound of a merge stored in float32.

    Such a merge keeps the error of its float32 sum, which no rounding hides:
    |error| <= gamma_n * M, M = |W0| + sum |c| * |B| @ |A|, n = sum (r + 2) + 1 (the standard
    bound for the rank-r dot products and the accumulation; Higham, ch. 3).
    """
    gamma = float32_gamma([a.shape[0] for a, *_ in factors])
    absolute = [(np.abs(a), np.abs(b), transposed, at) for a, b, transposed, at in factors]
    for r0, r1, block in _blocks(w0, absolute, magnitude=True):
        block *= gamma
        yield r0, r1, block


def float32_gamma(ranks: list[int]) -> float:
    """gamma_n = n u / (1 - n u) for float32 (u = 2^-24), n = sum (r + 2) + 1 over the terms."""
    n = sum(r + 2 for r in ranks) + 1
    u = 2.0**-24
    return n * u / (1 - n * u)


def _blocks(
    w0: StoredRows, factors: list[_Factor], magnitude: bool = False, start_from_w0: bool = True
) -> Blocks:
    """W0 + the factors' terms (|W0| + ... with `magnitude`; the terms alone without
    `start_from_w0`), in cache-sized row blocks."""
    rows, cols = w0.shape
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    scratch, delta = np.empty(step * cols, np.float64), np.empty(step * cols, np.float64)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        acc = scratch[: (r1 - r0) * cols].reshape(r1 - r0, cols)
        with np.errstate(all="ignore"):  # NaN and overflow as IEEE says (--allow-nonfinite)
            if start_from_w0:
                np.copyto(acc, w0[r0:r1])
                if magnitude:
                    np.abs(acc, out=acc)
            add_terms(acc, delta, r0, r1, factors, fresh=not start_from_w0)
        yield r0, r1, acc


def add_terms(
    acc: np.ndarray,
    delta: np.ndarray,
    r0: int,
    r1: int,
    factors: list[_Factor],
    fresh: bool = False,
) -> None:
    """Rows r0:r1 of W (in `acc`) += each factor's share of them (`delta`: scratch); with
    `fresh`, acc holds nothing yet and ends as the sum of the terms."""
    for a, b, transposed, at in factors:
        height = a.shape[1] if transposed else b.shape[0]
        lo, hi = max(r0, at), min(r1, at + height)
        if lo >= hi:
            continue
        band, d0, d1 = acc[lo - r0 : hi - r0], lo - at, hi - at
        whole = fresh and (lo, hi) == (r0, r1)
        if fresh and not whole:
            acc.fill(0.0)
        fresh = False
        term = band if whole else delta[: band.size].reshape(band.shape)
        if transposed:  # rows d0:d1 of (B@A)^T are A[:, d0:d1]^T @ B^T
            np.matmul(a[:, d0:d1].T, b.T, out=term)
        else:
            np.matmul(b[d0:d1], a, out=term)
        if not whole:
            band += term
    if fresh:  # no term reaches these rows
        acc.fill(0.0)
