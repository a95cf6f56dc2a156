"""`extract`: round trips through a merge, reported errors against measured ones, PEFT loading.

- Round trip: extract from base + a fixture adapter of rank r at `--rank r`, merge it into the
  base again: per tensor, the RMS difference from the merged model is at most one ulp of the
  tensor's RMS magnitude (the merge's bf16 rounding is full-rank noise the SVD cannot keep).
- At a lower rank the reported relative Frobenius error of every module equals the one measured
  in float64 from the files (the float32 delta of two bf16 tensors is exact, so only float64
  summation order separates them).
- PEFT loads the extracted folder and gives the logits PEFT gives with the original adapter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA
from peft_oracle import logits_unmerged, probe_ids
from reference import MANTISSA_BITS, load_base
from safetensors.torch import load_file

from loramerge import lowrank
from loramerge.extract import RankChoice, extract
from loramerge.merge import MergeOptions, merge


def _rms_ulp(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """One ulp of `dtype` at the RMS magnitude of a tensor."""
    rms = float(reference.double().pow(2).mean().sqrt())
    return 2.0 ** (math.floor(math.log2(rms)) - MANTISSA_BITS[dtype])


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize(
    ("base", "adapter", "rank", "skip"),
    [
        (LLAMA, "llama-lora", 8, False),
        (LLAMA, "llama-patterns", 6, False),
        (GPT2, "gpt2-lora", 4, True),
    ],
)
def test_round_trip_at_the_adapters_rank(tmp_path, monkeypatch, svd, base, adapter, rank, skip):
    if svd == "randomized":
        monkeypatch.setattr(lowrank, "EXACT_LIMIT", 0)
    merged = tmp_path / "merged"
    merge(base, [ADAPTERS / adapter], merged)
    out = tmp_path / "extracted"
    result = extract(merged, base, out, RankChoice(rank=rank), skip_nonlinear=skip)
    again = tmp_path / "again"
    merge(base, [out], again)
    want, got, w0 = load_base(merged), load_base(again), load_base(base)
    changed = [n for n in want if not torch.equal(want[n], w0[n])]
    assert {n.rsplit(".", 1)[0] for n in changed if n.endswith(".weight")} == set(result.modules)
    worst = 0.0
    for name in changed:
        if name in result.skipped:
            assert torch.equal(got[name], w0[name])
            continue
        ratio = _rms(got[name] - want[name]) / _rms_ulp(want[name], want[name].dtype)
        worst = max(worst, ratio)
        assert ratio <= 1.0, name
    print(f"\n{adapter} ({svd}): worst RMS difference {worst:.3f} ulp of the tensor RMS")
    if skip:  # GPT-2's lora_bias changed biases of LoRA layers: listed, left out
        assert result.skipped and all(n.endswith(".bias") for n in result.skipped)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_reported_error_equals_measured(tmp_path, monkeypatch, cli, svd):
    if svd == "randomized":
        monkeypatch.setattr(lowrank, "EXACT_LIMIT", 0)
    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-lora"], merged)
    out = tmp_path / "r3"
    result = cli("extract", merged, "--base", LLAMA, "--rank", 3, "-o", out, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["ranks"] == [3] and summary["lora_modules"] == 14
    state = load_file(out / "adapter_model.safetensors")
    ft, w0 = load_base(merged), load_base(LLAMA)
    for module, entry in summary["modules"].items():
        delta = ft[f"{module}.weight"].double() - w0[f"{module}.weight"].double()
        assert torch.equal(
            (ft[f"{module}.weight"].float() - w0[f"{module}.weight"].float()).double(), delta
        )
        b = state[f"base_model.model.{module}.lora_B.weight"].double()
        a = state[f"base_model.model.{module}.lora_A.weight"].double()
        measured = float(torch.linalg.norm(delta - b @ a) / torch.linalg.norm(delta))
        slack = (delta.numel() + 8) * 2.0**-52  # float64 sums in a different order
        assert abs(measured - entry["relative_error"]) <= slack * max(measured, 1e-300), module
        assert 0 < entry["relative_error"] < 1
        assert entry["kept_energy"] == pytest.approx(1 - entry["relative_error"] ** 2, abs=1e-5)


def test_energy_picks_the_smallest_rank(tmp_path):
    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-lora"], merged)
    result = extract(merged, LLAMA, tmp_path / "e", RankChoice(energy=0.9, max_rank=6))
    ft, w0 = load_base(merged), load_base(LLAMA)
    for module, entry in result.modules.items():
        delta = ft[f"{module}.weight"].double() - w0[f"{module}.weight"].double()
        s2 = torch.linalg.svdvals(delta) ** 2
        share = torch.cumsum(s2, 0) / s2.sum()
        smallest = int((share < 0.9).sum()) + 1
        assert entry["rank"] == min(smallest, 6), module


def test_extracted_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-lora"], merged, MergeOptions(dtype="float32"))
    out = tmp_path / "extracted"
    extract(merged, LLAMA, out, RankChoice(rank=8))
    ids = probe_ids(LLAMA)
    model = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, out).eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    reference = logits_unmerged(LLAMA, [ADAPTERS / "llama-lora"], [1.0], ids)
    print(f"\nmax |logit diff| {float((ours - reference).abs().max()):.2e}")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_nonlinear_changes_become_modules_to_save(tmp_path, cli):
    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-resized"], merged)
    out = tmp_path / "extracted"
    result = extract(merged, LLAMA, out, RankChoice(rank=4))
    assert result.saved == ["lm_head", "model.embed_tokens"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    again = tmp_path / "again"
    merge(LLAMA, [out], again)
    want, got = load_base(merged), load_base(again)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(want[name], got[name])
    report = json.loads(cli("inspect", out, "--json").out)
    assert report["provenance"]["extracted_from"]["source"] == str(merged)
    assert cli("verify", out, "--files").code == 0


def test_bad_choices_are_refused(tmp_path, cli):
    result = cli("extract", LLAMA, "--base", LLAMA, "-o", tmp_path / "x")
    assert result.code == 2 and "exactly one of --rank R and --energy E" in result.err
    result = cli("extract", GPT2, "--base", LLAMA, "--rank", 2, "-o", tmp_path / "x")
    assert result.code == 2 and "do not hold the same tensors" in result.err
    assert not (tmp_path / "x").exists()


def test_targets_limit_lora_and_skip_nonlinear_lists_the_rest(tmp_path):
    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-lora"], merged)
    out = tmp_path / "q"
    result = extract(
        merged, LLAMA, out, RankChoice(rank=8), targets=("q_proj",), skip_nonlinear=True
    )
    assert sorted(result.modules) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert len(result.skipped) == 12 and result.saved == []
    state = load_file(out / "adapter_model.safetensors")
    assert len(state) == 4
