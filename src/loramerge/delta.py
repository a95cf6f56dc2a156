"""The merge arithmetic (and its inverse), pure tensor functions with no I/O.

    W = W0 + sum_i w_i * c_i

where for plain LoRA c_i = s_i * dW_i, and for DoRA c_i = f_i * (W0 + s_i * dW_i) - W0 with
f_i = m_i / ||W0 + s_i * dW_i|| (the norm taken over every axis but the output one). Every term
is computed from the pristine W0, which is what PEFT's forward pass does with several active
adapters, so the merged weight reproduces base + adapters exactly. dW by layer type follows
PEFT's `get_delta_weight`: Linear B@A, Conv1D (fan_in_fan_out) (B@A)^T, Embedding (B@A)^T,
ConvNd 1x1 a matmul of the squeezed kernels and k x k `conv(A^T, B)^T`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from loramerge.blocked import block_rows


@dataclass(frozen=True)
class Term:
    """One adapter's contribution to one tensor, with its tensors already loaded."""

    kind: str  # "linear", "conv" or "embedding"
    a: torch.Tensor
    b: torch.Tensor
    coef: float  # user weight w times LoRA scale s
    weight: float  # user weight w alone (DoRA mixes it outside the scale)
    scale: float
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None
    undo: bool = False  # taken out of a merged weight (coef already negated for plain LoRA)
    norm: torch.Tensor | None = None  # DoRA undo: the norm ||W0 + s*dW|| the merge used
    at: int = 0  # first row of W that dW covers (one expert of a stacked tensor)


def term_rows(term: Term) -> int:
    """Rows of W this term's dW covers."""
    return term.a.shape[1] if transposed(term) else term.b.shape[0]


def window(term: Term, r0: int, r1: int) -> Term | None:
    """The term on rows r0:r1 of W alone, its rows counted from r0; None if it covers none.

    A DoRA term's magnitude and norm follow its rows (untransposed DoRA: one norm per row).
    """
    lo, hi = max(r0, term.at), min(r1, term.at + term_rows(term))
    if lo >= hi:
        return None
    d0, d1 = lo - term.at, hi - term.at
    if transposed(term):
        return replace(term, a=term.a[:, d0:d1], at=lo - r0)
    magnitude = None if term.magnitude is None else term.magnitude[d0:d1]
    norm = None if term.norm is None else term.norm[d0:d1]
    return replace(term, b=term.b[d0:d1], at=lo - r0, magnitude=magnitude, norm=norm)


def transposed(term: Term) -> bool:
    """Whether dW is (B@A)^T for this term (Conv1D weights and embeddings)."""
    return term.kind == "embedding" or term.fan_in_fan_out


def output_axis(term: Term) -> int:
    """The axis of W that indexes output features (DoRA's magnitude runs along it)."""
    return 1 if transposed(term) else 0


def lora_delta(term: Term, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """dW = B@A (transposed or convolved as the layer type needs), unscaled, in `dtype`."""
    a, b = term.a.to(dtype), term.b.to(dtype)
    if term.kind == "conv":
        if all(k == 1 for k in a.shape[2:]):
            return (b.flatten(1) @ a.flatten(1)).reshape(shape)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.dim()]
        return conv(a.transpose(0, 1), b).transpose(0, 1)
    return a.T @ b.T if transposed(term) else b @ a


