"""GGUF export (`--to gguf`): files read back by gguf.GGUFReader, loaded by llama.cpp.

What each test compares against:
- names and shapes: gguf's own TensorNameMap (not loramerge's table) and the HF checkpoint;
- tensor types: loramerge.quant.ggml_types (tested against llama-quantize's own choices in
  test_ggml_types.py); metadata: config.json and the tokenizer files, read here;
- tensor blocks: gguf-py's quantizers (gguf.quants) for the types it can quantize, llama.cpp's C
  reference quantizers (ggml-quants.c compiled by tests/ggml_ref.py) for the K-quants, applied to
  the HF tensor after the converter's q/k permutation (gguf_names, checked against
  convert_hf_to_gguf.py in test_gguf_names.py) or to the merged tensor loramerge writes as
  safetensors;
- loading: llama.cpp (llama-cpp-python) and its logits against transformers' forward pass.
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
from conftest import ADAPTERS, GPT2, LLAMA
from safetensors import safe_open

from loramerge.gguf_names import ARCHITECTURES, to_gguf_values
from loramerge.quant.ggml_types import ModelInfo, tensor_types
from loramerge.sink.gguf_file import GGUF_TYPES

T = gguf.GGMLQuantizationType
CONFIG = json.loads((LLAMA / "config.json").read_text())
TOKENIZER = json.loads((LLAMA / "tokenizer.json").read_text())
GGUF_PY = {T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}  # gguf.quants quantizes these


def _read_hf(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors folder as float32 numpy (bfloat16 widened exactly)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[key] = f.get_tensor(key).float().numpy()
    return out


def _converter_permute(hf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute of q/k (gguf_names, checked against the
    converter itself in test_gguf_names.py)."""
    return to_gguf_values(ARCHITECTURES["LlamaForCausalLM"], hf_name, w, config)


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _export(cli, tmp_path: Path, gguf_type: str, model: Path = LLAMA, *extra) -> Path:
    out = tmp_path / f"model-{gguf_type}.gguf"
    result = cli("quantize", model, "-o", out, "--to", "gguf", "--gguf-type", gguf_type, *extra)
    assert result.code == 0, result.err
    return out


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A random Llama whose rows are whole 256-element K-quant blocks (the fixture's 64 are not,
    so there every K-quant falls back to a smaller block)."""
    folder = tmp_path_factory.mktemp("wide") / "wide-llama"
    return _tiny("llama", folder, hidden_size=256, intermediate_size=512, head_dim=64)


K_TYPES = [t for t in GGUF_TYPES if "_k" in t]
CASES = [("fixture", t) for t in GGUF_TYPES] + [("wide", t) for t in K_TYPES]


@pytest.mark.parametrize(("which", "gguf_type"), CASES)
def test_llama_export_names_types_blocks(cli, tmp_path, gguf_type, which, request):
    """Every type: names (gguf's TensorNameMap), shapes, the types ggml_types picks, and blocks
    equal to gguf-py's (legacy types) or llama.cpp's C reference (K-quants) for the same tensor."""
    model = LLAMA if which == "fixture" else request.getfixturevalue("wide_llama")
    config = json.loads((model / "config.json").read_text())
    out = _export(cli, tmp_path, gguf_type, model)
    assert not list(tmp_path.glob(".*loramerge*")), "temporary or lock file left behind"
    reader = gguf.GGUFReader(out)
    hf = _read_hf(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    expected_names = {names.get_name(k, try_suffixes=(".weight",)): k for k in hf}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected_names)
    ftype, pure = GGUF_TYPES[gguf_type]
    info = ModelInfo("llama", 2, 4, 2)
    types = tensor_types([(n, hf[k].shape) for n, k in expected_names.items()], ftype, info, pure)
    assert {n: t.tensor_type for n, t in tensors.items()} == types
    if gguf_type == "q4_k_m" and which == "wide":  # a mixture, not one type for everything
        assert {T.Q4_K, T.Q6_K} <= set(types.values())
    reference = None
    for name, tensor in tensors.items():
        hf_name = expected_names[name]
        values = _converter_permute(hf_name, hf[hf_name], config)
        assert tuple(int(d) for d in reversed(tensor.shape)) == values.shape
        qtype = tensor.tensor_type
        stored = np.asarray(tensor.data).view(np.uint8).reshape(-1)
        if qtype == T.F32:
            expected = values.astype(np.float32).view(np.uint8).reshape(-1)
        elif qtype in GGUF_PY:
            expected = gguf.quants.quantize(values, qtype).view(np.uint8).reshape(-1)
        else:
            reference = reference or ggml_ref.Reference(ggml_ref.require(ggml_ref.build))
            expected = reference.quantize(values, qtype).reshape(-1)
        assert np.array_equal(stored, expected), (name, qtype.name)


def test_llama_metadata(cli, tmp_path):
    """general.*, hyperparameters from config.json, the BPE tokenizer and the record."""
    fields = _fields(gguf.GGUFReader(_export(cli, tmp_path, "q8_0")))
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == LLAMA.name
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    expected = {
        "llama.block_count": CONFIG["num_hidden_layers"],
        "llama.context_length": CONFIG["max_position_embeddings"],
        "llama.embedding_length": CONFIG["hidden_size"],
        "llama.feed_forward_length": CONFIG["intermediate_size"],
        "llama.attention.head_count": CONFIG["num_attention_heads"],
        "llama.attention.head_count_kv": CONFIG["num_key_value_heads"],
        "llama.attention.key_length": CONFIG["head_dim"],
        "llama.attention.value_length": CONFIG["head_dim"],
        "llama.rope.freq_base": CONFIG["rope_parameters"]["rope_theta"],
        "llama.rope.dimension_count": CONFIG["head_dim"],
        "llama.vocab_size": CONFIG["vocab_size"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",  # llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2
        "tokenizer.ggml.bos_token_id": CONFIG["bos_token_id"],
        "tokenizer.ggml.eos_token_id": CONFIG["eos_token_id"],
        "tokenizer.ggml.padding_token_id": CONFIG["pad_token_id"],
        "tokenizer.chat_template": (LLAMA / "chat_template.jinja").read_text(),
    }
    assert {k: fields.get(k) for k in expected} == pytest.approx(expected)
    vocab = TOKENIZER["model"]["vocab"]
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in TOKENIZER["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges
    special = {t["id"] for t in TOKENIZER["added_tokens"] if t["special"]}
    types = fields["tokenizer.ggml.token_type"]
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special
    record = json.loads(fields["loramerge.provenance"])
    assert record["format"] == "loramerge.provenance"
    assert record["history"][-1]["op"] == "quantize"
    assert record["output"]["gguf_type"] == "q8_0"


def test_merge_unmerge_rebase_to_gguf(cli, tmp_path):
    """merge/unmerge/rebase --to gguf hold, tensor by tensor, what the same command writes as
    safetensors (bf16 values, stored exactly at --gguf-type f32), in llama.cpp's layout."""
    lora, lora_b = ADAPTERS / "llama-lora", ADAPTERS / "llama-lora-b"
    merged = tmp_path / "merged"
    assert cli("merge", LLAMA, lora, "-o", merged).code == 0
    runs = {
        "merge": (["merge", LLAMA, lora], merged),
        "unmerge": (["unmerge", merged, lora], None),
        "rebase": (["rebase", merged, "--remove", lora, "--add", lora_b], None),
    }
    for op, (args, folder) in runs.items():
        if folder is None:
            folder = tmp_path / f"{op}-folder"
            assert cli(*args, "-o", folder).code == 0
        out = tmp_path / f"{op}.gguf"
        result = cli(*args, "-o", out, "--to", "gguf", "--gguf-type", "f32", "--json")
        assert result.code == 0, result.err
        summary = json.loads(result.out)
        assert summary["files"] == [out.name] and summary["bytes_written"] == out.stat().st_size
        if op == "unmerge":  # measured against the GGUF type's bound
            assert summary["drift"]["measured"] and summary["drift"]["max_bound_ratio"] > 0
        reader = gguf.GGUFReader(out)
        record = json.loads(_fields(reader)["loramerge.provenance"])
        assert record["history"][-1]["op"] == op
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        stored = {t.name: np.asarray(t.data) for t in reader.tensors}
        for hf_name, values in _read_hf(folder).items():
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            expected = _converter_permute(hf_name, values, CONFIG)
            assert np.array_equal(stored[name].reshape(expected.shape), expected), (op, name)


def test_merge_to_gguf_passes_verify(cli, tmp_path):
    """merge --to gguf --verify: verify's float64 check of the written Q8_0 file against the
    base and adapter (each element within Q8_0's stated error bound) passes."""
    out = tmp_path / "merged.gguf"
    lora = ADAPTERS / "llama-lora"
    args = ("merge", LLAMA, lora, "-o", out, "--to", "gguf", "--gguf-type", "q8_0", "--verify")
    result = cli(*args, "--json")
    assert result.code == 0, result.err
    verification = json.loads(result.out)["verification"]
    assert verification["passed"], verification
    assert "Q8_0" in verification["verdict"]


def test_unsupported_architecture_is_one_clear_error(cli, tmp_path):
    out = tmp_path / "gpt2.gguf"
    result = cli("quantize", GPT2, "-o", out, "--to", "gguf", "--gguf-type", "q8_0")
    assert result.code == 2
    assert result.err.startswith("Error: ") and result.err.count("\n") == 1
    assert "supported: " in result.err and "LlamaForCausalLM" in result.err
    assert list(tmp_path.iterdir()) == []


def test_output_is_atomic_and_overwrite_replaces(cli, tmp_path):
    out = _export(cli, tmp_path, "q4_0")
    before = out.read_bytes()
    result = cli("quantize", LLAMA, "-o", out, "--to", "gguf", "--gguf-type", "f16")
    assert result.code == 2 and "--overwrite" in result.err
    assert out.read_bytes() == before
    _export(cli, tmp_path, "f16", LLAMA, "--overwrite")
    out.unlink()
    (tmp_path / "model-f16.gguf").rename(out)
    assert gguf.GGUFReader(out).tensors[0].tensor_type in (T.F16, T.F32)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


SMALL = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)


