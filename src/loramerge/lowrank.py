"""Low-rank factor algebra in numpy, no I/O: truncated SVDs of B @ A and of full deltas.

Every result is a pair (B, A) with the singular values split evenly between them
(B = U sqrt(S), A = sqrt(S) V^T), so the product needs no scale.
"""

from __future__ import annotations

import numpy as np

# At or below this many columns and rows an exact SVD is cheap; above, a randomized one.
EXACT_LIMIT = 512
_OVERSAMPLE = 8
_PASSES = 4
_SEED = 0
_ROW_BLOCK = 256


def split(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) = (U sqrt(S), sqrt(S) V^T): the singular values shared evenly."""
    root = np.sqrt(s)
    return u * root, root[:, None] * vt


def factored_svd(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of B @ A (B: m x k, A: k x n) from QR of each factor and an SVD of the k x k core.

    The m x n product is never formed. Works in float64.
    """
    qb, rb = np.linalg.qr(b.astype(np.float64))
    qa, ra = np.linalg.qr(a.astype(np.float64).T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    return qb @ u, s, vt @ qa.T


def truncate_factors(b: np.ndarray, a: np.ndarray, rank: int):
    """B @ A compressed to at most `rank`: (B', A', singular values of B @ A, rank kept)."""
    u, s, vt = factored_svd(b, a)
    keep = min(rank, len(s))
    new_b, new_a = split(u[:, :keep], s[:keep], vt[:keep])
    return new_b, new_a, s, keep


def delta_svd(delta: np.ndarray, rank: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading singular triplets of `delta`: all of them (exact SVD, `rank` None or the matrix
    small), else `rank` plus a few from a randomized SVD with a fixed seed.

    The randomized one multiplies a random block by `delta` and its transpose in turn (_PASSES
    products, each orthonormalized before the next: with 4, one power iteration) and takes the
    SVD of the last, thin product P = delta^T Q (delta ~ Q P^T) from P's QR and an SVD of its
    small triangle, never of a wide matrix.
    """
    small = min(delta.shape) <= EXACT_LIMIT
    if rank is None or small or rank + _OVERSAMPLE >= min(delta.shape) // 2:
        u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
        return u, s, vt
    k = rank + _OVERSAMPLE
    basis = np.random.default_rng(_SEED).standard_normal((delta.shape[1], k)).astype(delta.dtype)
    for step in range(_PASSES):
        transposed = step % 2 == 1
        product = (delta.T if transposed else delta) @ basis
        if step < _PASSES - 1:
            basis = _orthonormal(product).astype(delta.dtype)
    # delta ~ product @ basis^T (or its transpose): SVD of the product, thin, via its QR.
    q = _orthonormal(product)
    r = q.T @ product.astype(np.float64)
    small_u, s, small_vt = np.linalg.svd(r)
    left, right = q @ small_u, basis.astype(np.float64) @ small_vt.T
    if transposed:
        left, right = right, left
    return left, s, right.T


def residual_norm(delta: np.ndarray, b: np.ndarray, a: np.ndarray) -> float:
    """||delta - B @ A||_F, computed in float64 a block of rows at a time."""
    total = 0.0
    a64 = a.astype(np.float64)
    for start in range(0, delta.shape[0], _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        diff = b[rows].astype(np.float64) @ a64
        np.subtract(delta[rows], diff, out=diff)
        flat = diff.ravel()
        total += float(np.dot(flat, flat))
    return float(np.sqrt(total))


def rank_for_energy(s: np.ndarray, total: float, energy: float) -> int:
    """Smallest rank whose singular values hold `energy` of `total` (= ||delta||_F^2)."""
    if total == 0.0:
        return 0
    kept = np.cumsum(s.astype(np.float64) ** 2)
    return int(min(np.searchsorted(kept, energy * total * (1 - 1e-12)) + 1, len(s)))


def _orthonormal(matrix: np.ndarray) -> np.ndarray:
    """Orthonormal basis of a tall, thin matrix's columns, in float64: Cholesky QR twice (two
    small Gram matrices and triangular inverses, far cheaper than LAPACK's QR of a tall matrix on
    a busy machine), or Householder QR when the columns are (nearly) dependent."""
    q = matrix.astype(np.float64)
    try:
        for _ in range(2):
            upper = np.linalg.cholesky(q.T @ q).T
            q = q @ np.linalg.inv(upper)
    except np.linalg.LinAlgError:
        q, _ = np.linalg.qr(matrix.astype(np.float64))
    return q
