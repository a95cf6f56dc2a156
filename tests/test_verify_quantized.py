"""`verify` on quantized candidates, made by the real libraries: GGUF written by gguf-py (the
quantizers llama.cpp's converter uses, with its q/k permutation), NF4 by bitsandbytes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ADAPTERS, LLAMA
from reference import load_base
from safetensors.torch import save_file

from loramerge.merge import MergeOptions, merge

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def to_gguf(folder, path, qtype: Q) -> None:
    """A llama GGUF of a merged Hugging Face folder, as convert_hf_to_gguf.py lays it out."""
    config = json.loads((folder / "config.json").read_text())
    tensors = load_base(folder)
    blocks, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(blocks)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("no_vocab")
    for name, tensor in tensors.items():
        data = tensor.float()
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target.endswith(("attn_q.weight", "attn_k.weight")):
            h = heads if "attn_q" in target else kv_heads
            rows = data.shape[0]
            data = data.reshape(h, 2, rows // h // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
        array = data.numpy()
        kind = Q.F32 if array.ndim == 1 else qtype
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(target, array.astype(np.float32 if kind == Q.F32 else np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _verify(cli, candidate, adapter="llama-lora", *extra):
    result = cli(
        "verify", candidate, "--base", LLAMA, "--adapter", ADAPTERS / adapter, "--json", *extra
    )
    return result.code, json.loads(result.out) if result.out else result.err


@pytest.fixture
def merged(tmp_path):
    out = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-lora"], out)
    return out


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.F16])
def test_gguf_of_a_correct_merge_passes(cli, tmp_path, merged, qtype):
    path = tmp_path / "model.gguf"
    to_gguf(merged, path, qtype)
    code, report = _verify(cli, path)
    assert code == 0, report["verdict"]
    quantized = [t for t in report["tensors"] if t["bound_ratio"] is not None]
    assert len(quantized) == 21 and all(t["bound_ratio"] <= 1 for t in quantized)
    print(f"\n{qtype.name}: {report['verdict']}")


def test_gguf_of_a_wrong_merge_fails(cli, tmp_path):
    wrong = tmp_path / "wrong"
    merge(LLAMA, [ADAPTERS / "llama-lora"], wrong, MergeOptions(weights=(0.5,)))
    to_gguf(wrong, tmp_path / "wrong.gguf", Q.Q8_0)
    code, report = _verify(cli, tmp_path / "wrong.gguf")
    assert code == 1
    assert sum(not t["passed"] for t in report["tensors"]) == 14


def test_gguf_with_one_corrupted_block_names_the_tensor(cli, tmp_path, merged):
    path = tmp_path / "model.gguf"
    to_gguf(merged, path, Q.Q8_0)
    reader = gguf.GGUFReader(path)
    target = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    offset = int(target.data_offset) + 2 + 5  # past the block's float16 scale, 6th value
    raw = bytearray(path.read_bytes())
    raw[offset] = (raw[offset] + 40) % 256
    path.write_bytes(bytes(raw))
    code, report = _verify(cli, path)
    assert code == 1
    assert [t["name"] for t in report["tensors"] if not t["passed"]] == [
        "model.layers.1.mlp.up_proj.weight"
    ]


def test_gguf_missing_tensor_fails(cli, tmp_path, merged):
    trimmed = tmp_path / "trimmed"
    shutil.copytree(merged, trimmed)
    state = load_base(trimmed)
    for path in trimmed.glob("model*.safetensors"):
        path.unlink()
    del state["model.norm.weight"]
    save_file(state, trimmed / "model.safetensors", metadata={"format": "pt"})
    to_gguf(trimmed, tmp_path / "model.gguf", Q.Q8_0)
    code, report = _verify(cli, tmp_path / "model.gguf")
    assert code == 1
    assert [(t["name"], t["kind"]) for t in report["tensors"] if not t["passed"]] == [
        ("model.norm.weight", "missing")
    ]


def to_nf4(folder, out, functional) -> dict:
    """The transformers/bitsandbytes NF4 layout of every Linear weight of a merged folder."""
    shutil.copytree(folder, out)
    state, originals = {}, {}
    for name, tensor in load_base(folder).items():
        if tensor.dim() == 2 and "embed" not in name and "lm_head" not in name:
            packed, quant_state = functional.quantize_4bit(
                tensor, blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            state[name] = packed
            for key, value in quant_state.as_dict(packed=True).items():
                state[f"{name}.{key}"] = value
            originals[name] = (packed, quant_state)
        else:
            state[name] = tensor
    for path in out.glob("model*.safetensors"):
        path.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    return originals


def test_nf4_checkpoint_dequantizes_like_bitsandbytes_and_passes(cli, tmp_path, merged):
    functional = pytest.importorskip("bitsandbytes.functional")
    from loramerge.verify.weights import open_quantized

    originals = to_nf4(merged, tmp_path / "nf4", functional)
    reader = open_quantized(tmp_path / "nf4", allow_pickle=False)
    for name, (packed, quant_state) in originals.items():
        ours, _, kind = reader.read(name, tuple(quant_state.shape))
        theirs = functional.dequantize_4bit(packed, quant_state).double()
        assert kind == "nf4" and torch.equal(ours, theirs), name
    reader.close()
    code, report = _verify(cli, tmp_path / "nf4")
    assert code == 0, report["verdict"]
    print(f"\nNF4: {report['verdict']}")
    wrong = tmp_path / "wrong"
    merge(LLAMA, [ADAPTERS / "llama-lora"], wrong, MergeOptions(weights=(0.25,)))
    to_nf4(wrong, tmp_path / "wrong-nf4", functional)
    code, report = _verify(cli, tmp_path / "wrong-nf4")
    assert code == 1 and not report["passed"]


def test_gguf_forward_uses_llama_cpp_or_says_it_cannot(cli, tmp_path, merged):
    path = tmp_path / "model.gguf"
    to_gguf(merged, path, Q.Q8_0)
    code, report = _verify(cli, path, "llama-lora", "--forward")
    assert code == 0
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert report["forward"]["skipped"] is True
        assert "llama-cpp-python is not installed" in report["forward"]["summary"]
    else:
        assert report["forward"]["judged"] is False and report["forward"]["top1_agreement"] > 0.5
    print(f"\nGGUF forward: {report['forward']['summary']}")
