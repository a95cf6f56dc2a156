"""`quantize --to nf4` and `merge --to nf4` against transformers' own 4-bit quantization."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ADAPTERS, LLAMA, ROOT
from test_numpy_route import IMPORTS_TORCH

from loramerge import dtypes
from loramerge.nf4_layout import PARTS, STATE
from loramerge.source.checkpoint import open_weights

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

PROMPT = torch.tensor([[0, 5, 17, 42, 99, 200, 3, 7]])


def _bnb_config(double_quant: bool = True):
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _quantized_by_transformers(base, folder, double_quant: bool = True):
    """transformers + bitsandbytes quantize `base` on load; save_pretrained writes `folder`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitsandbytes' offset then sums in one fixed order
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            base, quantization_config=_bnb_config(double_quant), device_map="cpu"
        )
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder)
    return model


def _tensors(folder) -> dict[str, bytes]:
    """Every stored tensor as it is on disk (NF4 parts included, nothing dequantized)."""
    with open_weights(folder, stem="model", allow_pickle=False, dequantize=False) as checkpoint:
        return {
            name: (info.dtype, info.shape, checkpoint.read(name).tobytes())
            for name, info in checkpoint.tensors.items()
        }


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits.float()


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_equals_transformers(cli, tmp_path, double_quant):
    reference = _quantized_by_transformers(LLAMA, tmp_path / "tf", double_quant)
    args = ["quantize", LLAMA, "-o", tmp_path / "ours", "--to", "nf4"]
    result = cli(*args, *([] if double_quant else ["--no-double-quant"]))
    assert result.code == 0, result.err
    theirs, ours = _tensors(tmp_path / "tf"), _tensors(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    assert sum(n.endswith(".quant_state.bitsandbytes__nf4") for n in ours) == 14
    assert [n for n in ours if ours[n] != theirs[n]] == []
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    expected = json.loads((tmp_path / "tf" / "config.json").read_text())
    assert config["quantization_config"] == expected["quantization_config"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    # byte-identical weights through the same code: the same logits, bit for bit
    assert torch.equal(_logits(loaded), _logits(reference))


def test_merge_to_nf4_is_the_bf16_merge_quantized(cli, tmp_path):
    adapter = ADAPTERS / "llama-lora"
    assert cli("merge", LLAMA, adapter, "-o", tmp_path / "bf16").code == 0
    reference = _quantized_by_transformers(tmp_path / "bf16", tmp_path / "tf")
    result = cli("merge", LLAMA, adapter, "-o", tmp_path / "nf4", "--to", "nf4")
    assert result.code == 0, result.err
    theirs, ours = _tensors(tmp_path / "tf"), _tensors(tmp_path / "nf4")
    assert sorted(ours) == sorted(theirs)
    assert [n for n in ours if ours[n] != theirs[n]] == []
    record = json.loads((tmp_path / "nf4" / "loramerge.json").read_text())
    assert record["output"]["format"] == "nf4" and record["adapters"][0]["sha256"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert torch.equal(_logits(loaded), _logits(reference))
    assert cli("verify", tmp_path / "nf4", "--files").code == 0


def test_skip_modules(cli, tmp_path):
    out = tmp_path / "out"
    result = cli(
        "quantize", LLAMA, "-o", out, "--to", "nf4",
        "--skip-modules", "lm_head", "--skip-modules", "model.layers.1",
    )  # fmt: skip
    assert result.code == 0, result.err
    tensors = _tensors(out)
    assert "model.layers.0.mlp.up_proj.weight.nested_absmax" in tensors
    assert not any(n.startswith("model.layers.1.") and "absmax" in n for n in tensors)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["lm_head", "model.layers.1"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert type(loaded.model.layers[1].mlp.up_proj).__name__ == "Linear"
    with open_weights(LLAMA, stem="model", allow_pickle=False) as base:
        kept = dtypes.as_torch(base.read("model.layers.1.mlp.up_proj.weight").copy())
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight.data, kept)
    assert torch.isfinite(_logits(loaded)).all()


def test_blocksize(cli, tmp_path):
    """(bitsandbytes' CPU matmul needs in_features >= blocksize, so this model is not run.)"""
    out = tmp_path / "out"
    assert cli("quantize", LLAMA, "-o", out, "--to", "nf4", "--blocksize", "128").code == 0
    tensors = _tensors(out)
    name = "model.layers.0.mlp.up_proj.weight"
    state = json.loads(tensors[name + ".quant_state.bitsandbytes__nf4"][2])
    assert state["blocksize"] == 128 and state["shape"] == [128, 64]
    assert tensors[name + ".absmax"][1] == (128 * 64 // 128,)


def test_quantize_refusals(cli, tmp_path):
    result = cli("quantize", LLAMA, "-o", tmp_path / "x", "--to", "nf4", "--blocksize", "100")
    assert result.code == 2 and result.err.startswith("Error:") and "blocksize" in result.err
    result = cli("quantize", LLAMA, "-o", tmp_path / "x", "--to", "safetensors")
    assert result.code == 2
    assert not (tmp_path / "x").exists()


def test_nf4_base_reads_as_bitsandbytes_dequantizes_it(cli, tmp_path):
    """An NF4 checkpoint written by transformers, as a merge base: the same output, byte for
    byte, as merging into the bf16 weights bitsandbytes' dequantize_4bit gives for it."""
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    model = _quantized_by_transformers(LLAMA, tmp_path / "nf4")
    state = {}
    for name, param in model.named_parameters():
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            state[name] = F.dequantize_4bit(param.data, quant_state).contiguous()
        else:
            state[name] = param.data.contiguous()
    dequantized = tmp_path / "dequantized"
    dequantized.mkdir()
    save_file(state, dequantized / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((LLAMA / "config.json").read_text())
    (dequantized / "config.json").write_text(json.dumps(config))
    adapter = ADAPTERS / "llama-lora"
    assert cli("merge", tmp_path / "nf4", adapter, "-o", tmp_path / "ours").code == 0
    result = cli("merge", dequantized, adapter, "-o", tmp_path / "reference")
    assert result.code == 0, result.err
    ours, reference = _tensors(tmp_path / "ours"), _tensors(tmp_path / "reference")  # both bf16
    assert sorted(ours) == sorted(reference) and len(ours) == 21
    assert [n for n in ours if ours[n] != reference[n]] == []
    assert "quantization_config" not in json.loads((tmp_path / "ours" / "config.json").read_text())
    # inspect describes it; verify takes it as the base and as the candidate
    report = json.loads(cli("inspect", tmp_path / "nf4", "--json").out)
    assert report["quantization"]["format"] == "nf4"
    assert report["quantization"]["quantized_tensors"] == 14
    verify = cli("verify", tmp_path / "ours", "--base", tmp_path / "nf4", "--adapter", adapter)
    assert verify.code == 0, verify.out
    assert cli("verify", tmp_path / "nf4", "--base", LLAMA).code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["quantize", LLAMA, "--to", "nf4"],
        ["merge", LLAMA, ADAPTERS / "llama-lora", "--to", "nf4"],
        ["merge", LLAMA, ADAPTERS / "llama-lora", "--qlora-base"],
    ],
)
def test_nf4_on_the_cpu_never_imports_torch(tmp_path, args):
    out = tmp_path / "out"
    argv = [str(a) for a in args] + ["-o", str(out), "--quiet"]
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_TORCH, *argv], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert (out / "loramerge.json").is_file()


def test_nf4_base_to_nf4_copies_untouched_weights(cli, tmp_path):
    """An NF4 base written to NF4 keeps the stored bytes of every weight nothing changes:
    re-quantizing its dequantized values would not (the absmax of bf16-rounded values moves)."""
    _quantized_by_transformers(LLAMA, tmp_path / "tf")
    theirs = _tensors(tmp_path / "tf")
    assert cli("quantize", tmp_path / "tf", "-o", tmp_path / "again", "--to", "nf4").code == 0
    again = _tensors(tmp_path / "again")
    assert sorted(again) == sorted(theirs)
    assert [n for n in again if again[n] != theirs[n]] == []
    adapter = ADAPTERS / "llama-rslora"  # q_proj and v_proj only
    result = cli("merge", tmp_path / "tf", adapter, "-o", tmp_path / "merged", "--to", "nf4")
    assert result.code == 0, result.err
    merged = _tensors(tmp_path / "merged")
    assert sorted(merged) == sorted(theirs)
    weights = [n.removesuffix(STATE) for n in theirs if n.endswith(STATE)]
    touched = [w for w in weights if w.split(".")[-2] in ("q_proj", "v_proj")]
    assert touched and len(touched) < len(weights)
    for weight in weights:
        parts = [weight, *(weight + p for p in PARTS)]
        if weight in touched:
            assert merged[weight] != theirs[weight], weight
        else:
            assert [p for p in parts if merged[p] != theirs[p]] == [], weight
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", device_map="cpu"
    )
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert torch.isfinite(_logits(loaded)).all()
