"""`loramerge verify`: true positives and true negatives, weights and forward."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA
from safetensors.torch import load_file, save_file

from loramerge.merge import MergeOptions, merge


def _merged(tmp_path, base, adapters, weights=None, **options):
    out = tmp_path / "merged"
    paths = [ADAPTERS / a for a in adapters]
    merge(base, paths, out, MergeOptions(weights=tuple(weights or ()), **options))
    return out


def _verify(cli, candidate, base, adapters=(), weights=(), *extra):
    args = ["verify", candidate, "--base", base, "--json", *extra]
    for adapter in adapters:
        args += ["--adapter", ADAPTERS / adapter]
    for weight in weights:
        args += ["-w", weight]
    result = cli(*args)
    return result.code, json.loads(result.out) if result.out else None, result


def _edit(folder, name, change):
    """Rewrite the shard holding `name` with `change(state)` applied."""
    for path in folder.glob("*.safetensors"):
        state = load_file(path)
        if name in state:
            change(state)
            save_file(state, path, metadata={"format": "pt"})
            return
    raise KeyError(name)


@pytest.mark.parametrize(
    "base, adapters, weights, compute",
    [
        (LLAMA, ["llama-lora"], [], "float32"),
        (LLAMA, ["llama-embed"], [], "float32"),
        (LLAMA, ["llama-dora", "llama-lora-b"], [1.0, -0.5], "float32"),
        (LLAMA, ["llama-resized"], [], "float64"),
        (LLAMA, ["llama-tokens"], [], "float32"),
        (GPT2, ["gpt2-lora"], [], "float32"),
        (GPT2, ["gpt2-embed"], [], "float64"),
    ],
)
def test_correct_merges_pass(cli, tmp_path, base, adapters, weights, compute):
    out = _merged(tmp_path, base, adapters, weights, compute_dtype=compute)
    code, report, result = _verify(cli, out, base, adapters, weights)
    assert code == 0, report["verdict"]
    assert report["passed"] and report["verdict"].startswith("PASS")
    merged = [t for t in report["tensors"] if t["kind"] == "merged"]
    assert merged and all(t["max_ulp"] <= 1.0 for t in merged)
    untouched = [t for t in report["tensors"] if t["kind"] == "untouched"]
    assert all(t["exact_share"] == 1.0 for t in untouched)
    print(f"\n{adapters}: {report['verdict']}")


def test_element_moved_two_ulps_fails_and_is_named(cli, tmp_path):
    out = _merged(tmp_path, LLAMA, ["llama-lora"])
    name = "model.layers.1.mlp.up_proj.weight"

    def nudge(state):
        flat = state[name].view(-1)
        bits = flat[7:8].view(torch.int16)
        bits += 2  # two ulps up (same sign, same binade for a normal bf16 value)
        assert flat[7] != 0

    _edit(out, name, nudge)
    code, report, result = _verify(cli, out, LLAMA, ["llama-lora"])
    assert code == 1
    failed = [t for t in report["tensors"] if not t["passed"]]
    assert [t["name"] for t in failed] == [name]
    assert 1.0 < failed[0]["max_ulp"] <= 2.5
    assert name in report["verdict"]


def test_a_finite_value_where_the_base_is_nan_fails(cli, tmp_path):
    """A NaN in the base merges to NaN; a candidate holding a number there is not the merge
    (its error, NaN, counts as 0, so the non-finite count must fail it)."""
    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(state):
        state[name].view(-1)[7] = float("nan")

    _edit(base, name, poison)
    out = _merged(tmp_path, base, ["llama-lora"])
    assert _verify(cli, out, base, ["llama-lora"])[0] == 0  # NaN for NaN: right

    def fill(state):
        state[name].view(-1)[7] = 0.0

    _edit(out, name, fill)
    code, report, _ = _verify(cli, out, base, ["llama-lora"])
    assert code == 1 and name in report["verdict"] and "non-finite" in report["verdict"]


def test_wrong_weight_fails(cli, tmp_path):
    out = _merged(tmp_path, LLAMA, ["llama-lora"], [0.5])
    code, report, _ = _verify(cli, out, LLAMA, ["llama-lora"])
    assert code == 1 and not report["passed"]
    assert sum(not t["passed"] for t in report["tensors"]) == 14


def test_missing_tensor_fails(cli, tmp_path):
    out = _merged(tmp_path, LLAMA, ["llama-lora"])
    _edit(out, "model.norm.weight", lambda state: state.pop("model.norm.weight"))
    code, report, _ = _verify(cli, out, LLAMA, ["llama-lora"])
    assert code == 1
    assert {(t["name"], t["kind"]) for t in report["tensors"] if not t["passed"]} == {
        ("model.norm.weight", "missing")
    }


def test_adapter_never_merged_fails(cli, tmp_path):
    code, report, _ = _verify(cli, LLAMA, LLAMA, ["llama-lora"])
    assert code == 1
    assert sum(t["kind"] == "merged" and not t["passed"] for t in report["tensors"]) == 14


def test_without_adapters_candidate_must_equal_base(cli, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(LLAMA, copy)
    assert _verify(cli, copy, LLAMA)[0] == 0
    out = _merged(tmp_path, LLAMA, ["llama-rslora"])
    code, report, _ = _verify(cli, out, LLAMA)
    assert code == 1
    assert sum(not t["passed"] for t in report["tensors"]) == 4


def test_peft_merge_checked_by_verify(cli, tmp_path):
    """PEFT's own merged folders: a plain LoRA passes; the tied one fails and says why."""
    from peft_oracle import peft_model

    model, names = peft_model(LLAMA, [ADAPTERS / "llama-lora"], [1.0], torch.bfloat16)
    model.merge_and_unload(adapter_names=names).save_pretrained(tmp_path / "peft")
    assert _verify(cli, tmp_path / "peft", LLAMA, ["llama-lora"])[0] == 0
    model, names = peft_model(GPT2, [ADAPTERS / "gpt2-embed"], [1.0], torch.bfloat16)
    model.merge_and_unload(adapter_names=names).save_pretrained(tmp_path / "peft-tied")
    code, report, _ = _verify(cli, tmp_path / "peft-tied", GPT2, ["gpt2-embed"])
    assert code == 1
    assert ("lm_head.weight", "missing") in {(t["name"], t["kind"]) for t in report["tensors"]}


