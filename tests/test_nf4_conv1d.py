"""NF4 of Conv1D models (GPT-2): transformers quantizes the transpose of each (in, out) Conv1D
weight, so its NF4 state is of the (out, in) matrix. Held against transformers' own quantization
and save, bitsandbytes' dequantize_4bit, and the float64 reference / PEFT merge."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ADAPTERS, GPT2
from reference import Expected, float32_bound, load_base, reference_merge, ulp_error
from test_quantize import _logits, _quantized_by_transformers, _tensors

from loramerge import blocked
from loramerge.nf4_layout import STATE

transformers = pytest.importorskip("transformers")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

ADAPTER = ADAPTERS / "gpt2-lora"  # c_attn, c_fc, c_proj (fan_in_fan_out, lora_bias)
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# (part size, arithmetic): whole tensors; one row; a size that divides no row; the torch route
# (float64) in parts of one row
PARTS = [("", "float32"), ("1", "float32"), ("3000", "float32"), ("1", "float64")]


def _conv1d_weights() -> list[str]:
    return [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in CONV1D]


@pytest.fixture(scope="module")
def tf_nf4(tmp_path_factory):
    """The GPT-2 fixture quantized and saved by transformers + bitsandbytes, and that model."""
    folder = tmp_path_factory.mktemp("tf") / "nf4"
    return folder, _quantized_by_transformers(GPT2, folder)


@pytest.fixture(scope="module")
def bnb_dequantized(tf_nf4, tmp_path_factory):
    """What bitsandbytes' dequantize_4bit gives for transformers' NF4 GPT-2, as a checkpoint."""
    folder = tmp_path_factory.mktemp("dequantized") / "gpt2"
    _save_dequantized(tf_nf4[1], folder)
    return folder


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_gpt2_equals_transformers(cli, tmp_path, double_quant):
    reference = _quantized_by_transformers(GPT2, tmp_path / "tf", double_quant)
    args = ["quantize", GPT2, "-o", tmp_path / "ours", "--to", "nf4"]
    result = cli(*args, *([] if double_quant else ["--no-double-quant"]))
    assert result.code == 0, result.err
    theirs, ours = _tensors(tmp_path / "tf"), _tensors(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    assert sorted(n.removesuffix(STATE) for n in ours if n.endswith(STATE)) == sorted(
        _conv1d_weights()
    )
    c_attn = json.loads(ours["transformer.h.0.attn.c_attn.weight" + STATE][2])
    assert c_attn["shape"] == [192, 64]  # (out, in): the stored (64, 192) transposed
    assert [n for n in ours if ours[n] != theirs[n]] == []
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    expected = json.loads((tmp_path / "tf" / "config.json").read_text())
    assert config["quantization_config"] == expected["quantization_config"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert type(loaded.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    assert torch.equal(_logits(loaded), _logits(reference))


@pytest.mark.parametrize("chunk, compute", PARTS)
def test_merge_gpt2_to_nf4_is_the_bf16_merge_quantized(cli, tmp_path, monkeypatch, chunk, compute):
    """Streamed in parts as small as one row: a Conv1D weight still comes whole to the
    sink (its NF4 blocks run down the stored columns) and gives transformers' bytes. Merge
    blocks of one row (as in test_chunked.py), so parts of one row can exist."""
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 1)
    arithmetic = ["--compute-dtype", compute]
    assert cli("merge", GPT2, ADAPTER, "-o", tmp_path / "bf16", *arithmetic).code == 0
    reference = _quantized_by_transformers(tmp_path / "bf16", tmp_path / "tf")
    monkeypatch.setenv("LORAMERGE_CHUNK_BYTES", chunk)
    result = cli("merge", GPT2, ADAPTER, "-o", tmp_path / "nf4", "--to", "nf4", *arithmetic)
    assert result.code == 0, result.err
    theirs, ours = _tensors(tmp_path / "tf"), _tensors(tmp_path / "nf4")
    assert sorted(ours) == sorted(theirs)
    assert [n for n in ours if ours[n] != theirs[n]] == []
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert torch.equal(_logits(loaded), _logits(reference))
    # verify reads the (out, in) blocks back in the (in, out) layout: it passes with the
    # adapter and fails without it
    verify = cli("verify", tmp_path / "nf4", "--base", GPT2, "--adapter", ADAPTER)
    assert verify.code == 0, verify.out
    assert cli("verify", tmp_path / "nf4", "--base", GPT2).code == 1


def test_nf4_gpt2_base_reads_as_bitsandbytes_dequantizes_it(cli, tmp_path, tf_nf4, bnb_dequantized):
    """transformers' NF4 GPT-2 as a merge base: the same bytes as merging into the weights
    bitsandbytes' dequantize_4bit gives (transposed back), within the float32 bound of the
    float64 reference merge of those weights, which PEFT's float64 merge agrees with."""
    from peft_oracle import peft_merged_state

    nf4, _ = tf_nf4
    result = cli("merge", nf4, ADAPTER, "-o", tmp_path / "ours")
    assert result.code == 0, result.err
    assert cli("merge", bnb_dequantized, ADAPTER, "-o", tmp_path / "reference").code == 0
    ours, reference = _tensors(tmp_path / "ours"), _tensors(tmp_path / "reference")
    assert sorted(ours) == sorted(reference) and len(ours) == 28
    assert [n for n in ours if ours[n] != reference[n]] == []
    merged = load_base(tmp_path / "ours")
    expected = reference_merge(bnb_dequantized, [ADAPTER], [1.0])
    peft64 = peft_merged_state(bnb_dequantized, [ADAPTER], [1.0], torch.float64)
    assert set(_conv1d_weights()) <= set(expected)
    for name, exp in expected.items():
        torch.testing.assert_close(peft64[name], exp.value, rtol=1e-12, atol=1e-12)
        bound = float32_bound(exp, merged[name].dtype)
        assert not (ulp_error(merged[name], exp.value) > bound).any(), name
    assert "quantization_config" not in json.loads((tmp_path / "ours" / "config.json").read_text())
    report = json.loads(cli("inspect", nf4, "--json").out)
    assert report["quantization"]["quantized_tensors"] == 8
    assert report["parameters"] == json.loads(cli("inspect", GPT2, "--json").out)["parameters"]
    verify = cli("verify", tmp_path / "ours", "--base", nf4, "--adapter", ADAPTER)
    assert verify.code == 0, verify.out
    assert cli("verify", nf4, "--base", GPT2).code == 0  # NF4 candidate of the bf16 base


