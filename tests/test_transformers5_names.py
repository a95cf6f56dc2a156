"""transformers 5 checkpoints stored under other names than PEFT's, and LoRA on MoE experts.

Bases and adapters come from fixtures/transformers5_models.py (real configs, real PEFT adapters
with non-zero B), built once per session. Each merge is judged against PEFT itself:
- every weight against PEFT's merge_and_unload run in float64 (so the judge is PEFT's own
  ParamWrapper arithmetic and transformers' own loading of the stored names), within one correct
  rounding plus the float64 error of the judge (`--compute-dtype float64`), or within the float32
  error bound of tests/reference.py (default); the magnitude M in that bound is PEFT's merge with
  every tensor replaced by its absolute value;
- logits of the merged folder against transformers + PEFT running the adapters unmerged, in
  float32 with the tolerance of tests/test_merge_oracles.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FIXTURES
from peft_oracle import logits_of, logits_unmerged, peft_merged_state, peft_model
from reference import Expected, float32_bound, ulp

from loramerge.errors import LoramergeError
from loramerge.merge import MergeOptions, merge

sys.path.insert(0, str(FIXTURES))
from transformers5_models import CASES, build  # noqa: E402

MOE = [
    "mixtral",
    "mixtral-bf16",
    "mixtral-fused",
    "qwen2-moe",
    "qwen3-moe",
    "qwen3-moe-down",
    "gpt-oss",
]
RENAMED = ["gemma3-vl", "llava", "qwen2-vl"]
IDS = torch.tensor([[1, 5, 9, 22, 17, 3, 40, 2], [7, 8, 9, 10, 11, 12, 13, 14]])


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """build(case, adapter_seed) -> (base, adapter), each written once per session."""
    root = tmp_path_factory.mktemp("transformers5")
    cache: dict[tuple[str, int], tuple[Path, Path]] = {}

    def get(case: str, seed: int = 0) -> tuple[Path, Path]:
        if (case, seed) not in cache:
            cache[(case, seed)] = build(case, root, seed)
        return cache[(case, seed)]

    return get


def _model_class(base: Path):
    """The class transformers loads the base with (its config's architecture)."""
    config = json.loads((base / "config.json").read_text())
    return getattr(transformers, config["architectures"][0])


def _state(folder: Path, model_class) -> dict[str, torch.Tensor]:
    """A checkpoint as transformers loads it (in-memory names), in float64."""
    model = model_class.from_pretrained(folder, dtype=torch.float64)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _peft_magnitude(base, adapters, weights, model_class) -> dict[str, torch.Tensor]:
    """|W0| + sum |w| s |B| |A| in PEFT's own layout: its merge of every tensor's absolute value."""
    model, names = peft_model(base, adapters, [abs(w) for w in weights], torch.float64, model_class)
    for parameter in model.parameters():
        parameter.abs_()
    merged = model.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _check_weights(out, base, adapters, weights, compute) -> str:
    """Every tensor of `out` (stored in the base's dtype) against PEFT's float64 merge; returns
    a one-line summary."""
    dtype = _stored_dtype(base)
    model_class = _model_class(base)
    ours, original = _state(out, model_class), _state(base, model_class)
    peft64 = peft_merged_state(base, adapters, weights, torch.float64, model_class)
    magnitude = _peft_magnitude(base, adapters, weights, model_class)
    peft_own = peft_merged_state(base, adapters, weights, dtype, model_class)
    assert set(ours) == set(peft64)
    changed, worst, ratio, theirs = 0, 0.0, 0.0, 0.0
    for name, value in peft64.items():
        if torch.equal(value, original[name]):
            assert torch.equal(ours[name], original[name]), f"{name} should be untouched"
            continue
        changed += 1
        expected = Expected(value, magnitude[name], inner=4 + 2)
        err = (ours[name] - value).abs() / ulp(value, dtype)
        judge = 2.0**-53 * 16 * magnitude[name] / ulp(value, dtype)  # PEFT's own float64
        bound = (0.5 if compute == "float64" else float32_bound(expected, dtype)) + judge
        bad = err > bound
        assert not bad.any(), f"{name}: {int(bad.sum())} elements beyond bound, max {err.max():.3f}"
        worst = max(worst, float(err.max()))
        ratio = max(ratio, float((err / bound).max()))
        their_err = (peft_own[name].double() - value).abs() / ulp(value, dtype)
        theirs = max(theirs, float(their_err.max()))
    assert changed > 0
    return (
        f"{changed} tensors changed; from PEFT's float64 merge: loramerge max {worst:.3f} ulp "
        f"({ratio:.3f} of its bound), PEFT's own {dtype} merge max {theirs:.3f} ulp"
    )


def _stored_dtype(base: Path) -> torch.dtype:
    """The dtype the base stores its weights in (config.json)."""
    return getattr(torch, json.loads((base / "config.json").read_text())["dtype"])


def _merge(tmp_path: Path, base: Path, adapters: list[Path], weights=(1.0,), **options) -> Path:
    out = tmp_path / "out"
    merge(base, adapters, out, MergeOptions(weights=tuple(weights), **options))
    return out


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("case", MOE + RENAMED)
def test_merge_matches_peft_float64(tmp_path, built, case, compute):
    base, adapter = built(case)
    out = _merge(tmp_path, base, [adapter], compute_dtype=compute)
    print(f"\n{case} [{compute}]: {_check_weights(out, base, [adapter], [1.0], compute)}")


@pytest.mark.parametrize("case", MOE + RENAMED)
def test_logits_equal_unmerged_peft(tmp_path, built, case):
    base, adapter = built(case)
    out = _merge(tmp_path, base, [adapter], dtype="float32")
    model_class = _model_class(base)
    ours = logits_of(out, IDS, model_class)
    reference = logits_unmerged(base, [adapter], [1.0], IDS, model_class)
    diff = float((ours - reference).abs().max())
    print(f"\n{case}: max |logit diff| vs transformers+PEFT unmerged = {diff:.2e}")
    assert diff > 0 or not torch.equal(reference, logits_of(base, IDS, model_class))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_two_moe_adapters_weighted(tmp_path, built):
    """Two ParamWrapper adapters on the same experts, one subtracted: PEFT's weighted sum."""
    base, first = built("mixtral")
    _, second = built("mixtral", 1)
    weights = [1.0, -0.5]
    out = _merge(tmp_path, base, [first, second], weights)
    print(f"\n{_check_weights(out, base, [first, second], weights, 'float32')}")
    model_class = _model_class(base)
    ours = logits_of(out, IDS, model_class)
    reference = logits_unmerged(base, [first, second], weights, IDS, model_class)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_stored_experts_written_under_stored_names(tmp_path, built):
    """The output keeps the base's stored names (per-expert matrices), as transformers saved it."""
    base, adapter = built("mixtral")
    out = _merge(tmp_path, base, [adapter])
    from safetensors import safe_open

    with (
        safe_open(base / "model.safetensors", "pt") as b,
        safe_open(out / "model.safetensors", "pt") as o,
    ):
        assert set(b.keys()) == set(o.keys())
        name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
        assert not torch.equal(b.get_tensor(name), o.get_tensor(name))


@pytest.mark.parametrize("case", ["mixtral", "qwen3-moe-down"])
def test_inspect_describes_target_parameters(cli, built, case):
    _, adapter = built(case)
    result = cli("inspect", adapter, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert (
        report["target_parameters"]
        == json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    )
    layers = 2
    per_layer = {"mixtral": 3, "qwen3-moe-down": 1}[case]  # Mixtral's router is one too
    assert report["module_kinds"]["parameter"] == layers * per_layer
    text = cli("inspect", adapter)
    assert text.code == 0 and "target_parameters" in text.out


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("gemma3-vl", "model.language_model.layers.0.self_attn.q_proj.weight"),
        ("mixtral", "model.layers.0.mlp.experts"),
    ],
)
def test_refused_by_name_without_transformers(tmp_path, built, monkeypatch, case, named):
    """Without transformers the stored names cannot be mapped with certainty: refused by name."""
    base, adapter = built(case)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(LoramergeError) as caught:
        _merge(tmp_path, base, [adapter])
    message = str(caught.value)
    assert named in message and "transformers is not installed" in message
    assert not (tmp_path / "out").exists()


