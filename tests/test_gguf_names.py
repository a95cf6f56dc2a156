"""loramerge.gguf_names against llama.cpp's own convert_hf_to_gguf.py (from the sdist).

The converter runs on the llama fixture and on tiny random Qwen2 (rows of 48), Gemma (float16)
and Gemma 2 (bfloat16) checkpoints, at --outtype f32, f16, bf16 and q8_0 (its vocabulary step
skipped: tests/hf_to_gguf_runner.py), and its files are read back with gguf.GGUFReader. For every
tensor: the GGUF name (gguf's TensorNameMap, dropped tensors), the values after the Llama q/k
permutation or the Gemma norm offset (exact at f32), the converter's type (F16 where Q8_0 blocks
do not fit), and the bytes loramerge's own quantizers make of those values (equal to the
converter's, which uses gguf-py's quantizers).
"""

from __future__ import annotations

import json
from pathlib import Path

import ggml_ref
import gguf
import numpy as np
import pytest
from conftest import LLAMA
from safetensors import safe_open

from loramerge.gguf_names import (
    ARCHITECTURES,
    TensorNames,
    UnsupportedArchitecture,
    architecture,
    permute_qk,
    to_gguf_values,
    unpermute_qk,
)
from loramerge.quant import ggml
from loramerge.quant.ggml_types import converter_type

T = gguf.GGMLQuantizationType
OUTTYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}
SMALL = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def _tiny(kind: str, folder: Path) -> Path:
    """A random checkpoint of one architecture, every weight (norms included) non-trivial."""
    import torch
    import transformers

    config_cls, model_cls, dtype, hidden = {
        # qwen2's rows of 48 are not whole Q8_0 blocks: the converter falls back to F16
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", torch.float32, 48),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", torch.float16, 64),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", torch.bfloat16, 64),
    }[kind]
    torch.manual_seed(0)
    shape = {**SMALL, "hidden_size": hidden}
    config = getattr(transformers, config_cls)(**shape, tie_word_embeddings=True)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(folder)
    return folder


def _checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as numpy: bfloat16 widened (the converter widens it too)."""
    import torch

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                out[key] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out


MODELS = ["llama fixture", "qwen2", "gemma", "gemma2"]


@pytest.fixture(scope="module")
def converted_all(tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    """Per model: (folder, config, {outtype: GGUFReader}) of llama.cpp's converter's files."""
    ggml_ref.require(ggml_ref.sources)
    out = tmp_path_factory.mktemp("converted")
    folders = {m: LLAMA if m == "llama fixture" else _tiny(m, out / m) for m in MODELS}
    files = ggml_ref.convert(folders, out, list(OUTTYPES))
    return {
        m: (
            folder,
            json.loads((folder / "config.json").read_text()),
            {t: gguf.GGUFReader(files[m, t]) for t in OUTTYPES},
        )
        for m, folder in folders.items()
    }


@pytest.fixture(params=MODELS)
def converted(request, converted_all):
    return converted_all[request.param]


def test_names_values_and_types_equal_converter(converted):
    """Names, values, types and bytes of every tensor equal the converter's files."""
    folder, config, readers = converted
    arch = architecture(config)
    names = TensorNames(arch, config["num_hidden_layers"])
    hf = _checkpoint(folder)
    ours = {}
    for hf_name, w in hf.items():
        name = names.gguf_name(hf_name)
        if name is not None:
            ours[name] = (hf_name, to_gguf_values(arch, hf_name, w, config))
    for outtype, reader in readers.items():
        assert reader.fields["general.architecture"].contents() == arch.name
        theirs = {t.name: t for t in reader.tensors}
        assert set(theirs) == set(ours), outtype
        for name, (hf_name, values) in ours.items():
            t = theirs[name]
            want = converter_type(name, values.shape, OUTTYPES[outtype])
            assert t.tensor_type == want, (outtype, name)
            mine = ggml.quantize(values.astype(np.float32).reshape(-1, values.shape[-1]), want)
            assert np.array_equal(mine.view(np.uint8).ravel(), t.data.view(np.uint8).ravel()), (
                outtype,
                hf_name,
            )
    print(f"{arch.name}: {len(ours)} tensors x {len(readers)} outtypes equal the converter's")


def test_converter_files_read_back_as_the_checkpoint(converted):
    """The converter's F32 file read as a checkpoint (source.gguf_file, the reverse name map):
    the checkpoint's names (less what the converter drops), its config facts, its values (q/k
    un-permuted; a Gemma norm is (w + 1) - 1: one rounding at |w + 1| in the dtype the converter
    adds in, float16 for a float16 checkpoint, else float32)."""
    from loramerge.source.checkpoint import open_weights

    folder, config, readers = converted
    hf = _checkpoint(folder)
    dropped = set(architecture(config).skip)
    with open_weights(Path(readers["f32"].data.filename), stem="model", allow_pickle=False) as ck:
        assert set(ck.tensors) == set(hf) - dropped
        view = ck.gguf.config
        for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            assert view[key] == config[key], key
        assert view["architectures"][0] in ARCHITECTURES
        assert view["tie_word_embeddings"] == ("lm_head.weight" not in ck.tensors)
        for name, info in ck.tensors.items():
            got, want = ck.read(name), hf[name].astype(np.float32)
            assert info.shape == want.shape and got.shape == want.shape, name
            if architecture(config).norm_offset and name.endswith("norm.weight"):
                step = np.spacing((np.abs(want) + 1).astype(hf[name].dtype)).astype(np.float32)
                assert (np.abs(got - want) <= step).all(), name
            else:
                assert np.array_equal(got, want), name


def test_permutation_round_trip_and_layout():
    """unpermute_qk inverts permute_qk; a head's rows become its two rotary halves interleaved."""
    rows = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    assert np.array_equal(unpermute_qk(permute_qk(rows, 2), 2), rows)
    head = permute_qk(rows, 2)[:16, 0] / 3  # head 0: rows 0..15, halves 0..7 and 8..15
    assert head.tolist() == [i // 2 + 8 * (i % 2) for i in range(16)]


def test_unsupported_architecture_names_the_supported():
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel.*supported: Gemma"):
        architecture({"architectures": ["GPT2LMHeadModel"]})
    assert (
        architecture({"architectures": ["MistralForCausalLM"]}) is ARCHITECTURES["LlamaForCausalLM"]
    )
