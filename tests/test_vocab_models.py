"""Real checkpoints whose embeddings a shape rule gets wrong (fixtures/vocab_models.py).

Judges: logits of transformers + PEFT running the adapter unmerged (float32), and the float64
reference (tests/reference.py), which asks transformers' own model class which parameters are
tied. Every merge must match both or be refused with a message naming the module and the reason;
and whenever an output's config still ties parameters, the tied sides are identical in the output
as transformers loads it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from peft_oracle import logits_unmerged
from reference import float32_bound, load_base, reference_merge, ulp_error

from loramerge.merge import MergeOptions, merge

sys.path.insert(0, str(FIXTURES))
import vocab_models  # noqa: E402

MERGEABLE = [
    "tied-vocab-eq-intermediate",
    "tied-vocab-unique",
    "tied-lm-head-lora",
    "added-tokens",
    "added-tokens-tied",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every case's base and adapter, built once for this module."""
    root = tmp_path_factory.mktemp("vocab-models")
    return {case: vocab_models.build(case, root / case) for case in vocab_models.CASES}


def _ids(vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (2, 12), generator=generator)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _tied_sides_identical(model) -> None:
    """A model whose config ties its embeddings really uses one tensor for both sides."""
    if model.config.get_text_config().tie_word_embeddings or model.config.tie_word_embeddings:
        inp, outp = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        assert torch.equal(inp, outp), "config ties the embeddings but the two sides differ"


@pytest.mark.parametrize("case", MERGEABLE)
def test_logits_equal_unmerged_peft(tmp_path, built, case):
    base, adapter = built[case]
    out = tmp_path / "out"
    result = merge(base, [adapter], out, MergeOptions(dtype="float32"))
    merged = vocab_models.load(out)
    _tied_sides_identical(merged)
    vocab = merged.get_input_embeddings().weight.shape[0]
    ids = _ids(min(vocab, _config(base).get("vocab_size", vocab)))
    with torch.no_grad():
        ours = merged(input_ids=ids).logits
    reference = logits_unmerged(base, [adapter], [1.0], ids)
    diff = float((ours - reference).abs().max())
    print(f"\n{case}: max |logit diff| vs PEFT unmerged {diff:.2e}; notes {result.plan.notes}")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", MERGEABLE)
def test_weights_match_float64_reference(tmp_path, built, case):
    base, adapter = built[case]
    out = tmp_path / "out"
    merge(base, [adapter], out)
    ours, base_tensors = load_base(out), load_base(base)
    expected = reference_merge(base, [adapter], [1.0])
    for name, tensor in ours.items():
        if name not in expected:
            source = base_tensors.get(name)
            if source is None:  # a tied side written apart: the untouched base value
                source = base_tensors["model.embed_tokens.weight"]
            assert torch.equal(tensor, source), f"{name} should be the untouched base tensor"
            continue
        err = ulp_error(tensor, expected[name].value)
        bound = float32_bound(expected[name], tensor.dtype)
        assert not (err > bound).any(), f"{name}: max {float(err.max()):.3f} ulp beyond bound"


def test_vocabulary_equal_to_intermediate_unties(tmp_path, built):
    """The issue's case: exit 0 used to keep the tie, so lm_head silently got the delta."""
    base, adapter = built["tied-vocab-eq-intermediate"]
    out = tmp_path / "out"
    merge(base, [adapter], out)
    assert _config(out)["tie_word_embeddings"] is False
    tensors = load_base(out)
    assert torch.equal(tensors["lm_head.weight"], load_base(base)["model.embed_tokens.weight"])
    assert not torch.equal(tensors["model.embed_tokens.weight"], tensors["lm_head.weight"])


def test_added_tokens_resize_the_vocabulary(tmp_path, built):
    base, adapter = built["added-tokens"]
    out = tmp_path / "out"
    merge(base, [adapter], out)
    assert _config(out)["vocab_size"] == 264
    tensors = load_base(out)
    assert tensors["model.embed_tokens.weight"].shape == (264, 64)
    assert tensors["lm_head.weight"].shape == (264, 64)