def _tiny(kind: str, folder: Path, **sizes) -> Path:
    """A random Llama / Qwen2 / Gemma / Gemma 2 checkpoint with the fixture's tokenizer files."""
    import torch
    import transformers

    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    }[kind]
    torch.manual_seed(0)
    tied = kind != "llama"
    if kind == "gemma2":  # as in Gemma 2 2B/9B, what llama.cpp assumes (it reads no such key)
        sizes = {"query_pre_attn_scalar": sizes.get("head_dim", SMALL["head_dim"]), **sizes}
    config = getattr(transformers, config_cls)(**{**SMALL, **sizes}, tie_word_embeddings=tied)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(LLAMA / name, folder / name)
    return folder


@pytest.mark.parametrize("kind", ["qwen2", "gemma", "gemma2"])
def test_other_architectures(cli, tmp_path, kind):
    """Qwen2 and Gemma 1/2: architecture keys, tied embeddings (no output.weight), Gemma's
    norm + 1 (convert_hf_to_gguf.py's GemmaModel), the vocabulary."""
    model = _tiny(kind, tmp_path / kind)
    config = json.loads((model / "config.json").read_text())
    reader = gguf.GGUFReader(_export(cli, tmp_path, "f32", model))
    fields = _fields(reader)
    assert fields["general.architecture"] == kind
    assert fields[f"{kind}.block_count"] == 2
    assert fields[f"{kind}.attention.layer_norm_rms_epsilon"] == pytest.approx(
        config["rms_norm_eps"]
    )
    assert len(fields["tokenizer.ggml.tokens"]) == 384
    if kind == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(
            config["attn_logit_softcapping"]
        )
        assert fields["gemma2.attention.sliding_window"] == config["sliding_window"]
    if kind.startswith("gemma"):
        assert fields["tokenizer.ggml.add_space_prefix"] is False
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    hf = _read_hf(model)
    norm = hf["model.layers.0.input_layernorm.weight"]
    offset = 1.0 if kind.startswith("gemma") else 0.0
    assert np.array_equal(tensors["blk.0.attn_norm.weight"], norm + np.float32(offset))