def merge_weight(
    w0: torch.Tensor,
    terms: list[Term],
    *,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    norms: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """W0 + sum of the terms, computed in `compute_dtype` on W0's device, rounded once.

    `out` (W0's shape, `out_dtype`) receives the result and may be W0 itself. `norms`, when
    given, receives the DoRA norm of each DoRA term (by its index in `terms`), so an unmerge
    can later invert the merge.
    """
    if out is None:
        out = torch.empty(w0.shape, dtype=out_dtype, device=w0.device)
    for r0, r1, acc in merged_blocks(w0, terms, compute_dtype, norms):
        if acc.dtype == torch.float64:
            out[r0:r1].copy_(round_once(acc, out_dtype))
        else:
            out[r0:r1].copy_(acc)  # copy_ rounds to nearest even: the one rounding
    return out


def merged_blocks(
    w0: torch.Tensor,
    terms: list[Term],
    compute_dtype: torch.dtype,
    norms: dict[int, torch.Tensor] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (r0, r1, rows r0:r1 of the unrounded merge) block by block.

    A matrix goes in cache-sized row blocks (`block_rows`; a yielded block may be overwritten by
    the next one), DoRA too when its norms are per row; convolutions and DoRA with norms over
    rows (transposed) need whole tensors and come as one block.
    """
    if w0.dim() != 2 or not row_wise(terms):
        yield 0, w0.shape[0], _merge_whole(w0, terms, compute_dtype, norms)
        return
    rows, cols = w0.shape
    step = block_rows(cols)
    if any(t.magnitude is not None for t in terms):
        yield from _dora_blocks(w0, terms, compute_dtype, step, norms)
        return
    scratch = torch.empty(step * cols, dtype=compute_dtype, device=w0.device)
    # the coefficient goes into B (r values per row), as in `blocked`, the numpy twin of this loop
    factors = [(t.a.to(compute_dtype), t.b.to(compute_dtype) * t.coef, t) for t in terms]
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        acc = scratch[: (r1 - r0) * cols].view(r1 - r0, cols)
        acc.copy_(w0[r0:r1])
        for a, b, term in factors:
            lo, hi = max(r0, term.at), min(r1, term.at + term_rows(term))
            if lo >= hi:
                continue
            band, d0, d1 = acc[lo - r0 : hi - r0], lo - term.at, hi - term.at
            if transposed(term):  # rows d0:d1 of (B@A)^T are A[:, d0:d1]^T @ B^T
                band.addmm_(a[:, d0:d1].T, b.T)
            else:
                band.addmm_(b[d0:d1], a)
        yield r0, r1, acc


def row_wise(terms: list[Term]) -> bool:
    """Whether each row of the merge depends on that row of W0 alone: no convolution, no DoRA
    whose norm runs over rows (transposed)."""
    return all(t.kind != "conv" and not (t.magnitude is not None and transposed(t)) for t in terms)


def _dora_blocks(
    w0: torch.Tensor,
    terms: list[Term],
    compute_dtype: torch.dtype,
    step: int,
    norms: dict[int, torch.Tensor] | None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """DoRA (norms per output row) and the plain terms beside it, `step` rows at a time."""
    found: dict[int, list[torch.Tensor]] = {}
    for r0 in range(0, w0.shape[0], step):
        r1 = min(w0.shape[0], r0 + step)
        kept = [(i, t) for i, t in enumerate(window(t, r0, r1) for t in terms) if t]
        block: dict[int, torch.Tensor] = {}
        yield r0, r1, _merge_whole(w0[r0:r1], [t for _, t in kept], compute_dtype, block)
        for index, norm in block.items():
            found.setdefault(kept[index][0], []).append(norm)
    if norms is not None:
        norms.update({index: torch.cat(parts) for index, parts in found.items()})


def _merge_whole(
    w0: torch.Tensor,
    terms: list[Term],
    compute_dtype: torch.dtype,
    norms: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The unblocked, unrounded merge, for DoRA (whole-row norms) and convolutions.

    Undo terms go first and recover W0; the added terms are then computed from that W0.
    """
    acc = w0.to(compute_dtype, copy=True)
    for term in terms:
        if term.undo and term.magnitude is None:
            _add_plain(acc, term, compute_dtype)
        elif term.undo:
            acc = undo_dora(acc, term, compute_dtype)
    added = [(i, t) for i, t in enumerate(terms) if not t.undo]
    base = acc.clone() if any(t.magnitude is not None for _, t in added) else None
    for index, term in added:
        if term.magnitude is None:
            _add_plain(acc, term, compute_dtype)
        else:
            contribution, norm = dora_contribution(base, term, compute_dtype)
            acc.add_(contribution, alpha=term.weight)
            if norms is not None:
                norms[index] = norm.reshape(-1)
    return acc


def _add_plain(acc: torch.Tensor, term: Term, dtype: torch.dtype) -> None:
    """acc += coef * dW on the rows dW covers."""
    band = acc[term.at : term.at + term_rows(term)]
    band.add_(lora_delta(term, band.shape, dtype), alpha=term.coef)


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to `dtype` with a single correct rounding, even from float64 to a 16-bit type.

    torch converts float64 to bfloat16/float16 through float32, rounding twice. Rounding to
    float32 "to odd" first (truncate, then set the last bit if anything was cut) makes the second
    rounding exact, since float32 keeps at least two more bits than either 16-bit format.
    """
    if x.dtype != torch.float64 or dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    single = x.to(torch.float32)
    back = single.to(torch.float64)
    bits = single.view(torch.int32)
    bits = bits - (back.abs() > x.abs()).to(torch.int32)  # one step toward zero: truncation
    bits = bits | (back != x).to(torch.int32)  # sticky bit: the value was inexact
    return bits.view(torch.float32).to(dtype)


def dora_contribution(
    base: torch.Tensor, term: Term, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, norm): c = f * (W0 + s*dW) - W0, f = magnitude / norm of W0 + s*dW per output."""
    adapted = base + lora_delta(term, base.shape, dtype) * term.scale
    axis = output_axis(term)
    other = [d for d in range(adapted.dim()) if d != axis]
    norm = torch.linalg.vector_norm(adapted, dim=other, keepdim=True)
    magnitude = term.magnitude.to(dtype).reshape(norm.shape)
    return adapted * (magnitude / norm) - base, norm


def undo_dora(merged: torch.Tensor, term: Term, dtype: torch.dtype) -> torch.Tensor:
    """W0 from W = W0 + w (f (W0 + s dW) - W0), with f = m / norm from the merge's record.

    W = W0 (1 - w + w f) + w f s dW, so W0 = (W - w f s dW) / (1 - w + w f). The norm cannot be
    recomputed from W (it is the norm of the unmerged W0 + s dW), hence the stored one.
    """
    shape = [1] * merged.dim()
    shape[output_axis(term)] = -1
    factor = (term.magnitude.to(dtype) / term.norm.to(dtype)).reshape(shape)
    delta = lora_delta(term, merged.shape, dtype) * term.scale
    w = term.weight
    return (merged - w * factor * delta) / (1 - w + w * factor)


def add_bias(
    b0: torch.Tensor,
    deltas: list[tuple[float, torch.Tensor]],
    *,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """b0 + sum coef * lora_B.bias: lora_bias is scaled like B (PEFT Linear.merge)."""
    acc = b0.to(compute_dtype).clone()
    for coef, bias in deltas:
        acc.add_(bias.to(compute_dtype), alpha=coef)
    return round_once(acc, out_dtype)


def replace_rows(w0: torch.Tensor, indices: list[int], rows: torch.Tensor) -> torch.Tensor:
    """W0 with the given rows replaced (trainable tokens store the new rows, not deltas)."""
    out = w0.clone()
    out[torch.tensor(indices, dtype=torch.long, device=w0.device)] = rows.to(w0)
    return out
