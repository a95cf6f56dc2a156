"""The checks measured inside the write's pass (`verify.in_pass`): `merge --verify`, an unmerge's
drift report and a rebuild's check of its source give, tensor by tensor, the rows a check that
reads the written files back gives, and they catch what that check catches.

Each test runs the command, keeps the rows measured in the pass (the `done` the command hands
the check after it), and holds them against `verify_weights` run afresh on the files.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from conftest import ADAPTERS, GPT2, LLAMA
from safetensors.numpy import load_file, save_file

from loramerge import blocked, kernels
from loramerge.errors import LoramergeError
from loramerge.merge import MergeOptions, merge
from loramerge.sink.safetensors_writer import SafetensorsWriter
from loramerge.swap import rebase, unmerge
from loramerge.verify import weights as weight_check

SAME = ("kind", "dtype", "elements", "exact_share", "max_abs", "max_ulp", "max_ulp_at_value")
MAXIMA = ("max_abs", "max_ulp", "max_ulp_judged")


@pytest.fixture
def measured(monkeypatch):
    """The rows each weight check was handed as measured in the pass, call by call."""
    calls = []
    check = weight_check.verify_weights

    def spy(*args, **kwargs):
        calls.append(dict(kwargs.get("done") or {}))
        return check(*args, **kwargs)

    monkeypatch.setattr(weight_check, "verify_weights", spy)
    return calls


def _assert_rows_match(done: dict, report) -> None:
    """Every row measured in the pass is the row the read-back check gives."""
    rows = {t.name: t for t in report.tensors}
    for name, mine in done.items():
        theirs = rows[name]
        for field in SAME:
            assert getattr(mine, field) == getattr(theirs, field), (name, field)
        assert mine.max_ulp_judged == theirs.max_ulp_judged, name
        assert (mine.passed, mine.note) == (theirs.passed, theirs.note), name
        # RMSE: a float sum in another order, so within N * 2^-53 relative
        assert math.isclose(mine.rmse, theirs.rmse, rel_tol=mine.elements * 2.0**-53), name


def _assert_verdicts_match(done: dict, report) -> None:
    """Every row a verdict-only check measured in the pass has the read-back row's verdict; its
    maxima are the read-back row's, or none at all where the float32 gate (`verify.gate`)
    placed elements without measuring them; it has no other figures."""
    rows = {t.name: t for t in report.tensors}
    for name, mine in done.items():
        theirs = rows[name]
        for field in ("kind", "dtype", "elements"):
            assert getattr(mine, field) == getattr(theirs, field), (name, field)
        maxima = [(getattr(mine, f), getattr(theirs, f)) for f in MAXIMA]
        assert all(a == b for a, b in maxima) or all(math.isnan(a) for a, _ in maxima), name
        assert (mine.passed, mine.note) == (theirs.passed, theirs.note), name
        assert all(math.isnan(v) for v in (mine.exact_share, mine.rmse, mine.max_ulp_at_value))


def _gated(done: dict) -> set[str]:
    """The rows whose elements the float32 gate placed (their maxima not measured)."""
    return {name for name, row in done.items() if math.isnan(row.max_ulp)}


@pytest.mark.parametrize("chunk", ["", "4096"], ids=["whole", "parts"])
@pytest.mark.parametrize(
    "base, adapters, weights",
    [
        (LLAMA, ["llama-lora"], ()),
        (LLAMA, ["llama-embed"], ()),  # an embedding's transposed term
        (LLAMA, ["llama-lora", "llama-lora-b"], (1.0, -0.5)),
        (LLAMA, ["llama-rslora", "llama-patterns"], (0.7, 1.3)),
        (GPT2, ["gpt2-lora"], ()),  # Conv1D
    ],
)
def test_merge_verify_rows_measured_in_the_pass(
    tmp_path, monkeypatch, measured, base, adapters, weights, chunk
):
    monkeypatch.setenv("LORAMERGE_CHUNK_BYTES", chunk)
    paths = [ADAPTERS / a for a in adapters]
    out = tmp_path / "merged"
    result = merge(base, paths, out, MergeOptions(weights=weights, verify=True))
    assert result.verification["passed"]
    (done,) = measured
    report = weight_check.verify_weights(out, base, paths, list(weights) or None)
    kinds = {t.name: t.kind for t in report.tensors}
    weights_merged = {n for n, k in kinds.items() if k == "merged" and n.endswith(".weight")}
    # the bfloat16 tensors the pass copies unchanged are measured as it reads and writes them
    copied = {t.name for t in report.tensors if t.kind == "untouched" and t.dtype == "BF16"}
    assert weights_merged and weights_merged | copied <= set(done)  # biases go through torch
    assert all(row.kind == kinds[name] for name, row in done.items())
    _assert_rows_match(done, report)


def test_unmerge_drift_rows_measured_in_the_pass(tmp_path, measured):
    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-lora", ADAPTERS / "llama-lora-b"], merged)
    out = tmp_path / "unmerged"
    result = unmerge(merged, [ADAPTERS / "llama-lora-b"], out)
    (done,) = measured
    assert done and result.drift["measured"]
    report = weight_check.verify_weights(out, LLAMA, [ADAPTERS / "llama-lora"], through=[merged])
    _assert_rows_match(done, report)
    assert set(done) == {t.name for t in report.tensors}  # the copies too: none left for after
    assert any(t.exact_share < 1.0 for t in done.values())  # the drift is really there
    assert result.drift["max_ulp"] == max(t.max_ulp for t in report.tensors)


@pytest.mark.parametrize(
    "inside, added",
    [("llama-lora", "llama-rslora"), ("llama-embed", "llama-embed")],  # an embedding's (B A)^T
)
def test_rebuild_source_rows_measured_in_the_pass(tmp_path, measured, inside, added):
    """A rebuild's check of its source only passes or refuses: the rows it measures in the pass
    hold the verdict and the maxima the read-back check gives, and no other figures."""
    merged = tmp_path / "merged"
    lora = ADAPTERS / inside
    merge(LLAMA, [lora], merged)
    rebase(merged, [lora], [ADAPTERS / added], tmp_path / "rebased", base=LLAMA)
    (done,) = measured
    assert done
    report = weight_check.verify_weights(merged, LLAMA, [lora])
    _assert_verdicts_match(done, report)
    assert report.passed
    # each merged tensor the pass measures is plain LoRA, so the float32 gate places it all
    merged_rows = {name for name, row in done.items() if row.kind == "merged"}
    assert merged_rows and _gated(done) == merged_rows
    # the copies are compared in the pass too: nothing of this bfloat16 model is left for after
    assert set(done) == {t.name for t in report.tensors}


def test_a_tampered_source_is_caught_in_the_pass(tmp_path, measured):
    """One element of the merged model moved one ulp: the rebuild refuses it. The pass finds
    the tensor out of tolerance and leaves it to the check after the pass, which measures it in
    full: the refusal gives the figure `verify` gives."""
    merged = tmp_path / "merged"
    lora = ADAPTERS / "llama-lora"
    merge(LLAMA, [lora], merged)
    shard = merged / "model.safetensors"
    tensors = load_file(shard)
    name = "model.layers.1.self_attn.q_proj.weight"
    bits = tensors[name].view(np.uint16)
    bits[3, 5] += 1
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(LoramergeError, match="q_proj") as refused:
        rebase(merged, [lora], [lora], tmp_path / "rebased", base=LLAMA)
    (done,) = measured
    assert name not in done and len(done) > 1  # the others passed in the pass
    assert not (tmp_path / "rebased").exists()
    (row,) = [t for t in weight_check.verify_weights(merged, LLAMA, [lora]).failures()]
    assert row.name == name and row.max_ulp > 1.0
    assert f"{name} ({row.note})" in str(refused.value)


def test_a_checked_merge_writes_the_bytes_of_an_unchecked_one(tmp_path, monkeypatch):
    """The pass rounds the blocks it checks with the compiled rounding (and widens, adds and
    rounds in one loop where one term reaches a block): the same bytes."""
    monkeypatch.setenv("LORAMERGE_CHUNK_BYTES", "4096")
    for i, adapters in enumerate([["llama-lora", "llama-embed"], ["llama-lora", "llama-lora-b"]]):
        paths = [ADAPTERS / a for a in adapters]
        plain, checked = tmp_path / f"plain-{i}", tmp_path / f"checked-{i}"
        merge(LLAMA, paths, plain)
        merge(LLAMA, paths, checked, MergeOptions(verify=True))
        for shard in plain.glob("*.safetensors"):
            assert shard.read_bytes() == (checked / shard.name).read_bytes()


def test_the_compiled_rounding_is_the_cast():
    """Every bfloat16 pattern as the high half, with the low halves that decide a rounding
    (0, 1, just under, on and over the tie, all ones) and random ones: NaN, inf, subnormals,
    the carry into the exponent and past the largest number."""

    rng = np.random.default_rng(8)
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, *rng.integers(0, 1 << 16, 10)]
    values = np.concatenate([high | np.uint32(low) for low in lows]).view(np.float32)
    with np.errstate(invalid="ignore"):
        cast = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    mine = np.empty(values.size, np.uint16)
    kernels.round_to_bfloat16(values, mine)
    assert np.array_equal(mine, cast)


def test_the_compiled_sum_is_widen_add_and_cast():
    """W0 + one term rounded in one pass is the three passes' bits: every bfloat16 pattern as
    W0 (NaN, inf, subnormals, zeros of both signs) plus terms that cancel it, keep it, tip it
    past a tie, overflow it, are subnormal, zero, inf or NaN, and random ones."""

    rng = np.random.default_rng(9)
    w0 = np.tile(np.arange(1 << 16, dtype=np.uint16), 12)
    wide = (w0.astype(np.uint32) << 16).view(np.float32)
    tie = np.float32(2.0**-9) * np.abs(wide)  # half a bfloat16 spacing, about
    with np.errstate(all="ignore"):
        terms = np.concatenate(
            [
                -wide[: 1 << 16],
                np.zeros(1 << 16, np.float32),
                tie[: 1 << 16],
                -tie[: 1 << 16] * np.float32(1.0000001),
                np.full(1 << 16, 3e38, np.float32),
                np.full(1 << 16, 1e-45, np.float32),
                np.full(1 << 16, np.inf, np.float32),
                np.full(1 << 16, np.nan, np.float32),
                rng.standard_normal(1 << 18).astype(np.float32),
            ]
        )
        cast = (wide + terms).astype(ml_dtypes.bfloat16).view(np.uint16)
    mine = np.empty(w0.size, np.uint16)
    kernels.round_sum_to_bfloat16(w0, terms, mine)
    assert np.array_equal(mine, cast)
    # the terms' rows apart in a wider buffer, as merge_rows pads a BLAS output; the pads hold
    # NaN, which would show in the result were they read
    rows, cols = w0.size >> 12, 1 << 12
    buffer = np.full(rows * (cols + blocked.STRIDE_PAD), np.nan, np.float32)
    apart = blocked.padded_rows(buffer, rows, cols)
    apart[...] = terms.reshape(rows, cols)
    mine[...] = 0
    kernels.round_sum_to_bfloat16(w0.reshape(rows, cols), apart, mine.reshape(rows, cols))
    assert np.array_equal(mine, cast)


def test_rebuild_with_verify_measures_both_checks_in_one_pass(tmp_path, measured):
    merged = tmp_path / "merged"
    lora, rslora = ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora"
    merge(LLAMA, [lora], merged)
    out = tmp_path / "rebased"
    result = rebase(merged, [lora], [rslora], out, MergeOptions(verify=True), base=LLAMA)
    assert result.verification["passed"]
    output_rows, source_rows = measured
    assert output_rows and source_rows
    _assert_rows_match(output_rows, weight_check.verify_weights(out, LLAMA, [rslora]))
    _assert_verdicts_match(source_rows, weight_check.verify_weights(merged, LLAMA, [lora]))


def test_a_wrong_block_handed_to_the_writer_fails_the_check(tmp_path, monkeypatch, measured):
    """The check measures the bytes the writer gets: one element rounded the wrong way in one
    block of q_proj fails `merge --verify`, and the row names that tensor."""
    from loramerge import blocked

    class OffByOne:
        """The compiled rounding, with one element of each block rounded the wrong way."""

        def round(self, acc, into):
            kernels.BFLOAT16.round(acc, into)
            into.reshape(-1).view(np.uint16)[7] += 1

        def round_sum(self, w0, delta, into):
            kernels.BFLOAT16.round_sum(w0, delta, into)
            into.reshape(-1).view(np.uint16)[7] += 1

    merge_rows = blocked.merge_rows

    def wrong(w0, factors, out, first, rounding, check):
        if check.plan.name.endswith("layers.0.self_attn.q_proj.weight"):
            rounding = OffByOne()  # a block of one term, or of several
        merge_rows(w0, factors, out, first, rounding, check)

    monkeypatch.setattr(blocked, "merge_rows", wrong)
    lora = ADAPTERS / "llama-lora"
    result = merge(LLAMA, [lora], tmp_path / "merged", MergeOptions(verify=True))
    assert not result.verification["passed"]
    (done,) = measured
    wrong = [t for t in done.values() if not t.passed]
    assert [t.name for t in wrong] == ["model.layers.0.self_attn.q_proj.weight"]
    report = weight_check.verify_weights(tmp_path / "merged", LLAMA, [lora])
    _assert_rows_match(done, report)  # the file holds what was checked


def test_only_copies_a_check_reads_back_go_through_the_page_cache(tmp_path, monkeypatch):
    """An unmerge's drift report reads back, after the pass, the copies it checks but cannot
    measure in it; the untied head of a merge whose base ties it is no tensor of the base's, so
    nothing reads it back, and it is copied through memory, past the page cache (a 4 GiB head
    copied with copy_file_range cost seconds of kernel time)."""
    merged = tmp_path / "merged"
    merge(GPT2, [ADAPTERS / "gpt2-embed"], merged)
    assert "lm_head.weight" in load_file(next(merged.glob("*.safetensors")))  # untied
    in_kernel, direct = [], []
    original = SafetensorsWriter._copy_in_kernel

    def copy_in_kernel(self, src_fd, src_offset, nbytes, position):
        direct.append(self._file.direct)
        in_kernel.extend(n for n, (at, size) in self._ranges.items() if at <= position < at + size)
        return original(self, src_fd, src_offset, nbytes, position)

    monkeypatch.setattr(SafetensorsWriter, "_copy_in_kernel", copy_in_kernel)
    result = unmerge(merged, [ADAPTERS / "gpt2-embed"], tmp_path / "undone")
    assert result.drift["measured"]
    assert "lm_head.weight" not in in_kernel
    if not all(direct):
        pytest.skip("no direct writes on this filesystem: every copy goes through the kernel")