def test_multimodal_tied_embedding_is_untied(tmp_path, built, cli):
    """vocab_size only in text_config, stored `language_model.model.*`: untied and right."""
    base, adapter = built["gemma3-multimodal-embed"]
    out = tmp_path / "out"
    run = cli("merge", base, adapter, "-o", out, "--dtype", "float32")
    assert run.code == 0, run.err
    assert _config(out)["tie_word_embeddings"] is False
    merged = vocab_models.load(out)
    _tied_sides_identical(merged)
    ids = _ids(250)
    with torch.no_grad():
        ours = merged(input_ids=ids).logits
    torch.testing.assert_close(
        ours, logits_unmerged(base, [adapter], [1.0], ids), rtol=1e-4, atol=1e-4
    )


def test_unknown_architecture_with_tied_embedding_lora_is_refused(tmp_path, built, cli):
    """No declared ties to go by: an embedding change on a tied model is refused by name."""
    base, adapter = built["tied-vocab-unique"]
    copy = tmp_path / "base"
    copy.mkdir()
    for path in base.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    config = _config(base) | {"architectures": ["MyCustomForCausalLM"]}
    (copy / "config.json").write_text(json.dumps(config))
    run = cli("merge", copy, adapter, "-o", tmp_path / "out")
    assert run.code == 2, run.err
    assert "model.embed_tokens.weight" in run.err and "MyCustomForCausalLM" in run.err
    assert not (tmp_path / "out").exists()


def test_forward_check_runs_on_a_base_without_tokenizer(tmp_path, built, cli):
    """No tokenizer files: fixed token ids, and the report says so (no ValueError)."""
    base, adapter = built["tied-vocab-unique"]
    out = tmp_path / "out"
    assert cli("merge", base, adapter, "-o", out).code == 0
    run = cli("verify", out, "--base", base, "--adapter", adapter, "--forward", "--json")
    assert run.code == 0, run.err
    forward = json.loads(run.out)["forward"]
    assert forward["passed"] and forward["probes"].startswith("fixed token ids"), forward


def test_a_missing_module_is_named_once(tmp_path, built, cli):
    """lm_head's three adapter tensors on a base that neither stores nor ties it: one line."""
    base, _ = built["tied-vocab-unique"]
    _, adapter = built["tied-lm-head-lora"]
    untied = tmp_path / "untied"
    untied.mkdir()
    for path in base.iterdir():
        (untied / path.name).write_bytes(path.read_bytes())
    (untied / "config.json").write_text(
        json.dumps(_config(base) | {"tie_word_embeddings": False, "vocab_size": 128})
    )
    run = cli("merge", untied, adapter, "-o", tmp_path / "out")
    assert run.code == 2
    assert run.err.count("lm_head.weight matches no tensor of the base") == 1, run.err


def test_lora_bias_on_a_layer_without_bias_says_why(tmp_path, cli):
    from peft import LoraConfig, get_peft_model

    base, _ = vocab_models.build("tied-vocab-unique", tmp_path / "model")
    model = vocab_models.load(base)
    config = LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
    adapter = tmp_path / "bias-adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    run = cli("merge", base, adapter, "-o", tmp_path / "out")
    assert run.code == 2
    assert "model.layers.0.self_attn.q_proj has a trained lora_B bias (lora_bias)" in run.err
    assert "has no bias to merge it into" in run.err and "matches no tensor" not in run.err


COMMON = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "Phi3ForCausalLM",
    "FalconForCausalLM",
    "MixtralForCausalLM",
    "LlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
]


@pytest.mark.parametrize("architecture", COMMON)
def test_tied_weights_table_is_what_transformers_declares(architecture):
    """src/loramerge/tied_weights.py is transformers' own declaration (regenerate if not)."""
    import transformers

    from loramerge.tied_weights import TIED_WEIGHTS

    declared = getattr(transformers, architecture)._tied_weights_keys
    assert TIED_WEIGHTS[architecture] == declared, "run scripts/gen_tied_weights.py"


def test_unknown_tied_architecture_refuses_a_change_to_its_head(tmp_path, built, cli):
    """Linear LoRA on a stored lm_head of a tied model whose class is unknown: refused too."""
    base, adapter = built["tied-lm-head-lora"]
    copy = tmp_path / "base"
    copy.mkdir()
    for path in base.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = load_file(base / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    config = _config(base) | {"architectures": ["MyCustomForCausalLM"]}
    (copy / "config.json").write_text(json.dumps(config))
    run = cli("merge", copy, adapter, "-o", tmp_path / "out")
    assert run.code == 2 and "lm_head.weight" in run.err, run.err
