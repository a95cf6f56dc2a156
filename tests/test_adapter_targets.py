"""Which modules an adapter's config puts it on (`adapter_targets`), held against PEFT's own
`check_target_module_exists`, and adapters whose weights go further refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ADAPTERS, LLAMA
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from loramerge.adapter_targets import untargeted

KEYS = [
    f"model.layers.{layer}.{block}.{name}"
    for layer in (0, 1, 12)
    for block, name in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"))
] + ["model.layers.3.block_sparse_moe.experts.1.w1", "transformer.h.2.attn.c_attn", "lm_head"]

CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 12]),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=1),
    dict(target_modules=["q_proj", "w1"], layers_to_transform=[3], layers_pattern="layers"),
    dict(target_modules=["w1"], layers_to_transform=[3]),  # the first number: a layer, no expert
    dict(target_modules=["c_attn", "q_proj"], layers_to_transform=[2], layers_pattern=["h"]),
    dict(target_modules=r".*\.(q_proj|down_proj)"),
    dict(target_modules=r"model\.layers\.1\..*"),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["v_proj"]),
    dict(target_modules=["q_proj", "down_proj"], exclude_modules=r".*layers\.0\..*"),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "lm_head"]),
    dict(target_modules=[]),
]


@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: json.dumps(f)[:60])
def test_the_modules_peft_would_target_are_the_ones_kept(fields):
    config = LoraConfig(**fields)
    peft_says = {k for k in KEYS if check_target_module_exists(config, k)}  # (excluded: falsy)
    mine = set(KEYS) - set(untargeted(fields, KEYS, lambda pattern: True))
    assert mine == peft_says


def test_no_target_modules_or_all_linear_hold_nothing_against_the_weights():
    """PEFT picks the modules then (its per-model defaults, or every linear layer)."""
    assert untargeted({}, KEYS, lambda p: True) == []
    assert untargeted({"target_modules": "all-linear"}, KEYS, lambda p: True) == []
    assert untargeted({"target_modules": "(a+)+"}, KEYS, lambda p: False) == []  # unsafe: not run


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"layers_to_transform": [0]}, "model.layers.1."),
        ({"target_modules": ["nothing"]}, "model.layers.0."),
        ({"exclude_modules": ["v_proj"]}, "v_proj"),
        ({"target_modules": r".*\.q_proj"}, "_proj"),
    ],
)
def test_weights_beyond_the_config_are_refused_by_name(cli, tmp_path, change, named):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama-lora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out"
    result = cli("merge", LLAMA, adapter, "-o", out)
    assert result.code == 2 and "PEFT" in result.err and named in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and not out.exists()


def test_a_config_with_wrong_types_is_refused(cli, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama-lora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": "0"}))
    result = cli("merge", LLAMA, adapter, "-o", tmp_path / "out")
    assert result.code == 2 and "layers_to_transform must be" in result.err