def test_nf4_gpt2_base_to_nf4(cli, tmp_path, tf_nf4):
    """NF4 GPT-2 written to NF4 again: untouched, its stored bytes; merged, transformers'
    quantization of the bf16 merge into the same base."""
    nf4, _ = tf_nf4
    theirs = _tensors(nf4)
    assert cli("quantize", nf4, "-o", tmp_path / "again", "--to", "nf4").code == 0
    again = _tensors(tmp_path / "again")
    assert sorted(again) == sorted(theirs)
    assert [n for n in again if again[n] != theirs[n]] == []
    assert cli("merge", nf4, ADAPTER, "-o", tmp_path / "bf16").code == 0
    reference = _quantized_by_transformers(tmp_path / "bf16", tmp_path / "tf")
    result = cli("merge", nf4, ADAPTER, "-o", tmp_path / "merged", "--to", "nf4")
    assert result.code == 0, result.err
    merged, expected = _tensors(tmp_path / "merged"), _tensors(tmp_path / "tf")
    assert sorted(merged) == sorted(expected)
    assert [n for n in merged if merged[n] != expected[n]] == []
    assert [w for w in _conv1d_weights() if merged[w] == theirs[w]] == []
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", device_map="cpu"
    )
    assert torch.equal(_logits(loaded), _logits(reference))


