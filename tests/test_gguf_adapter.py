"""export-adapter: GGUF LoRA adapters judged by llama.cpp and by llama.cpp's own converter.

- llama.cpp (llama-cpp-python) runs the exported adapter on the F32 GGUF of the base
  (`lora_path`); its logits must equal those of the merged F32 GGUF (`merge --dtype float32 --to
  gguf --gguf-type f32`, whose merge is checked against PEFT elsewhere) within a float32 bound;
- llama.cpp's convert_lora_to_gguf.py (from the llama-cpp-python sdist, tests/ggml_ref.py) converts
  the same adapters: tensor names, shapes, types and lora_a must equal ours, and its lora_b times
  PEFT's own scaling of that module must equal ours; how far its logits are from the merged
  model is printed (the scale it gets wrong for rsLoRA and rank/alpha patterns).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ggml_ref
import gguf
import numpy as np
import pytest
import torch
from conftest import ADAPTERS, LLAMA
from peft_oracle import peft_model
from test_gguf_export import TOKENS, _llama_cpp, _llama_cpp_logits

from loramerge.gguf_names import permute_qk
from loramerge.merge import MergeOptions, merge
from loramerge.quantize import quantize
from loramerge.sink.gguf_adapter import OUTTYPES

CONFIG = json.loads((LLAMA / "config.json").read_text())
EXPORTABLE = ["llama-lora", "llama-rslora", "llama-patterns", "llama-embed"]
WRONG_SCALE = {"llama-rslora", "llama-patterns"}  # what the converter gets wrong
U = 2.0**-24  # float32 unit roundoff
# The widest dot product in the fixture's forward (intermediate_size, down_proj's inner length).
WIDEST = max(CONFIG["hidden_size"], CONFIG["intermediate_size"])


def _bound(reference: np.ndarray) -> float:
    """How far two float32 forwards of the same weights may drift when only the order of the
    adapted sums differs (W0 x + s B (A x) against (W0 + s B A) x): a dot product of n terms errs
    by at most about n u of the sum of its |terms| (Higham's gamma_n), each of the model's blocks
    adds its own, and both forwards err, so 2 * layers * n * u, taken relative to the largest
    logit."""
    return 2 * CONFIG["num_hidden_layers"] * WIDEST * U * float(np.abs(reference).max())


@pytest.fixture(scope="module")
def base_f32(tmp_path_factory) -> Path:
    """The fixture Llama as an F32 GGUF (its bfloat16 values exactly)."""
    out = tmp_path_factory.mktemp("base") / "base-f32.gguf"
    quantize(LLAMA, out, MergeOptions(to="gguf", gguf_type="f32"))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """llama.cpp's convert_lora_to_gguf.py output: each exportable fixture adapter at F32, the
    pattern adapter at the other --outtype choices too; {(adapter, outtype): file}."""
    folder = tmp_path_factory.mktemp("converted")
    jobs = [(ADAPTERS / a, "f32") for a in EXPORTABLE]
    jobs += [(ADAPTERS / "llama-patterns", t) for t in OUTTYPES if t != "f32"]
    return ggml_ref.require(lambda: ggml_ref.convert_lora(jobs, LLAMA, folder))


def _export(cli, tmp_path: Path, adapter: str, *extra, base: Path = LLAMA) -> Path:
    out = tmp_path / f"{adapter}.gguf"
    result = cli("export-adapter", ADAPTERS / adapter, "--base", base, "-o", out, *extra)
    assert result.code == 0, result.err
    return out


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _float(tensor: gguf.ReaderTensor) -> np.ndarray:
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    return np.asarray(tensor.data, dtype=np.float32)


CASES = [(a, 1.0) for a in EXPORTABLE] + [("llama-patterns", -0.5)]


def _logits(model: Path, monkeypatch, lora: Path | None = None) -> np.ndarray:
    """llama.cpp's logits with its KV cache in float32, so the whole forward is float32 (its
    default F16 cache rounds K and V to 11 bits, where a reordered sum may flip a rounding)."""
    f32 = _llama_cpp().GGML_TYPE_F32
    return _llama_cpp_logits(model, monkeypatch, lora, type_k=f32, type_v=f32)


def _peft_logits(adapter: Path, weight: float) -> np.ndarray:
    """PEFT's own forward of base + adapter (unmerged), all in float64."""
    model, _ = peft_model(LLAMA, [adapter], [weight], torch.float64)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.mark.parametrize(("adapter", "weight"), CASES)
