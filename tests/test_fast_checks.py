"""The fast weight check (the compiled float64 pass for bfloat16 and float32; for float16,
float32 decides and float64 settles) against the full float64 pass.

Every figure must be the float64 pass's own: the element, exact and non-finite counts and the
maxima (max abs, max ulp at the scale, judged, at the value) exactly; the squared error (RMSE) is
a float sum whose order differs, so it must agree within its summation bound, N * 2^-52 relative.
"""

from __future__ import annotations

import math
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA, ROOT
from float64_oracle import Float64Distance
from test_numpy_route import IMPORTS_TORCH

from loramerge import dtypes
from loramerge.compare import Distance
from loramerge.delta import round_once
from loramerge.merge import MergeOptions, merge
from loramerge.swap import unmerge
from loramerge.verify import weights as weight_check
from loramerge.verify.weights import verify_weights

BF16, F16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
EXACT_FIELDS = ("elements", "exact", "nonfinite", "max_abs", "max_ulp", "max_ulp_at_value")


def _rounded(expected: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The correctly rounded values, by the torch rounding the merge uses."""
    torch_dtype = dtypes.to_torch(dtypes.from_numpy(dtype))
    return dtypes.as_numpy(round_once(torch.from_numpy(expected), torch_dtype))


def _grid(dtype: np.dtype, values: np.ndarray) -> np.ndarray:
    """`values` (float64) moved onto the grid of `dtype`, as float64."""
    return _rounded(values, dtype).astype(np.float64)


def _boundary_cases(dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """Expected values on and around the rounding boundaries of `dtype`, plus the awkward ones."""
    finfo = ml_dtypes.finfo(dtype)
    below = _grid(dtype, rng.standard_normal(4000) * 0.05)
    above = np.nextafter(below.astype(dtype), np.array(np.inf, dtype)).astype(np.float64)
    middle = (below + above) / 2  # ties, exactly
    single = middle.astype(np.float32)
    cases = [
        middle,
        np.nextafter(single, np.float32(np.inf)).astype(np.float64),  # one float32 ulp either
        np.nextafter(single, np.float32(-np.inf)).astype(np.float64),  # side of the midpoint
        np.nextafter(middle, np.inf),  # one float64 ulp either side
        np.nextafter(middle, -np.inf),
        float(finfo.smallest_subnormal) * (rng.integers(0, 64, 500) + 0.5),  # subnormal ties
        float(finfo.smallest_subnormal) * rng.uniform(-64, 64, 500),  # subnormals
        2.0 ** rng.integers(-20, 4, 300) * (1 - 2.0**-53),  # a float64 ulp below a power of 2
        2.0 ** rng.integers(-20, 4, 300) * (1 + 2.0**-24),  # a float32 ulp above one
        np.array([0.0, -0.0, 1e-300, -1e-300, float(finfo.max), -float(finfo.max)]),
        np.array([float(finfo.max) * (1 + 2.0**-9), 3.5e38, 1e39, 1e300]),  # overflow edges
    ]
    return np.concatenate(cases)


def _candidates(expected: np.ndarray, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """Mostly the correct rounding; some one ulp off, a few far off."""
    got = _rounded(expected, dtype)
    bits = got.view(np.uint16)
    off = rng.random(expected.size) < 0.05
    bits[off] += rng.choice(np.array([1, 0xFFFF], np.uint16), int(off.sum()))  # +-1 ulp
    far = rng.random(expected.size) < 0.002
    got[far] = (expected[far] * 1.5).astype(dtype)
    return got


def _assert_same(fast, full) -> None:
    for name in EXACT_FIELDS:
        assert getattr(fast, name) == getattr(full, name), name
    assert fast.max_ulp_judged == full.max_ulp_judged
    bound = max(fast.elements, 1) * 2.0**-52 * full.squared_error
    assert abs(fast.squared_error - full.squared_error) <= bound


def _measure(distance, pieces) -> None:
    for piece in pieces:
        distance.add(*piece)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boundary_cases_match_the_float64_pass(dtype, seed):
    rng = np.random.default_rng(seed)
    expected = _boundary_cases(dtype, rng)
    expected = expected[rng.permutation(expected.size)]
    got = _candidates(expected, dtype, rng)
    start = rng.standard_normal(expected.size) * np.abs(expected).max()  # cancellations
    start[rng.random(expected.size) < 0.5] = 0.0
    fast, full = Distance(), Float64Distance()
    pieces = [
        (got[i : i + 3000], expected[i : i + 3000], [start[i : i + 3000]])
        for i in range(0, got.size, 3000)
    ]
    _measure(fast, pieces)
    _measure(full, pieces)
    _assert_same(fast, full)
    assert 0 < fast.exact < fast.elements


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_nonfinite_values_match_the_float64_pass(dtype):
    rng = np.random.default_rng(5)
    expected = rng.standard_normal(4096) * 0.1
    expected[:6] = [np.inf, -np.inf, np.nan, 1e39, 0.5, -0.25]
    got = _rounded(expected, dtype)
    got[4:6] = [np.inf, np.nan]  # finite expected, non-finite candidate
    through = np.abs(expected)
    through[7] = np.nan  # a NaN in a model the candidate passed through
    for piece in ((got, expected, [through]), (got[6:], expected[6:], [through[6:]])):
        fast, full = Distance(), Float64Distance()
        fast.add(*piece)
        full.add(*piece)
        _assert_same(fast, full)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_a_finite_value_where_inf_or_nan_is_expected_is_counted(dtype):
    """A candidate that is not the inf or NaN expected there (finite, or the other infinity)
    is a non-finite mismatch, as a NaN or inf where a finite value is expected is: the error
    counts such elements as 0, so this count is what fails them."""
    expected = np.array([np.nan, np.inf, -np.inf, np.inf, np.nan, 0.5, np.inf, -np.inf] * 9)
    got = np.array([0.0, 1.0, -np.inf, -np.inf, np.nan, np.nan, np.inf, 3.0] * 9).astype(dtype)
    for chunk in (slice(None), slice(0, 8), slice(3, 7)):
        fast, full = Distance(), Float64Distance()
        fast.add(got[chunk], expected[chunk])
        full.add(got[chunk], expected[chunk])
        _assert_same(fast, full)
    assert full.nonfinite == 2  # the last chunk: -inf for inf and NaN for 0.5 (NaN for NaN and
    # inf for inf are right)
    whole = Float64Distance()
    whole.add(got, expected)
    assert whole.nonfinite == 5 * 9  # 0 for NaN, 1 for inf, -inf for inf, NaN for 0.5, 3 for -inf


@pytest.mark.parametrize("dtype", [F16], ids=["float16"])
def test_a_correct_large_merge_is_decided_without_float64_for_almost_every_element(
    dtype, monkeypatch
):
    """A float16 merge of realistic size: same figures, and at most 1% of elements settled in
    float64 (bfloat16 goes through the compiled pass, which measures every element)."""
    rng = np.random.default_rng(3)
    w0 = _grid(dtype, rng.standard_normal((1024, 1024)) * 0.02)
    b, a = rng.standard_normal((1024, 16)) * 0.01, rng.standard_normal((16, 1024)) * 0.01
    expected = w0 + 2.0 * (b @ a)
    got = _rounded(expected, dtype)
    got.view(np.uint16)[7, 9] += 1  # one element one ulp off, which must be seen
    settled = []
    settle = Distance._settle

    def counting(self, candidate, *rest):
        settled.append(candidate.size)
        return settle(self, candidate, *rest)

    monkeypatch.setattr(Distance, "_settle", counting)
    fast, full = Distance(), Float64Distance()
    piece = (got, expected, [w0.astype(dtype)])
    fast.add(*piece)
    full.add(*piece)
    _assert_same(fast, full)
    assert fast.exact == fast.elements - 1 and 0.5 < fast.max_ulp < 1.5
    assert sum(settled) < 0.01 * got.size


def test_float32_candidates_with_an_allowance_match_the_float64_pass():
    rng = np.random.default_rng(4)
    expected = rng.standard_normal(50000) * 0.1
    got = expected.astype(np.float32)
    got[::97] = np.nextafter(got[::97], np.float32(np.inf))
    allowance = np.abs(expected) * 2.0**-24 * rng.uniform(0, 3, expected.size)
    fast, full = Distance(), Float64Distance()
    fast.add(got, expected, [expected * 2], allowance)
    full.add(got, expected, [expected * 2], allowance)
    _assert_same(fast, full)
    assert fast.max_ulp_judged < fast.max_ulp
    for distance in (fast, full):  # then a block with no allowance: judged is its raw ulp
        distance.add(got[::50], expected[::50] * (1 + 2.0**-12))
    _assert_same(fast, full)


def _neighbourhoods(dtype: np.dtype, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(candidate, float64 value) pairs around every rounding decision of `dtype`: for each
    candidate (every bfloat16 pattern, or 50,000 random float32 ones, plus the edges), the
    value itself, its ties with both neighbours and one float64 ulp either side of them, and
    the same values with the sign flipped (a zero keeps its sign)."""
    uint = np.dtype(f"u{dtype.itemsize}")
    if dtype.itemsize == 2:
        patterns = np.arange(1 << 16, dtype=np.uint32).astype(uint)
    else:
        edges = [0, 1, 2, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, 0x7FC00000]
        patterns = np.concatenate([rng.integers(0, 1 << 32, 50000), edges]).astype(np.uint64)
        patterns = np.concatenate([patterns, patterns | 0x80000000]).astype(uint)
    got = patterns.view(dtype)
    finite = np.isfinite(got.astype(np.float64))
    values = [got.astype(np.float64)]
    for way in (np.inf, -np.inf):
        with np.errstate(all="ignore"):
            other = np.nextafter(got, np.array(way, dtype)).astype(np.float64)
            tie = np.where(finite, (values[0] + other) / 2, values[0])  # past the top: to inf
            values += [tie, np.nextafter(tie, np.inf), np.nextafter(tie, -np.inf)]
    values = np.concatenate(values)
    values = np.concatenate([values, -values])
    candidates = np.concatenate([got] * (values.size // got.size))
    others = rng.random(candidates.size) < 0.2  # and some candidates for another value
    candidates[others] = rng.choice(got, int(others.sum()))
    return candidates, values


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bfloat16", "float32"])
def test_the_compiled_pass_knows_each_correctly_rounded_element(dtype):
    """Every element the compiled pass counts as correctly rounded is the torch rounding the
    merge uses, one element at a time: ties both ways, a float64 ulp off them, subnormals,
    signed zeros, the overflow to inf and NaN."""
    from loramerge import kernels

    rng = np.random.default_rng(21)
    got, want = _neighbourhoods(dtype, rng)
    with np.errstate(all="ignore"):
        right = _rounded(want, dtype)
    uint = np.dtype(f"u{dtype.itemsize}")
    truth = (got.view(uint) == right.view(uint)) | (
        np.isnan(got.astype(np.float64)) & np.isnan(want)
    )
    bits = got.view(np.uint16) if dtype == BF16 else got
    mantissa, emin = (7, -126) if dtype == BF16 else (23, -126)
    empty, out = np.empty(0), np.zeros(7)
    minus_zero = np.full(got.size, -0.0)  # w + -0.0 is w, signed zeros and NaN included
    # one element per call, through the C function itself (its wrapper's checks would cost
    # more than the element): the elements' addresses, one after another
    measure = kernels.kernel(f"measure-{'u16' if dtype == BF16 else 'f32'}-f64-f64")
    got_at, want_at, nothing, into = (a.ctypes.data for a in (bits, want, empty, out))
    # the expected value given whole, and as W0 + terms (the loop that assumes finite values
    # first, measuring again in full when one is not)
    for terms in (empty, minus_zero):
        decided = np.empty(got.size, bool)
        terms_at, step, count = terms.ctypes.data, 8 if terms.size else 0, min(terms.size, 1)
        for i in range(got.size):
            out.fill(0.0)
            at = (got_at + i * bits.itemsize, want_at + i * 8, terms_at + i * step, count)
            measure(*at, nothing, 0, nothing, 0, mantissa, emin, into, 1)
            decided[i] = out[0] == 1
        wrong = np.flatnonzero(decided != truth)
        assert wrong.size == 0, [(got[i], want[i], truth[i]) for i in wrong[:5]]
    assert 0.1 < truth.mean() < 0.9


def _perturbed(got: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`got` with about 5% of elements moved one ulp up or down (any float format)."""
    bits = got.view(np.dtype(f"u{got.dtype.itemsize}"))
    off = rng.random(got.size) < 0.05
    step = rng.choice(np.array([1, -1]), int(off.sum())).astype(bits.dtype)  # -1 wraps: down
    bits[off] += step
    return got


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("scales", [0, 1, 2])
def test_the_compiled_pass_alone_gets_the_float64_pass_figures(dtype, scales, monkeypatch):
    """bfloat16 and float32 candidates are measured by `compare_kernel` with no numpy pass:
    `add`, `add_sum` (the expected value as W0 + terms, summed where it is measured) and
    `add_stored`, with zero to two models in the ulp scale, on rounding boundaries, NaN and inf."""

    def refuse(*_):
        raise AssertionError("the numpy pass ran")

    monkeypatch.setattr(Distance, "_settle", refuse)
    monkeypatch.setattr(Distance, "_add_fast", refuse)
    rng = np.random.default_rng(11 + scales)
    target = _boundary_cases(dtype, rng)
    target = target[rng.permutation(target.size)]
    base = _rounded(target * rng.uniform(0, 1.5, target.size), dtype)  # W0, cancellations too
    base[:4] = [np.inf, np.nan, 0.0, -0.0]
    with np.errstate(invalid="ignore"):  # inf - inf and NaN, on purpose
        terms = target - base.astype(np.float64)
        terms[4:8] = [np.nan, -np.inf, 1e300, 0.0]
        expected = base.astype(np.float64) + terms
    got = _perturbed(_rounded(expected, dtype), rng)
    got[8:10] = [np.nan, np.inf]
    through = [_rounded(rng.standard_normal(target.size) * 0.1, dtype) for _ in range(scales)]
    cases = {
        "add": lambda d: d.add(got, expected, [base, *through]),
        "add_sum": lambda d: d.add_sum(got, base, terms, through),
        "add_stored": lambda d: d.add_stored(got, base, through),
    }
    for name, measure in cases.items():
        fast, full = Distance(), Float64Distance()
        measure(fast)
        measure(full)
        _assert_same(fast, full)
        assert 0 < fast.exact < fast.elements and fast.nonfinite > 0, name


def test_a_verdict_alone_gets_the_float64_pass_maxima(monkeypatch):
    """`add_verdict` (a rebuild's check of its source, which only passes or refuses) keeps
    max_abs and max_ulp, and so the verdict, exactly as the float64 pass finds them, on
    rounding boundaries and cancellations, block by block, all in the compiled verdict pass;
    a block with a NaN or an inf goes through the full pass, which counts it."""
    full_passes = []
    add_sum = Distance.add_sum
    monkeypatch.setattr(
        Distance, "add_sum", lambda self, *a: full_passes.append(1) or add_sum(self, *a)
    )
    rng = np.random.default_rng(21)
    target = _boundary_cases(BF16, rng)
    target = target[rng.permutation(target.size)]
    base = _rounded(target * rng.uniform(0, 1.5, target.size), BF16)  # W0, cancellations too
    with np.errstate(invalid="ignore"):  # the overflow edges' inf - inf, left out below
        terms = target - base.astype(np.float64)
        got = _perturbed(_rounded(base.astype(np.float64) + terms, BF16), rng)
        finite = np.isfinite(got.astype(np.float64) - base.astype(np.float64) - terms)
    got, base, terms = got[finite], base[finite], terms[finite]
    fast, full = Distance(), Float64Distance()
    for piece in np.array_split(np.arange(got.size), 7):
        fast.add_verdict(got[piece], base[piece], terms[piece])
        full.add_sum(got[piece], base[piece], terms[piece])
    assert not full_passes and not fast.figures
    for name in ("elements", "max_abs", "max_ulp", "max_ulp_judged"):
        assert getattr(fast, name) == getattr(full, name), name
    assert full.max_ulp > 1.0  # the elements moved one ulp: the verdict is a refusal
    got[:3] = [np.nan, np.inf, 1.0]
    terms[2] = np.inf
    fast.add_verdict(got[:100], base[:100], terms[:100])
    full.add_sum(got[:100], base[:100], terms[:100])
    assert full_passes and fast.nonfinite == full.nonfinite > 0
    assert (fast.max_abs, fast.max_ulp) == (full.max_abs, full.max_ulp)


def _merged(tmp_path, base, adapters, weights=(), **options):
    out = tmp_path / "merged"
    merge(base, [ADAPTERS / a for a in adapters], out, MergeOptions(weights=weights, **options))
    return out


def _both(monkeypatch, *args, **kwargs):
    """The report of the fast check and the one of the full float64 pass."""
    fast = verify_weights(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(weight_check, "Distance", Float64Distance)
        full = verify_weights(*args, **kwargs)
    return fast, full


def _assert_same_reports(fast, full) -> None:
    assert fast.passed == full.passed and fast.verdict() == full.verdict()
    assert len(fast.tensors) == len(full.tensors)
    for mine, theirs in zip(fast.tensors, full.tensors, strict=True):
        for name in ("name", "kind", "elements", "exact_share", "max_abs", "max_ulp"):
            assert getattr(mine, name) == getattr(theirs, name), (mine.name, name)
        assert mine.max_ulp_at_value == theirs.max_ulp_at_value, mine.name
        assert mine.max_ulp_judged == theirs.max_ulp_judged, mine.name
        assert (mine.passed, mine.note) == (theirs.passed, theirs.note), mine.name
        # RMSE: a float sum in another order, so the square within N * 2^-52 relative
        assert math.isclose(mine.rmse, theirs.rmse, rel_tol=mine.elements * 2.0**-53, abs_tol=0)


@pytest.mark.parametrize(
    "base, adapters, weights, options",
    [
        (LLAMA, ["llama-lora"], (), {}),
        (LLAMA, ["llama-embed"], (), {}),
        (LLAMA, ["llama-dora", "llama-lora-b"], (1.0, -0.5), {}),
        (LLAMA, ["llama-resized"], (), {"compute_dtype": "float64"}),
        (LLAMA, ["llama-tokens"], (), {}),
        (LLAMA, ["llama-rslora", "llama-patterns"], (0.7, 1.3), {}),
        (LLAMA, ["llama-lora"], (), {"dtype": "float16"}),
        (LLAMA, ["llama-lora"], (), {"dtype": "float32"}),
        (GPT2, ["gpt2-lora"], (), {}),
        (GPT2, ["gpt2-embed"], (), {"compute_dtype": "float64"}),
    ],
)
def test_fixture_merges_get_the_float64_pass_figures(
    tmp_path, monkeypatch, base, adapters, weights, options
):
    out = _merged(tmp_path, base, adapters, weights, **options)
    paths = [ADAPTERS / a for a in adapters]
    fast, full = _both(monkeypatch, out, base, paths, list(weights) or None)
    _assert_same_reports(fast, full)
    assert fast.passed
    if {"llama-resized", "llama-tokens"} & set(adapters):
        return  # replaced tensors and rows cannot be weighted
    wrong = [w * 1.01 for w in weights or [1.0] * len(adapters)]
    fast, full = _both(monkeypatch, out, base, paths, wrong)
    _assert_same_reports(fast, full)
    assert not fast.passed


def test_unmerge_drift_and_rebase_checks_get_the_float64_pass_figures(tmp_path, monkeypatch):
    """An unmerge's drift is measured with the merged model in the ulp scale (`through`)."""
    merged = _merged(tmp_path, LLAMA, ["llama-lora", "llama-lora-b"])
    out = tmp_path / "unmerged"
    unmerge(merged, [ADAPTERS / "llama-lora-b"], out)
    kept = [ADAPTERS / "llama-lora"]
    fast, full = _both(monkeypatch, out, LLAMA, kept, through=[merged])
    _assert_same_reports(fast, full)
    assert any(t.exact_share < 1.0 for t in fast.tensors)  # the drift is really there
    both = [ADAPTERS / "llama-lora", ADAPTERS / "llama-lora-b"]
    fast, full = _both(monkeypatch, merged, LLAMA, both)
    _assert_same_reports(fast, full)


def _imports_torch(*args) -> bool:
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_TORCH, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[-1] == "True"


@pytest.mark.parametrize("adapter, uses_torch", [("llama-lora", False), ("llama-dora", True)])
def test_checks_of_plain_lora_never_import_torch(tmp_path, adapter, uses_torch):
    """merge --verify, verify and unmerge's drift report compute plain LoRA with numpy."""
    merged, lora = tmp_path / "merged", ADAPTERS / adapter
    assert _imports_torch("merge", LLAMA, lora, "-o", merged, "--verify", "-q") == uses_torch
    assert _imports_torch("verify", merged, "--base", LLAMA, "--adapter", lora, "-q") == uses_torch
    unmerged = tmp_path / "unmerged"
    assert _imports_torch("unmerge", merged, lora, "-o", unmerged, "-q") == uses_torch
    assert (unmerged / "loramerge.json").is_file()


def test_wide_vectors_hint_reaches_llvm():
    """`intrinsics.wide_vectors` puts the 512-bit hint on the compiled function: its loop then
    uses zmm registers where the CPU has AVX-512 (skipped elsewhere: the hint is a no-op)."""
    import llvmlite.binding as llvm
    from numba import njit

    from loramerge.intrinsics import wide_vectors

    if "+avx512f" not in llvm.get_host_cpu_features().flatten().split(","):
        pytest.skip("no AVX-512 on this CPU")

    @njit(fastmath={"reassoc"})
    def total(x):
        wide_vectors()
        s = 0.0
        for v in x:
            s += v * v
        return s

    x = np.arange(1000, dtype=np.float64)
    assert total(x) == float(np.sum(x * x))  # small integers: exact in any order
    (ir,) = total.inspect_llvm().values()
    assert '"prefer-vector-width"="512"' in ir
    (asm,) = total.inspect_asm().values()
    assert "%zmm" in asm