def test_qlora_base_gpt2_is_the_merge_into_bitsandbytes_weights(cli, tmp_path, bnb_dequantized):
    """`--qlora-base` on GPT-2 merges into dequant(NF4(W0)) of the transposed Conv1D weights,
    as transformers quantizes them for QLoRA training: byte for byte the merge into the
    weights bitsandbytes dequantizes from transformers' own NF4 model."""
    qlora = tmp_path / "qlora"
    result = cli("merge", GPT2, ADAPTER, "-o", qlora, "--qlora-base", "--verify")
    assert result.code == 0, result.err + result.out
    assert cli("merge", bnb_dequantized, ADAPTER, "-o", tmp_path / "reference").code == 0
    ours, reference = _tensors(qlora), _tensors(tmp_path / "reference")
    assert sorted(ours) == sorted(reference)
    assert [n for n in ours if ours[n] != reference[n]] == []
    record = json.loads((qlora / "loramerge.json").read_text())
    assert record["qlora_base"] == {"blocksize": 64, "double_quant": True}
    assert record["verification"]["passed"]


def test_unmerge_and_rebase_of_nf4_gpt2(cli, tmp_path, bnb_dequantized):
    """Through the record: `unmerge --base` rebuilds the pristine base exactly; without it the
    adapter comes out of the dequantized weights (float64 reference within the float32 bound);
    `rebase --base` of NF4 and `--qlora-base` merges equals the direct merge byte for byte."""
    merged = tmp_path / "merged"
    assert cli("merge", GPT2, ADAPTER, "-o", merged, "--to", "nf4").code == 0
    result = cli("unmerge", merged, ADAPTER, "-o", tmp_path / "pristine", "--base", GPT2)
    assert result.code == 0, result.err
    pristine, base = _tensors(tmp_path / "pristine"), _tensors(GPT2)
    assert sorted(pristine) == sorted(base)
    assert [n for n in base if pristine[n] != base[n]] == []

    result = cli("unmerge", merged, ADAPTER, "-o", tmp_path / "undone")
    assert result.code == 0, result.err
    undone = load_base(tmp_path / "undone")
    dequantized = tmp_path / "merged-dequantized"
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, device_map="cpu")
    _save_dequantized(model, dequantized)
    expected = reference_merge(dequantized, [ADAPTER], [-1.0])
    assert set(_conv1d_weights()) <= set(expected)
    for name, exp in expected.items():
        bound = float32_bound(exp, undone[name].dtype)
        assert not (ulp_error(undone[name], exp.value) > bound).any(), name

    embed = ADAPTERS / "gpt2-embed"
    for flags in (["--to", "nf4"], ["--qlora-base"]):
        name = flags[-1].lstrip("-")
        first, direct = tmp_path / f"{name}-first", tmp_path / f"{name}-direct"
        assert cli("merge", GPT2, ADAPTER, "-o", first, *flags).code == 0
        assert cli("merge", GPT2, embed, "-o", direct, *flags).code == 0
        args = ["--remove", ADAPTER, "--add", embed, "--base", GPT2, *flags[:2]]
        result = cli("rebase", first, *args, "-o", tmp_path / f"{name}-swapped")
        assert result.code == 0, result.err
        swapped, want = _tensors(tmp_path / f"{name}-swapped"), _tensors(direct)
        assert sorted(swapped) == sorted(want)
        assert [n for n in want if swapped[n] != want[n]] == [], flags


def _save_dequantized(model, folder) -> None:
    """A bf16 checkpoint of a loaded NF4 GPT-2: each 4-bit weight dequantized by bitsandbytes
    and, being a Conv1D one, transposed back to the (in, out) layout the checkpoint stores."""
    from safetensors.torch import save_file
    from transformers.pytorch_utils import Conv1D

    stored = load_base(GPT2)
    state = {}
    for name, module in model.named_modules():
        for key, param in module.named_parameters(prefix=name, recurse=False):
            quant_state = getattr(param, "quant_state", None)
            value = param.data
            if quant_state is not None:
                assert issubclass(module.source_cls, Conv1D), key
                value = bnb_functional.dequantize_4bit(value, quant_state).T
            if key in stored:  # (lm_head is tied, not stored)
                state[key] = value.contiguous()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in stored.items()
    }
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((GPT2 / "config.json").read_text())