def test_llama_cpp_runs_adapter_like_merged_model(
    cli, tmp_path, monkeypatch, base_f32, converted, adapter, weight
):
    """llama.cpp with the exported adapter on the F32 base = llama.cpp on the merged F32 GGUF,
    and both = PEFT's float64 forward, within the float32 bound; the converter's file too where
    it gets the scale right, and far off where it does not."""
    _llama_cpp()
    merged = tmp_path / "merged.gguf"
    options = MergeOptions(weights=(weight,), dtype="float32", to="gguf", gguf_type="f32")
    merge(LLAMA, [ADAPTERS / adapter], merged, options)
    want = _logits(merged, monkeypatch)
    exact = _peft_logits(ADAPTERS / adapter, weight)
    got = _logits(base_f32, monkeypatch, lora=_export(cli, tmp_path, adapter, "-w", weight))
    without = np.abs(_logits(base_f32, monkeypatch) - want).max()
    bound, error = _bound(want), np.abs(got - want).max()
    error64, merged64 = np.abs(got - exact).max(), np.abs(want - exact).max()
    line = (
        f"{adapter} w={weight:g}: loramerge adapter {error:.3g} from merged, {error64:.3g} from "
        f"PEFT float64 (merged GGUF {merged64:.3g}; bound {bound:.3g})"
    )
    if weight == 1.0:
        theirs = _logits(base_f32, monkeypatch, lora=converted[adapter, "f32"])
        error_theirs = np.abs(theirs - want).max()
        line += f"; convert_lora_to_gguf.py {error_theirs:.3g}"
        if adapter in WRONG_SCALE:
            assert error_theirs > 100 * bound  # the scale problem, visible to this test
        else:
            assert error_theirs <= bound
    print(f"{line}; base without adapter {without:.3g}, max |logit| {np.abs(want).max():.3g}")
    assert without > 100 * bound  # the adapter changes the logits far beyond the bound
    assert error <= bound and error64 <= bound and merged64 <= bound


def _peft_scalings(adapter: Path, weight: float) -> dict[str, float]:
    """PEFT's own scaling (times the weight) of each LoRA module, by GGUF tensor name (gguf's
    TensorNameMap, not loramerge's table)."""
    model, names = peft_model(LLAMA, [adapter], [weight], torch.float32)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, CONFIG["num_hidden_layers"])
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and names[0] in scaling:
            hf = name.removeprefix("base_model.model.")
            out[tensor_map.get_name(hf + ".weight", try_suffixes=(".weight",))] = scaling[names[0]]
    return out


@pytest.mark.parametrize(("adapter", "weight"), CASES)
def test_tensors_are_the_converters_with_peft_scale(cli, tmp_path, converted, adapter, weight):
    """Same tensor names, shapes and types as convert_lora_to_gguf.py; lora_a identical; lora_b
    the converter's times PEFT's scaling of the module (one float32 product each, so exact);
    adapter.lora.alpha 0 so that llama.cpp applies no alpha / rank of its own."""
    ours_path = _export(cli, tmp_path, adapter, "-w", weight)
    ours, theirs = _tensors(ours_path), _tensors(converted[adapter, "f32"])
    assert set(ours) == set(theirs)
    scalings = _peft_scalings(ADAPTERS / adapter, weight)
    assert {n.rsplit(".", 1)[0] for n in ours} == set(scalings)
    for name, tensor in ours.items():
        other = theirs[name]
        assert list(tensor.shape) == list(other.shape), name
        assert tensor.tensor_type == other.tensor_type, name
        expected = _float(other)
        if name.endswith(".lora_b"):
            expected = expected * np.float32(scalings[name.rsplit(".", 1)[0]])
        assert np.array_equal(_float(tensor), expected), name
    fields = {k: f.contents() for k, f in gguf.GGUFReader(ours_path).fields.items()}
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 0.0
    assert fields["general.architecture"] == "llama"
    record = json.loads(fields["loramerge.provenance"])
    assert record["history"][-1]["op"] == "export-adapter"
    assert record["adapters"][0]["weight"] == weight


