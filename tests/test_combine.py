"""`combine`: the combined adapter merges like its inputs, loads in PEFT, and reports its error.

- float64 reference (tests/reference.py): merging combine(a, b) and merging a and b with their
  weights are both within 0.5 ulp plus the float32 error bound gamma_n * M of the reference sum
  of a and b; `loramerge verify` of the first against (a, w_a), (b, w_b) passes.
- PEFT: the combined folder loads with `PeftModel.from_pretrained` and gives the logits PEFT
  gives running a and b unmerged with their weights.
- `--rank R`: the reported relative Frobenius error of every module equals the one measured in
  float64 from the files, within the float32 storage error of the factors.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA
from peft_oracle import logits_unmerged, probe_ids
from reference import float32_bound, load_base, reference_merge, ulp_error
from safetensors.torch import load_file

from loramerge.combine import combine
from loramerge.merge import MergeOptions, merge

PLAIN = ["llama-lora", "llama-lora-b", "llama-rslora", "llama-patterns", "llama-embed"]
PAIRS = list(itertools.combinations(PLAIN, 2))
WEIGHTS = [0.7, -1.3]


def _within_reference(out: Path, expected) -> float:
    """Largest error (ulp) of a merged folder's changed tensors; asserts the float32 bound."""
    merged = load_base(out)
    worst = 0.0
    for name, exp in expected.items():
        err = ulp_error(merged[name], exp.value)
        assert bool((err <= float32_bound(exp, merged[name].dtype)).all()), name
        worst = max(worst, float(err.max()))
    return worst


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=["+".join(p) for p in PAIRS])
def test_merge_of_combined_equals_merge_of_inputs(tmp_path, cli, a, b):
    inputs = [ADAPTERS / a, ADAPTERS / b]
    combined = tmp_path / "combined"
    combine(inputs, combined, WEIGHTS)
    expected = reference_merge(LLAMA, inputs, WEIGHTS)
    via_combined = tmp_path / "via-combined"
    merge(LLAMA, [combined], via_combined)
    direct = tmp_path / "direct"
    merge(LLAMA, inputs, direct, MergeOptions(weights=tuple(WEIGHTS)))
    assert set(load_base(via_combined)) == set(load_base(direct))
    worst_c = _within_reference(via_combined, expected)
    worst_d = _within_reference(direct, expected)
    args = ["verify", via_combined, "--base", LLAMA]
    for path, weight in zip(inputs, WEIGHTS, strict=True):
        args += ["--adapter", path, "-w", weight]
    result = cli(*args)
    assert result.code == 0, result.out + result.err
    print(f"\n{a}+{b}: combined {worst_c:.3f} ulp, direct {worst_d:.3f} ulp from float64")


@pytest.mark.parametrize(
    ("base", "a", "b"),
    [(LLAMA, "llama-patterns", "llama-rslora"), (LLAMA, "llama-lora", "llama-embed")],
)
def test_combined_adapter_loads_in_peft_with_same_logits(tmp_path, base, a, b):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inputs = [ADAPTERS / a, ADAPTERS / b]
    combined = tmp_path / "combined"
    combine(inputs, combined, WEIGHTS)
    ids = probe_ids(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, combined).eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    reference = logits_unmerged(base, inputs, WEIGHTS, ids)
    print(f"\n{a}+{b}: max |logit diff| {float((ours - reference).abs().max()):.2e}")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_combined_gpt2_conv1d_with_bias_and_embedding(tmp_path, cli):
    """GPT-2: Conv1D (fan_in_fan_out) with lora_bias, combined with an embedding LoRA."""
    inputs = [ADAPTERS / "gpt2-lora", ADAPTERS / "gpt2-embed"]
    combined = tmp_path / "combined"
    combine(inputs, combined, WEIGHTS)
    merged = tmp_path / "merged"
    merge(GPT2, [combined], merged)
    _within_reference(merged, reference_merge(GPT2, inputs, WEIGHTS))
    args = ["verify", merged, "--base", GPT2]
    for path, weight in zip(inputs, WEIGHTS, strict=True):
        args += ["--adapter", path, "-w", weight]
    assert cli(*args).code == 0


def _delta64(folder: Path, module: str, weight: float = 1.0) -> torch.Tensor:
    """weight * scale * B @ A of one module of an adapter folder, in float64 (zero if absent)."""
    from peft.utils.other import get_pattern_key

    cfg = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(folder / "adapter_model.safetensors")
    key = f"base_model.model.{module}"
    if f"{key}.lora_A.weight" not in state:
        return torch.zeros(())
    a = state[f"{key}.lora_A.weight"].double()
    b = state[f"{key}.lora_B.weight"].double()
    r_key = get_pattern_key(list((cfg.get("rank_pattern") or {}).keys()), module)
    al_key = get_pattern_key(list((cfg.get("alpha_pattern") or {}).keys()), module)
    r = (cfg.get("rank_pattern") or {}).get(r_key, cfg["r"])
    alpha = (cfg.get("alpha_pattern") or {}).get(al_key, cfg["lora_alpha"])
    assert r == a.shape[0]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return weight * scale * (b @ a)


def test_compressed_error_equals_measured(tmp_path, cli):
    inputs = [ADAPTERS / "llama-lora", ADAPTERS / "llama-lora-b"]
    out = tmp_path / "r3"
    result = cli("combine", *inputs, "-w", 0.7, "-w", -1.3, "--rank", 3, "-o", out, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    record = json.loads((out / "loramerge.json").read_text())
    assert record["modules"] == summary["modules"]
    state = load_file(out / "adapter_model.safetensors")
    assert summary["ranks"] == [3]
    for module, entry in summary["modules"].items():
        exact = sum(_delta64(p, module, w) for p, w in zip(inputs, WEIGHTS, strict=True))
        b = state[f"base_model.model.{module}.lora_B.weight"].double()
        a = state[f"base_model.model.{module}.lora_A.weight"].double()
        measured = float(torch.linalg.norm(exact - b @ a) / torch.linalg.norm(exact))
        # float32 storage of B and A moves each element by at most 2^-24 (|B||A|)_ij * 2.
        slack = 2 * 2.0**-24 * float(torch.linalg.norm(b.abs() @ a.abs()))
        slack /= float(torch.linalg.norm(exact))
        assert abs(measured - entry["relative_error"]) <= slack + 1e-12, module
        assert entry["relative_error"] > 0  # rank 12 and 8 sums cut to 3 lose something


def test_combined_folder_provenance_and_inspect(tmp_path, cli):
    out = tmp_path / "c"
    assert cli("combine", ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora", "-o", out).code == 0
    report = json.loads(cli("inspect", out, "--json").out)
    assert report["kind"] == "adapter"
    sources = [a["source"] for a in report["provenance"]["adapters"]]
    assert sources == [str(ADAPTERS / "llama-lora"), str(ADAPTERS / "llama-rslora")]
    assert cli("verify", out, "--files").code == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: peft" in card


@pytest.mark.parametrize(
    ("adapter", "reason"),
    [
        ("llama-dora", "DoRA adapters cannot be combined exactly"),
        ("llama-resized", "modules_to_save"),
        ("llama-tokens", "trainable tokens"),
    ],
)
def test_refused_by_name(tmp_path, cli, adapter, reason):
    out = tmp_path / "c"
    result = cli("combine", ADAPTERS / "llama-lora", ADAPTERS / adapter, "-o", out)
    assert result.code == 2
    assert result.err.startswith("Error: ") and reason in result.err
    assert not out.exists()