def test_forward_check_passes_correct_and_fails_wrong(cli, tmp_path):
    out = _merged(tmp_path, LLAMA, ["llama-lora"])
    code, report, _ = _verify(cli, out, LLAMA, ["llama-lora"], (), "--forward")
    forward = report["forward"]
    print(f"\ncorrect merge, forward: {forward['summary']}")
    assert code == 0 and forward["passed"] and forward["top1_agreement_outside_ties"] == 1.0
    wrong = tmp_path / "wrong"
    merge(LLAMA, [ADAPTERS / "llama-lora"], wrong, MergeOptions(weights=(0.5,)))
    code, report, _ = _verify(cli, wrong, LLAMA, ["llama-lora"], (), "--forward")
    print(f"weight 0.5 instead of 1, forward: {report['forward']['summary']}")
    assert code == 1 and not report["forward"]["passed"]


def test_human_output_and_bad_input(cli, tmp_path):
    out = _merged(tmp_path, LLAMA, ["llama-lora"])
    result = cli("verify", out, "--base", LLAMA, "--adapter", ADAPTERS / "llama-lora")
    assert result.code == 0 and "worst tensors" in result.out and "PASS" in result.out
    missing = cli("verify", tmp_path / "nope", "--base", LLAMA)
    assert missing.code == 2 and missing.err.startswith("Error:")
    weights = cli(
        "verify", out, "--base", LLAMA, "--adapter", ADAPTERS / "llama-lora", "-w", 1, "-w", 2
    )
    assert weights.code == 2