def test_qk_rows_permuted_like_the_base(cli, tmp_path):
    """q/k lora_b rows follow the base's GGUF row order: permuted B @ A = the permuted delta."""
    from safetensors.numpy import load_file

    out = _export(cli, tmp_path, "llama-lora")
    ours = _tensors(out)
    stored = load_file(ADAPTERS / "llama-lora" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn"
    heads = {"q": CONFIG["num_attention_heads"], "k": CONFIG["num_key_value_heads"]}
    for proj, n_head in heads.items():
        a = stored[f"{prefix}.{proj}_proj.lora_A.weight"].astype(np.float64)
        b = stored[f"{prefix}.{proj}_proj.lora_B.weight"].astype(np.float64)
        delta = permute_qk(2.0 * b @ a, n_head)  # llama-lora: alpha 16 / r 8
        pair = f"blk.0.attn_{proj}.weight"
        got = _float(ours[f"{pair}.lora_b"]).astype(np.float64) @ _float(ours[f"{pair}.lora_a"])
        rank = a.shape[0]
        tol = rank * 2 * U * (np.abs(2.0 * b) @ np.abs(a))  # a rank-r sum, B's rounding
        assert np.all(np.abs(got - delta) <= tol)


def test_gguf_base_gives_the_same_file_tensors(cli, tmp_path, base_f32):
    """BASE may be a GGUF: names and shapes are read from it, the tensors are the same; a
    quantized GGUF base works for LoRA pairs, and a saved base copy is compared with the base."""
    folder = _export(cli, tmp_path / "folder", "llama-embed")
    from_gguf = _export(cli, tmp_path / "gguf", "llama-embed", base=base_f32)
    expected = _tensors(folder)
    got = _tensors(from_gguf)
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert np.array_equal(_float(tensor), _float(expected[name])), name
    q8 = tmp_path / "base-q8.gguf"
    quantize(LLAMA, q8, MergeOptions(to="gguf", gguf_type="q8_0"))
    assert _tensors(_export(cli, tmp_path / "q8", "llama-lora", base=q8)).keys()
    refused = cli(
        "export-adapter", ADAPTERS / "llama-embed", "--base", q8, "-o", tmp_path / "x.gguf"
    )
    assert refused.code == 2
    assert "saved copy of the base's model.embed_tokens.weight" in refused.err


def _other_base(tmp_path: Path) -> Path:
    """A GGUF Llama with one q projection of another shape and none of the other tensors."""
    base = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(base, "llama")
    writer.add_block_count(CONFIG["num_hidden_layers"])
    writer.add_head_count(CONFIG["num_attention_heads"])
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return base


def test_wrong_gguf_base_is_refused_by_name(cli, tmp_path):
    """A GGUF base without the adapter's tensors, or with other shapes: every misfit named."""
    out = tmp_path / "a.gguf"
    result = cli(
        "export-adapter", ADAPTERS / "llama-rslora", "--base", _other_base(tmp_path), "-o", out
    )
    assert result.code == 2
    assert result.err.startswith("Error: llama-rslora does not fit the base")
    assert "model.layers.0.self_attn.q_proj makes a delta of shape [64, 64]" in result.err
    assert "model.layers.1.self_attn.v_proj.weight (blk.1.attn_v.weight) is not a tensor" in (
        result.err
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("adapter", "why"),
    [
        ("llama-dora", "is DoRA"),
        ("llama-resized", "replaces it whole (modules_to_save"),
        ("llama-tokens", "(trainable tokens)"),
        ("gpt2-lora", "has a trained lora_B bias"),
    ],
)
def test_what_a_lora_pair_cannot_carry_is_refused(cli, tmp_path, adapter, why):
    """One Error line naming the problem and saying to merge instead; nothing written."""
    out = tmp_path / "a.gguf"
    result = cli("export-adapter", ADAPTERS / adapter, "--base", LLAMA, "-o", out)
    assert result.code == 2
    errors = [line for line in result.err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and why in errors[0] and "merge instead" in errors[0], result.err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_tied_embedding_lora_is_refused(cli, tmp_path):
    """Embedding LoRA on a model whose output head shares the embedding: merging changes both,
    a runtime LoRA only the input side, so it is refused (no GGUF tied model is silently off)."""
    tied = Path(shutil.copytree(LLAMA, tmp_path / "tied"))
    (tied / "config.json").write_text(json.dumps({**CONFIG, "tie_word_embeddings": True}))
    result = cli(
        "export-adapter", ADAPTERS / "llama-embed", "--base", tied, "-o", tmp_path / "a.gguf"
    )
    assert result.code == 2
    assert "tied embeddings" in result.err and "merge instead" in result.err


@pytest.mark.parametrize("outtype", [t for t in OUTTYPES if t != "f32"])
def test_outtypes_are_the_converters(cli, tmp_path, converted, outtype):
    """--outtype f16/bf16/q8_0: each tensor's type is the converter's (rows a Q8_0 block does not
    divide fall back to F16), lora_a the same bytes, lora_b the bytes gguf-py's quantizer makes
    of the converter's F32 lora_b times PEFT's scaling."""
    ours = _tensors(_export(cli, tmp_path, "llama-patterns", "--outtype", outtype))
    theirs = _tensors(converted["llama-patterns", outtype])
    exact = _tensors(converted["llama-patterns", "f32"])
    scalings = _peft_scalings(ADAPTERS / "llama-patterns", 1.0)
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        qtype = theirs[name].tensor_type
        assert tensor.tensor_type == qtype, name
        expected = np.asarray(theirs[name].data)
        if name.endswith(".lora_b"):
            scaled = _float(exact[name]) * np.float32(scalings[name.rsplit(".", 1)[0]])
            expected = gguf.quants.quantize(scaled, qtype)
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8), expected.view(np.uint8))