def test_sentencepiece_tokenizer(cli, tmp_path):
    """A tokenizer.model (SentencePiece, trained here) is written as llama.cpp's "llama" vocabulary:
    pieces, scores and types as sentencepiece itself reports them, padded to vocab_size."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    model = tmp_path / "sp-llama"
    shutil.copytree(LLAMA, model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(300))
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(model / "tokenizer"),
        vocab_size=320,
        byte_fallback=True,
        bos_id=0,
        eos_id=1,
        unk_id=3,
        pad_id=2,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
    fields = _fields(gguf.GGUFReader(_export(cli, tmp_path, "f16", model)))
    assert fields["tokenizer.ggml.model"] == "llama"
    n = sp.get_piece_size()
    assert fields["tokenizer.ggml.tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    assert fields["tokenizer.ggml.scores"][:n] == pytest.approx([sp.get_score(i) for i in range(n)])
    types = fields["tokenizer.ggml.token_type"]
    TT = gguf.TokenType
    assert [i for i in range(n) if types[i] == TT.CONTROL] == [0, 1, 2]
    assert [i for i in range(n) if types[i] == TT.UNKNOWN] == [3]
    assert [i for i in range(n) if types[i] == TT.BYTE] == [i for i in range(n) if sp.is_byte(i)]
    assert len(fields["tokenizer.ggml.tokens"]) == CONFIG["vocab_size"]
    assert set(types[n:]) == {TT.UNUSED}


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # so the head's 8 frequencies span all three cases
}


@pytest.fixture(scope="module")
def llama3_rope(tmp_path_factory) -> Path:
    """The fixture Llama with Llama 3.1's RoPE scaling in its config.json."""
    folder = tmp_path_factory.mktemp("llama3") / "llama3-rope"
    shutil.copytree(LLAMA, folder)
    config = {**CONFIG, "rope_parameters": LLAMA3_ROPE}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_llama3_rope_frequencies(cli, tmp_path, llama3_rope):
    """Llama 3 RoPE scaling becomes the rope_freqs tensor: inv_freq / its llama3-scaled value, as
    transformers' own llama3 RoPE initialisation computes them (float32, ~1 ulp)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reader = gguf.GGUFReader(_export(cli, tmp_path, "q8_0", llama3_rope))
    tensors = {t.name: t for t in reader.tensors}
    stored = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
    assert tensors["rope_freqs.weight"].tensor_type == T.F32
    config = AutoConfig.from_pretrained(llama3_rope)
    scaled = ROPE_INIT_FUNCTIONS["llama3"](config)[0].double().numpy()
    plain = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    expected = plain / scaled
    assert len(set(np.round(expected, 3))) >= 3  # 1, 8 and smoothed factors in between
    np.testing.assert_allclose(stored, expected, rtol=4 * 2.0**-23)


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


TOKENS = [0, 5, 17, 100, 250, 383, 42, 7, 64, 3, 200, 301]


def _transformers_logits(model: Path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([TOKENS])).logits[0].numpy().astype(np.float64)


def _llama_cpp_logits(path: Path, monkeypatch, lora: Path | None = None, **params) -> np.ndarray:
    """llama.cpp's logits for TOKENS (with the GGUF adapter `lora` applied at run time, if given;
    `params` go to llama_cpp.Llama), its weights in plain buffers: the repacking "extra buffer
    types" (AMX on CPUs that report it) die with an illegal instruction on VMs that report AMX but
    do not enable it; they change only the matmul kernels, not what the file holds."""
    lib = _llama_cpp()
    defaults = lib.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(lib.llama_cpp, "llama_model_default_params", plain_buffers)
    extra = {"lora_path": str(lora)} if lora else {}
    llama = lib.Llama(
        model_path=str(path),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=2,
        **extra,
        **params,
    )
    try:
        llama.eval(TOKENS)
        return np.array(llama.scores[: len(TOKENS)], dtype=np.float64)
    finally:
        llama.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama3_rope) -> dict[str, Path]:
    """The fixture Llama, one with Llama 3 RoPE scaling, and tiny Qwen2, Gemma and Gemma 2."""
    folder = tmp_path_factory.mktemp("models")
    tiny = {kind: _tiny(kind, folder / kind) for kind in ("qwen2", "gemma", "gemma2")}
    return {"llama": LLAMA, "llama3-rope": llama3_rope, **tiny}


_LOGITS: dict[Path, np.ndarray] = {}


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "qwen2", "gemma", "gemma2"])
def test_llama_cpp_loads_and_matches_transformers(
    cli, tmp_path, monkeypatch, models, kind, gguf_type
):
    """llama.cpp loads each export; its logits against transformers' forward pass of the same
    checkpoint: F32 within 1e-3 of the largest logit; the other types report top-1 agreement and
    the worst logit error."""
    _llama_cpp()
    got = _llama_cpp_logits(_export(cli, tmp_path, gguf_type, models[kind]), monkeypatch)
    if models[kind] not in _LOGITS:
        _LOGITS[models[kind]] = _transformers_logits(models[kind])
    want = _LOGITS[models[kind]]
    error = np.abs(got - want).max()
    scale = np.abs(want).max()
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    print(
        f"{kind} {gguf_type}: top-1 agreement {agree:.3f}, "
        f"max |logit error| {error:.3g} of max |logit| {scale:.3g}"
    )
    if gguf_type == "f32":
        assert error <= 1e-3 * scale
    else:
        assert np.isfinite(got).all()


def test_f32_export_loads_in_transformers(cli, tmp_path):
    """transformers' own GGUF reader (from_pretrained(..., gguf_file=...)) gets back every tensor
    of the fixture exactly (bfloat16 values stored as F32) and the same sizes."""
    import torch
    from transformers import AutoModelForCausalLM

    out = _export(cli, tmp_path, "f32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(model.config, key) == CONFIG[key], key
    loaded = {k: v.numpy() for k, v in model.state_dict().items()}
    hf = _read_hf(LLAMA)
    assert set(loaded) == set(hf)
    for name, values in hf.items():
        assert np.array_equal(loaded[name], values), name


IMPORTED = """
import sys
from loramerge.cli import cli
try:
    cli(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(sorted(m for m in ("torch", "numba") if m in sys.modules))
"""


@pytest.mark.parametrize(
    "gguf_type, imported",
    [("bf16", []), ("f16", []), ("q8_0", ["numba"]), ("q4_k_m", ["numba"]), ("q2_k", ["numba"])],
)
def test_numba_is_imported_only_for_the_compiled_types(wide_llama, tmp_path, gguf_type, imported):
    """quant/ggml/compiled.py (numba) loads for Q8_0 and the K-quants only; torch for none."""
    out = tmp_path / "out.gguf"
    args = ["quantize", str(wide_llama), "-o", str(out), "--to", "gguf", "--gguf-type", gguf_type]
    result = subprocess.run(
        [sys.executable, "-c", IMPORTED, *args, "--quiet"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(imported)
    assert out.is_file()


def test_a_resized_vocabulary_is_the_vocabulary_the_gguf_file_states(cli, tmp_path):
    """A merge that resizes the vocabulary (modules_to_save on both vocabulary matrices) writes
    the new size into the GGUF metadata, as into config.json: rows, tokens and the key agree."""
    out = tmp_path / "resized.gguf"
    args = ["merge", LLAMA, ADAPTERS / "llama-resized", "-o", out, "--to", "gguf"]
    assert cli(*args, "--gguf-type", "f32", "--dtype", "float32", "-q").code == 0
    reader = gguf.GGUFReader(out)
    rows = {t.name: int(t.shape[-1]) for t in reader.tensors}
    fields = _fields(reader)
    assert CONFIG["vocab_size"] < rows["token_embd.weight"] == rows["output.weight"]
    assert fields["llama.vocab_size"] == rows["token_embd.weight"]
    assert len(fields["tokenizer.ggml.tokens"]) == rows["token_embd.weight"]


def _flip(path: Path, at: int) -> Path:
    """A copy of `path` with one bit of byte `at` flipped (negative: from the end)."""
    copy = path.with_name(f"flipped-{at}-{path.name}")
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    copy.write_bytes(bytes(data))
    return copy


def test_a_gguf_file_holds_its_own_digest_and_verify_and_push_check_it(cli, tmp_path):
    """The record inside a GGUF output holds the file's BLAKE3 (its own 64 characters read as
    zeros): `verify --files` passes the file and fails any flipped bit, in the tensors or in the
    header; `push` refuses a changed file. A model written whole, one merged into a GGUF base,
    and a GGUF adapter (`export-adapter`) alike."""
    made = _export(cli, tmp_path, "q8_0")
    rebuilt = tmp_path / "into-gguf-base.gguf"
    assert cli("merge", made, ADAPTERS / "llama-lora", "-o", rebuilt, "-q").code == 0
    adapter = tmp_path / "adapter.gguf"
    assert cli("export-adapter", ADAPTERS / "llama-lora", "--base", LLAMA, "-o", adapter).code == 0
    for out in (made, rebuilt, adapter):
        record = json.loads(_fields(gguf.GGUFReader(out))["loramerge.provenance"])
        assert record["file_hash"]["algorithm"] == "blake3"
        assert cli("verify", out, "--files").code == 0
        header = out.read_bytes().index(b"general.architecture")  # a key's name, in the header
        for at in (-100, header):
            result = cli("verify", _flip(out, at), "--files")
            assert result.code == 1 and "does not match" in result.out, (out.name, at)
    pushed = cli("push", _flip(made, -100), "alice/model", "--dry-run")
    assert pushed.code == 2 and "not pushed" in pushed.err
    assert cli("push", made, "alice/model", "--dry-run").code == 0
