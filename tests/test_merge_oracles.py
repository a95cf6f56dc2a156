"""Every fixture adapter merged by loramerge, judged by a float64 reference, PEFT and logits.

- float64 reference (tests/reference.py, written from PEFT's formulas): every element within
  0.5 ulp of it (one correct rounding) plus the textbook error bound gamma_n * M of the arithmetic
  (M = sum of the magnitudes added into the element): float64's with `--compute-dtype float64`,
  float32's by default.
- PEFT run in float64 must agree with that reference (so the reference is PEFT's semantics);
  PEFT's own merge in the base dtype is measured against it and printed.
- Logits of the merged folder (float32 output) equal transformers + PEFT running the adapters
  unmerged, within float32 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA
from peft_oracle import config_of, logits_of, logits_unmerged, peft_merged_state, probe_ids
from reference import float32_bound, float64_bound, load_base, reference_merge, ulp_error

from loramerge.merge import MergeOptions, merge

CASES = {
    "llama-lora": (LLAMA, ["llama-lora"], [1.0]),
    "llama-rslora": (LLAMA, ["llama-rslora"], [1.0]),
    "llama-patterns": (LLAMA, ["llama-patterns"], [1.0]),
    "llama-dora": (LLAMA, ["llama-dora"], [1.0]),
    "llama-embed": (LLAMA, ["llama-embed"], [1.0]),
    "llama-resized": (LLAMA, ["llama-resized"], [1.0]),
    "llama-tokens": (LLAMA, ["llama-tokens"], [1.0]),
    "gpt2-lora": (GPT2, ["gpt2-lora"], [1.0]),
    "gpt2-embed": (GPT2, ["gpt2-embed"], [1.0]),
    "two-adapters": (LLAMA, ["llama-lora", "llama-lora-b"], [1.0, -0.5]),
    "dora-plus-lora": (LLAMA, ["llama-dora", "llama-lora-b"], [1.0, 0.75]),
}
# Why PEFT's merge in the base dtype may sit further from float64 than loramerge does.
PEFT_DIFFERS = {
    "llama-embed": "PEFT rounds the embedding delta to bf16 before adding it (Embedding.merge)",
    "gpt2-embed": "PEFT adds the delta into the tied weight, so lm_head changes too",
}


def _merge(tmp: Path, case: str, **options) -> Path:
    base, adapters, weights = CASES[case]
    out = tmp / f"{case}-{'-'.join(f'{k}={v}' for k, v in options.items())}"
    merge(
        base, [ADAPTERS / a for a in adapters], out, MergeOptions(weights=tuple(weights), **options)
    )
    return out


def _expected(case: str):
    base, adapters, weights = CASES[case]
    return reference_merge(base, [ADAPTERS / a for a in adapters], weights)


@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_float64_reference(tmp_path, case, compute):
    base_dir = CASES[case][0]
    out = _merge(tmp_path, case, compute_dtype=compute)
    ours = load_base(out)
    base = load_base(base_dir)
    expected = _expected(case)
    assert set(expected) <= set(ours)
    worst, exact, total = 0.0, 0, 0
    for name, tensor in ours.items():
        if name not in expected:
            source = base.get(name, base.get("transformer.wte.weight"))
            assert torch.equal(tensor, source), f"{name} should be the untouched base tensor"
            continue
        exp = expected[name]
        err = ulp_error(tensor, exp.value)
        bound = (float64_bound if compute == "float64" else float32_bound)(exp, tensor.dtype)
        bad = err > bound
        assert not bad.any(), f"{name}: {int(bad.sum())} elements beyond bound, max {err.max():.3f}"
        worst = max(worst, float(err.max()))
        exact += int((err <= 0.5).sum())
        total += err.numel()
    print(
        f"\n{case} [{compute}]: loramerge max {worst:.4f} ulp, {exact / total:.6%} within 0.5 ulp"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_is_peft_semantics_and_peft_distance(case):
    """PEFT merging in float64 agrees with the reference; PEFT in bf16 is measured and printed."""
    base_dir, adapters, weights = CASES[case]
    adapter_dirs = [ADAPTERS / a for a in adapters]
    expected = _expected(case)
    peft64 = peft_merged_state(base_dir, adapter_dirs, weights, torch.float64)
    for name, exp in expected.items():
        if case == "gpt2-embed" and name == "lm_head.weight":
            continue  # PEFT keeps the tie, see PEFT_DIFFERS
        torch.testing.assert_close(peft64[name], exp.value, rtol=1e-12, atol=1e-12)
    peft16 = peft_merged_state(base_dir, adapter_dirs, weights, torch.bfloat16)
    worst = max(float(ulp_error(peft16[n], e.value).max()) for n, e in expected.items())
    if case == "gpt2-embed":
        base_wte = load_base(base_dir)["transformer.wte.weight"]
        assert not torch.equal(peft16["lm_head.weight"], base_wte), PEFT_DIFFERS[case]
    why = PEFT_DIFFERS.get(case, "one rounding, like loramerge")
    print(f"\n{case}: PEFT bf16 merge max {worst:.3f} ulp from float64 ({why})")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_unmerged_peft(tmp_path, case):
    base_dir, adapters, weights = CASES[case]
    out = _merge(tmp_path, case, dtype="float32")
    ids = probe_ids(base_dir)
    ours = logits_of(out, ids)
    reference = logits_unmerged(base_dir, [ADAPTERS / a for a in adapters], weights, ids)
    diff = float((ours - reference).abs().max())
    print(f"\n{case}: max |logit diff| vs transformers+PEFT unmerged = {diff:.2e}")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_legacy_modules_to_save_layout_merges_like_current(tmp_path):
    """`X.modules_to_save.default.weight` (older layout) gives byte-identical output."""
    a = tmp_path / "current"
    b = tmp_path / "legacy"
    merge(LLAMA, [ADAPTERS / "llama-resized"], a)
    merge(LLAMA, [ADAPTERS / "llama-resized-legacy"], b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_tied_embedding_changed_on_one_side_is_untied(tmp_path):
    out = _merge(tmp_path, "gpt2-embed")
    assert config_of(GPT2).get("tie_word_embeddings", True) is True
    assert config_of(out)["tie_word_embeddings"] is False
    merged = load_base(out)
    assert torch.equal(merged["lm_head.weight"], load_base(GPT2)["transformer.wte.weight"])


def test_resized_vocabulary_updates_config_and_tokenizer(tmp_path):
    out = _merge(tmp_path, "llama-resized")
    assert config_of(out)["vocab_size"] == 387
    adapter_tokenizer = (ADAPTERS / "llama-resized" / "tokenizer.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == adapter_tokenizer