def _nonfinite_adapter(tmp_path: Path, value: float) -> Path:
    """llama-lora with one element of a lora_B set to `value` (NaN or Inf)."""
    from safetensors.numpy import load_file, save_file

    adapter = Path(shutil.copytree(ADAPTERS / "llama-lora", tmp_path / "nonfinite"))
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][3, 1] = value
    save_file(weights, adapter / "adapter_model.safetensors")
    return adapter


def test_nonfinite_adapter_is_refused_and_nothing_written(cli, tmp_path):
    """NaN in a factor: one Error line naming the module, no output (not even a partial one)."""
    adapter = _nonfinite_adapter(tmp_path, np.nan)
    out = tmp_path / "out" / "a.gguf"
    result = cli("export-adapter", adapter, "--base", LLAMA, "-o", out)
    assert result.code == 2
    assert "NaN or Inf in the LoRA factors of model.layers.1.mlp.down_proj" in result.err
    assert not list(out.parent.iterdir())


def test_export_never_imports_torch(tmp_path):
    """The export is numpy from end to end: the CLI run never loads torch (its import alone
    would cost more than the whole 154-module export in the benchmark)."""
    from test_numpy_route import IMPORTS_TORCH

    out = tmp_path / "a.gguf"
    args = ["export-adapter", ADAPTERS / "llama-patterns", "--base", LLAMA, "-o", out, "-q"]
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_TORCH, *map(str, args)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert out.is_file()


@pytest.mark.parametrize(
    ("adapter", "extra"),
    [("llama-patterns", ("--outtype", "q8_0", "-w", "0.5")), ("llama-embed", ())],
)
def test_dry_run_lists_what_a_real_run_writes(cli, tmp_path, adapter, extra):
    """--dry-run: the tensors (names, types, shapes, bytes) and scales the real run then writes,
    as gguf-py reads its file; nothing is written."""
    out = tmp_path / "out" / "a.gguf"
    args = ("export-adapter", ADAPTERS / adapter, "--base", LLAMA, "-o", out, *extra)
    dry = cli(*args, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert not out.parent.exists() or not list(out.parent.iterdir())
    planned = json.loads(dry.out)
    assert planned["dry_run"] is True and planned["bytes_written"] == 0
    real = cli(*args, "--json")
    assert real.code == 0, real.err
    summary = json.loads(real.out)
    assert planned["scales"] == summary["scales"] and planned["lora_pairs"] == summary["lora_pairs"]
    written = [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(n) for n in reversed(t.shape)],
            "bytes": int(t.n_bytes),
        }
        for t in gguf.GGUFReader(out).tensors
    ]
    assert planned["tensors"] == written
    assert planned["tensor_bytes"] == sum(t["bytes"] for t in written)
    types = {t["type"] for t in written}
    assert planned["tensor_types"] == {k: sum(t["type"] == k for t in written) for k in types}
    text = cli(*args, "--dry-run", "--overwrite")
    assert text.code == 0 and "dry run, nothing written" in text.out
    assert all(t["name"] in text.out for t in written)


@pytest.mark.parametrize(
    "case", ["dora", "tokens", "lora-bias", "nan", "exists", "wrong-base", "name"]
)
def test_dry_run_refuses_as_a_real_run(cli, tmp_path, case):
    """Every refusal of a real run (what a pair cannot carry, NaN/Inf factors, an existing
    output, a base that does not fit, a name that is not .gguf) is the dry run's too, with the
    same one Error line and exit 2; neither writes anything."""
    adapter, base, out = ADAPTERS / "llama-lora", LLAMA, tmp_path / "out" / "a.gguf"
    if case in ("dora", "tokens"):
        adapter = ADAPTERS / f"llama-{case}"
    elif case == "nan":
        adapter = _nonfinite_adapter(tmp_path, np.inf)
    elif case == "exists":
        out.parent.mkdir()
        out.write_bytes(b"keep")
    elif case == "lora-bias":
        adapter = ADAPTERS / "gpt2-lora"
    elif case == "wrong-base":
        base = _other_base(tmp_path)
    else:
        out = out.with_suffix(".bin")
    args = ("export-adapter", adapter, "--base", base, "-o", out)
    dry, real = cli(*args, "--dry-run"), cli(*args)
    assert dry.code == real.code == 2
    errors = [line for line in dry.err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors == [
        line for line in real.err.splitlines() if line.startswith("Error:")
    ]
    left = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert left == (["a.gguf"] if case == "exists" else [])
    if case == "exists":
        assert out.read_bytes() == b"keep"