def test_cases_cover_the_issue():
    """The cases are the ones issue 9 names (Mixtral, Qwen2-MoE, Qwen3-MoE, Gemma3, Llava,
    Qwen-VL) and GPT-OSS, whose experts are stored (in, out)."""
    assert set(CASES) == set(MOE + RENAMED)


@pytest.mark.parametrize("case", ["mixtral", "mixtral-fused", "gpt-oss"])
def test_verify_and_unmerge_expert_adapters(tmp_path, cli, built, case):
    """verify recomputes the expert shares in float64 (the merge rounds once, so it passes at
    verify's 0.5 ulp on these float32 bases); unmerge takes them out again: the unmerged folder
    runs like the base (logits within float32 tolerance)."""
    base, adapter = built(case)
    out = _merge(tmp_path, base, [adapter], compute_dtype="float64")
    checked = cli("verify", out, "--base", base, "--adapter", adapter)
    assert checked.code == 0, checked.out + checked.err
    unmerged = tmp_path / "unmerged"
    result = cli("unmerge", out, adapter, "-o", unmerged)
    assert result.code == 0, result.err
    model_class = _model_class(base)
    merged_logits = logits_of(out, IDS, model_class)
    base_logits = logits_of(base, IDS, model_class)
    assert not torch.allclose(merged_logits, base_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_of(unmerged, IDS, model_class), base_logits)


def test_conversion_not_followed_is_refused_by_name(tmp_path, built, monkeypatch):
    """A fusing operation loramerge does not follow (here a Transpose in Qwen3-MoE's rules, put
    in transformers' own registry for this test) refuses the module, naming the operation."""
    from transformers import conversion_mapping
    from transformers.core_model_loading import MergeModulelist, Transpose, WeightConverter

    base, adapter = built("qwen3-moe-down")
    conversion_mapping.get_checkpoint_conversion_mapping("qwen3_moe")  # fills the registry
    rule = WeightConverter(
        source_patterns="mlp.experts.*.down_proj.weight",
        target_patterns="mlp.experts.down_proj",
        operations=[MergeModulelist(dim=0), Transpose(dim0=1, dim1=2)],
    )
    registry = conversion_mapping._checkpoint_conversion_mapping_cache
    monkeypatch.setitem(registry, "qwen3_moe", [rule])
    with pytest.raises(LoramergeError) as caught:
        _merge(tmp_path, base, [adapter])
    message = str(caught.value)
    assert "model.layers.0.mlp.experts (target_parameters)" in message
    assert "Transpose, which loramerge does not follow" in message
    assert not (tmp_path / "out").exists()