def test_merge_verify_records_verdict(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", LLAMA, ADAPTERS / "llama-dora", "-o", out, "--verify", "--json")
    assert result.code == 0
    assert json.loads(result.out)["verification"]["passed"] is True
    record = json.loads((out / "loramerge.json").read_text())
    assert record["verification"]["verdict"].startswith("PASS")
    assert "Verification (`loramerge verify`): PASS" in (out / "README.md").read_text()


def test_float32_output_passes_its_own_check_and_a_wrong_weight_fails(tmp_path, cli):
    """A float32 merge keeps its float32 arithmetic error (no rounding hides it): verify allows
    exactly the textbook bound gamma_n * M per element, no more, so a 1e-4 weight error fails."""
    out = tmp_path / "f32"
    lora = ADAPTERS / "llama-lora"
    run = cli("merge", LLAMA, lora, "-o", out, "--dtype", "float32", "--verify", "--json")
    assert run.code == 0, run.out
    right = cli("verify", out, "--base", LLAMA, "--adapter", lora, "--json")
    assert right.code == 0
    tensors = [t for t in json.loads(right.out)["tensors"] if t["kind"] == "merged"]
    assert max(t["max_ulp"] for t in tensors) > 1.0  # raw ulps exceed 1 near cancellations
    wrong = cli("verify", out, "--base", LLAMA, "--adapter", lora, "-w", "1.0001", "--json")
    assert wrong.code == 1


def test_big_untouched_tensors_are_compared_in_parts_on_every_thread(tmp_path, monkeypatch):
    """A tensor no adapter touches, bigger than the split size, is compared in parts that run
    on every thread (an untied 4 GiB head would take one thread seconds): the rows are those
    of the whole comparison: bit-identical tensors, an unmerge's (the merged model in the ulp
    scale) and ones stored in another dtype (the base rounded once)."""
    from loramerge.swap import unmerge

    lora, lora_b = ADAPTERS / "llama-lora", ADAPTERS / "llama-lora-b"
    merged, out, half = tmp_path / "merged", tmp_path / "unmerged", tmp_path / "float16"
    merge(LLAMA, [lora, lora_b], merged)
    unmerge(merged, [lora_b], out)
    merge(LLAMA, [lora], half, MergeOptions(dtype="float16"))
    _assert_parts_match(monkeypatch, merged, LLAMA, [lora, lora_b])
    _assert_parts_match(monkeypatch, out, LLAMA, [lora], through=[merged])
    rounded = _assert_parts_match(monkeypatch, half, LLAMA, [lora])
    assert any(t.kind == "untouched" and t.dtype == "F16" for t in rounded.tensors)


def _assert_parts_match(monkeypatch, *args, **kwargs):
    """verify_weights with every untouched tensor split into 4 KiB parts gives the rows it
    gives comparing them whole; returns the split report."""
    import math

    from loramerge.verify import weights as weight_check

    whole = weight_check.verify_weights(*args, **kwargs)
    parts, split = [], weight_check._untouched_part
    with monkeypatch.context() as patch:
        patch.setattr(weight_check, "_SPLIT_BYTES", 4096)
        patch.setattr(
            weight_check, "_untouched_part", lambda *a, **k: parts.append(a) or split(*a, **k)
        )
        halves = weight_check.verify_weights(*args, **kwargs)
    assert len(parts) > len({p[0].name for p in parts})  # several parts of one tensor
    assert halves.verdict() == whole.verdict() and halves.passed
    for mine, theirs in zip(halves.tensors, whole.tensors, strict=True):
        for field in ("name", "kind", "elements", "exact_share", "max_abs", "max_ulp"):
            assert getattr(mine, field) == getattr(theirs, field), (mine.name, field)
        assert (mine.passed, mine.note) == (theirs.passed, theirs.note)
        assert math.isclose(mine.rmse, theirs.rmse, rel_tol=mine.elements * 2.0**-53)
    return halves


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 4096 + 8 * 1000 + 5])
def test_same_bytes_finds_one_changed_byte_anywhere(size):
    """The head compared as bytes, the body as 8-byte words, the tail as bytes: a change of one
    byte is found in each, whatever the size."""
    import numpy as np

    from loramerge.verify.weights import same_bytes

    a = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    assert same_bytes(a, a.copy())
    for at in sorted({0, size // 2, size - 1, min(4096, size - 1)}):
        b = a.copy()
        b[at] ^= 0x10
        assert not same_bytes(a, b), at
    if size % 2 == 0:  # bfloat16 rows as the check hands them, and an offset view
        assert same_bytes(a.view(np.uint16), a.copy().view(np.uint16))
        assert not same_bytes(a[1:-1], a[2:])