def test_conv1d_names_without_a_model_type_are_refused(cli, tmp_path, tf_nf4):
    """Without config.json, `c_attn` may be a GPT-2 Conv1D weight (NF4 of its transpose) or a
    Linear: reading, writing or verifying it as NF4 is refused rather than guessed."""
    nf4, _ = tf_nf4
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((nf4 / "model.safetensors").read_bytes())
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes((GPT2 / "model.safetensors").read_bytes())
    runs = [
        ("merge", lone, ADAPTER, "-o", tmp_path / "out"),
        ("quantize", plain, "-o", tmp_path / "out", "--to", "nf4"),
        ("merge", plain, ADAPTER, "-o", tmp_path / "out", "--qlora-base"),
        ("verify", lone, "--base", GPT2),
        ("verify", GPT2, "--base", lone),
    ]
    for args in runs:
        result = cli(*args)
        assert result.code == 2, (args, result.err)
        assert result.err.startswith("Error:") and "config.json" in result.err, args
        assert not (tmp_path / "out").exists()


def test_adapter_trained_on_nf4_gpt2(cli, tmp_path, tf_nf4):
    """A LoRA trained with PEFT on transformers' NF4 GPT-2 (QLoRA), where the Conv1D layers were
    Linear4bit, so its config says fan_in_fan_out false: merged as PEFT merges it into the bf16
    model (which sets fan_in_fan_out for Conv1D targets), within the float32 bound of PEFT's
    float64 merge; `--qlora-base` is closer to the training-time model than the plain merge,
    and is byte for byte the merge into transformers' NF4 GPT-2."""
    from peft_oracle import peft_merged_state
    from safetensors.torch import load_file
    from test_qlora import _logits as bf16_logits
    from test_qlora import _train_qlora

    adapter = tmp_path / "adapter"
    trained = _train_qlora(adapter, GPT2, ["c_attn", "c_proj", "c_fc"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False
    plain, qlora, from_nf4 = tmp_path / "plain", tmp_path / "qlora", tmp_path / "from-nf4"
    result = cli("merge", GPT2, adapter, "-o", plain, "--json")
    assert result.code == 0, result.err
    assert any("fan_in_fan_out" in note for note in json.loads(result.out)["notes"])
    assert cli("merge", GPT2, adapter, "-o", qlora, "--qlora-base").code == 0
    assert cli("merge", tf_nf4[0], adapter, "-o", from_nf4).code == 0
    ours, want = _tensors(qlora), _tensors(from_nf4)
    assert [n for n in want if ours[n] != want[n]] == []

    merged, base = load_base(plain), load_base(GPT2)
    factors = load_file(adapter / "adapter_model.safetensors")
    peft64 = peft_merged_state(GPT2, [adapter], [1.0], torch.float64)
    scale = config["lora_alpha"] / config["r"]
    for name in _conv1d_weights():
        key = "base_model.model." + name.removesuffix(".weight")
        a, b = (factors[f"{key}.lora_{x}.weight"].double() for x in "AB")
        magnitude = base[name].double().abs() + scale * (b.abs() @ a.abs()).T
        exp = Expected(peft64[name], magnitude, config["r"])
        bound = float32_bound(exp, merged[name].dtype)
        assert not (ulp_error(merged[name], exp.value) > bound).any(), name

    plain_distance = (bf16_logits(plain) - trained).abs().max().item()
    qlora_distance = (bf16_logits(qlora) - trained).abs().max().item()
    print(
        f"\nGPT-2, max |logits - training-time logits|: plain merge {plain_distance:.4g}, "
        f"--qlora-base merge {qlora_distance:.4g}"
    )
    assert qlora_distance < plain_distance
