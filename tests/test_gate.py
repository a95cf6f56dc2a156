"""The float32 gate of a rebuild's source check (`verify.gate`) against the float64 pass.

The gate may leave a block to the float64 pass, but it must never pass one the float64 pass
(here its numpy oracle) refuses; and a correctly merged block, zeros, cancellations and values
near zero included, it must pass, or it saves nothing.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from float64_oracle import Float64Distance
from test_fast_checks import _rounded

from loramerge.compare import ulp
from loramerge.verify.gate import Float32Gate

BF16 = np.dtype(ml_dtypes.bfloat16)
RANK, COLS = 16, 48


def _factors(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """L (B times a coefficient float64 cannot hold exactly) and R (an adapter's float32 A),
    with rows of every scale: untrained (zero), tiny, usual, and terms far larger than W0."""
    right = (rng.standard_normal((RANK, COLS)) * 0.02).astype(np.float32).astype(np.float64)
    scale = rng.choice([0.0, 1e-6, 0.01, 0.01, 0.01, 3.0], size=(rows, 1))
    left = rng.standard_normal((rows, RANK)) * scale * (32 / 3**0.5)
    return left, right


def _base(rng: np.random.Generator, terms: np.ndarray) -> np.ndarray:
    """W0 in bfloat16: usual weights, zeros, values near zero and near powers of two, and
    values that cancel the terms (W0 + terms about 0)."""
    kind = rng.integers(0, 5, terms.shape)
    values = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3],
        [
            rng.standard_normal(terms.shape) * 0.02,
            np.zeros(terms.shape),
            rng.standard_normal(terms.shape) * 1e-7,
            2.0 ** rng.integers(-12, 2, terms.shape) * (1 - 2.0**-9),
        ],
        -terms,
    )
    return _rounded(values, BF16)


def _candidate(rng, expected: np.ndarray, off: float) -> np.ndarray:
    """The correct rounding, a share `off` of it moved one or two ulps either way."""
    got = _rounded(expected, BF16)
    bits = got.view(np.uint16)
    moved = rng.random(expected.shape) < off
    steps = rng.choice(np.array([1, 2, 0xFFFF, 0xFFFE], np.uint16), int(moved.sum()))
    bits[moved] += steps
    return got


def _float64_passes(got, base, terms, tol: float) -> bool:
    """The float64 pass's verdict on a block: every element within `tol` ulps."""
    full = Float64Distance()
    full.add_sum(got, base, terms)
    return full.max_ulp_judged <= tol and full.nonfinite == 0


@pytest.mark.parametrize("tol", [1.0, 1.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_gate_passes_only_what_the_float64_pass_passes(seed, tol):
    rng = np.random.default_rng(seed)
    rows = 400
    left, right = _factors(rng, rows)
    terms = left @ right  # the float64 pass's own terms
    base = _base(rng, terms)
    expected = base.astype(np.float64) + terms
    gate = Float32Gate(left, right)
    for off in (0.0, 0.002, 0.02):
        got = _candidate(rng, expected, off)
        for first in range(0, rows, 4):  # blocks of four rows
            block = slice(first, first + 4)
            args = (got[block].reshape(-1), base[block].reshape(-1))
            float64 = _float64_passes(*args, terms[block].reshape(-1), tol)
            placed = gate.passes(first, *args, tol)
            assert float64 or not placed, (off, first)  # never passes a refusal
            if off == 0.0:  # a correct merge: every block placed, none left to float64
                assert placed, first


def test_a_block_with_a_value_that_is_not_finite_goes_to_the_float64_pass():
    rng = np.random.default_rng(3)
    left, right = _factors(rng, 8)
    terms = left @ right
    base = _rounded(rng.standard_normal(terms.shape) * 0.02, BF16)
    got = _rounded(base.astype(np.float64) + terms, BF16)
    gate = Float32Gate(left, right)
    assert gate.passes(0, got.reshape(-1), base.reshape(-1), 1.0)
    for value in (np.nan, np.inf):
        for array in (got, base):
            spoiled = array.copy()
            spoiled[3, 5] = value
            pair = [got, base]
            pair[0 if array is got else 1] = spoiled
            assert not gate.passes(0, *(a.reshape(-1) for a in pair), 1.0)


def test_the_gate_applies_to_one_factor_pair_over_every_row():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((RANK, COLS)), rng.standard_normal((32, RANK))
    assert Float32Gate.of([(a, b, False, 0)], (32, COLS)) is not None
    assert Float32Gate.of([(a, b, True, 0)], (COLS, 32)) is not None  # an embedding's (B A)^T
    assert Float32Gate.of([(a, b, False, 0)] * 2, (32, COLS)) is None  # two adapters
    assert Float32Gate.of([(a, b, False, 8)], (40, COLS)) is None  # a fused tensor's part


def test_an_embeddings_transposed_term_is_gated_as_its_float64_pass():
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((RANK, 24)) * 0.02).astype(np.float32).astype(np.float64)
    b = rng.standard_normal((COLS, RANK)) * 0.01 * 2.0
    terms = (b @ a).T  # rows of W are A's columns
    base = _rounded(rng.standard_normal(terms.shape) * 0.02, BF16)
    base[:, ::3] = _rounded(-terms[:, ::3], BF16)  # sums near zero: summed again from A's columns
    got = _rounded(base.astype(np.float64) + terms, BF16)
    gate = Float32Gate.of([(a, b, True, 0)], terms.shape)
    assert gate.passes(0, got.reshape(-1), base.reshape(-1), 1.0)
    # some sums are too near zero for the float32 bound: A's columns placed those (a view)
    bound = 2 * (RANK + 6) * 2.0**-24 * np.abs(a.T).max(axis=1)[:, None] * np.abs(b.T).sum(0)
    assert np.any(bound > ulp(base.astype(np.float64) + terms, BF16))
    got.view(np.uint16)[7, 4] += 2  # two ulps off: refused, so left to the float64 pass
    assert not _float64_passes(got.reshape(-1), base.reshape(-1), terms.reshape(-1), 1.0)
    assert not gate.passes(0, got.reshape(-1), base.reshape(-1), 1.0)


def test_a_candidate_rounded_from_float32_terms_that_cancel_is_refused():
    """Terms whose products nearly cancel: the float32 sum is many ulps of the result away from
    the float64 one, so a candidate rounded from it fails the float64 pass; the gate's bound
    must see that (without it the gate would pass it)."""
    rng = np.random.default_rng(6)
    rows = 32
    half = rng.standard_normal((RANK // 2, COLS)).astype(np.float32)
    nearly = (-half * (1 + 1e-6 * rng.standard_normal(half.shape))).astype(np.float32)
    right = np.empty((RANK, COLS), np.float64)
    right[0::2], right[1::2] = half, nearly
    left = np.repeat(rng.uniform(1, 3, (rows, RANK // 2)), 2, axis=1) / 3  # pairs cancel
    terms = left @ right
    float32 = (left.astype(np.float32) @ right.astype(np.float32)).astype(np.float64)
    base = np.zeros(terms.shape, BF16)
    got = _rounded(float32, BF16)
    gate = Float32Gate(left, right)
    refused = 0
    for first in range(rows):
        args = (got[first], base[first])
        if not _float64_passes(*args, terms[first], 1.0):
            refused += 1
            assert not gate.passes(first, *args, 1.0), first
    assert refused > rows // 2  # the case is really there
    assert gate.passes(0, _rounded(terms[:1], BF16).reshape(-1), base[0], 1.0)  # and the right one


@pytest.mark.parametrize("seed", [7, 8])
def test_the_ulp_scale_is_taken_below_a_power_of_two_the_bound_straddles(seed):
    """W0 + terms just under a power of two in float64, just over it in float32: the float64
    pass measures in the finer ulps below it. A candidate two of those below it is refused at a
    tolerance of 1.5 ulps; in the coarser ulps above, where the float32 sum lies, it would be
    within. The gate must take the finer scale."""
    rng = np.random.default_rng(seed)
    rows, power = 8192, 2.0**-4
    fine = power * 2.0**-8  # the bfloat16 spacing just under the power of two
    half = rng.standard_normal((RANK // 2, COLS)).astype(np.float32)
    nearly = (-half * (1 + 1e-3 * rng.standard_normal(half.shape))).astype(np.float32)
    right = np.empty((RANK, COLS), np.float64)
    right[0::2], right[1::2] = half, nearly
    left = np.repeat(rng.uniform(1, 3, (rows, RANK // 2)), 2, axis=1) * 0.5
    terms = left @ right
    float32 = (left.astype(np.float32) @ right.astype(np.float32)).astype(np.float64)
    # W0 on the fine grid with the terms' sign, as far under the power as the terms reach
    sign = np.sign(terms)
    base = (sign * (power - np.ceil(np.abs(terms) / fine) * fine)).astype(BF16)
    w64, w32 = base.astype(np.float64) + terms, base.astype(np.float64) + float32
    straddles = (np.abs(w64) < power) & (np.abs(w32) > power)
    got = _rounded(w64, BF16)
    got[straddles] = (sign * (power - 2 * fine))[straddles]
    gate = Float32Gate(left, right)
    tried = 0
    for first in np.flatnonzero(straddles.any(axis=1)):
        args = (got[first], base[first])
        assert not _float64_passes(*args, terms[first], 1.5)
        assert not gate.passes(int(first), *args, 1.5), first
        tried += 1
    assert tried > 0
