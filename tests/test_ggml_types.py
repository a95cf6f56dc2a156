"""loramerge.quant.ggml_types (which ggml type each tensor gets) against llama.cpp itself.

(a) llama.cpp's own snapshots of llama-quantize's choices (tests/snapshots/*.schema in the
    llama-cpp-python sdist, written by its test-quant-type-selection from real GGUF headers:
    Llama-3.1-70B, Qwen3-0.6B/14B, Gemma-3-4B), for every file type loramerge can write.
(b) llama.cpp's selection code itself (src/llama-quant.cpp, compiled into a small program by
    tests/ggml_ref.py) on the fixture model's tensors and on shapes that exercise the fallbacks
    (rows a block does not divide), tied embeddings, biases and the 70B rule, plain and --pure.
"""

from __future__ import annotations

import json
import re

import ggml_ref
import gguf
import pytest
from conftest import LLAMA
from safetensors import safe_open

from loramerge.quant.ggml_types import (
    DEFAULT_TYPE,
    GGUF_TYPES,
    ModelInfo,
    allows_quantization,
    converter_type,
    tensor_types,
)

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
FTYPES = sorted(DEFAULT_TYPE, key=int)


def _ftype(name: str) -> F | None:
    """A snapshot section name (Q4_K_M, F32, ...) as a file type loramerge writes, else None."""
    ftype = F.ALL_F32 if name == "F32" else F.__members__.get(f"MOSTLY_{name}")
    return ftype if ftype in DEFAULT_TYPE else None


def llama_family(
    n_layer: int,
    n_embd: int,
    n_ff: int,
    n_vocab: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    tied: bool,
    biases: bool = False,
    norms: tuple[str, ...] = (),
) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names and numpy shapes of a llama-style decoder."""
    q, kv = n_head * head_dim, n_head_kv * head_dim
    tensors = [("token_embd.weight", (n_vocab, n_embd)), ("output_norm.weight", (n_embd,))]
    if not tied:
        tensors.append(("output.weight", (n_vocab, n_embd)))
    for i in range(n_layer):
        b = f"blk.{i}."
        tensors += [
            (b + "attn_norm.weight", (n_embd,)),
            (b + "attn_q.weight", (q, n_embd)),
            (b + "attn_k.weight", (kv, n_embd)),
            (b + "attn_v.weight", (kv, n_embd)),
            (b + "attn_output.weight", (n_embd, q)),
            (b + "ffn_norm.weight", (n_embd,)),
            (b + "ffn_gate.weight", (n_ff, n_embd)),
            (b + "ffn_up.weight", (n_ff, n_embd)),
            (b + "ffn_down.weight", (n_embd, n_ff)),
        ]
        tensors += [(f"{b}{n}.weight", (head_dim,)) for n in norms]
        if biases:
            tensors += [(f"{b}attn_{p}.bias", (n,)) for p, n in (("q", q), ("k", kv), ("v", kv))]
    return tensors


# The snapshot models' GGUF files: architecture, head size, no output.weight, per-layer norms.
# (ggml-org's Qwen3-0.6B GGUF stores output.weight although the model ties it.)
SNAPSHOTS = {
    "meta-llama-3.1-70b-instruct": ("llama", 128, False, ()),
    "qwen3-0.6b": ("qwen3", 128, False, ("attn_q_norm", "attn_k_norm")),
    "qwen3-14b": ("qwen3", 128, False, ("attn_q_norm", "attn_k_norm")),
    "gemma-3-4b-it": (
        "gemma3",
        256,
        True,
        ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"),
    ),
}


@pytest.fixture(scope="session")
def llama_cpp_sources():
    """The llama.cpp tree of the llama-cpp-python sdist (the parts the tests read)."""
    return ggml_ref.require(ggml_ref.sources)


def _read_snapshot(path) -> tuple[dict, list[tuple[str, str, dict[str, str]]]]:
    """Header hyperparameters and [(file type, default type, {tensor: type})] of a .schema file."""
    text = path.read_text()
    header = dict(re.findall(r"(\w+)=(\d+)", text.splitlines()[1]))
    sections = []
    for line in text.splitlines():
        if line.startswith("["):
            name, default = re.match(r"\[(\w+)\] (\w+)", line).groups()
            sections.append((name, default, {}))
        elif line and not line.startswith("#"):
            tensor, qtype = line.rsplit(" ", 1)
            sections[-1][2][tensor] = qtype
    return {k: int(v) for k, v in header.items()}, sections


@pytest.mark.parametrize("model", SNAPSHOTS)
def test_types_equal_llama_cpp_snapshots(model, llama_cpp_sources):
    """Every type llama.cpp's own snapshot records, for every file type loramerge writes."""
    arch, head_dim, tied, norms = SNAPSHOTS[model]
    hp, sections = _read_snapshot(llama_cpp_sources / "tests" / "snapshots" / f"{model}.schema")
    tensors = llama_family(
        hp["n_layer"], hp["n_embd"], hp["n_ff"], hp["n_vocab"], hp["n_head"], hp["n_head_kv"],
        head_dim, tied, norms=norms,
    )  # fmt: skip
    info = ModelInfo(arch, hp["n_layer"], hp["n_head"], hp["n_head_kv"])
    checked = 0
    for name, default, overrides in sections:
        ftype = _ftype(name)
        if ftype is None:
            continue
        ours = tensor_types(tensors, ftype, info)
        quantizable = [n for n, s in tensors if allows_quantization(n, s)]
        assert set(overrides) <= set(quantizable), name
        expected = {n: T[overrides.get(n, default).upper()] for n in quantizable}
        assert {n: ours[n] for n in quantizable} == expected, name
        checked += 1
    assert checked == len(DEFAULT_TYPE)
    print(f"{model}: {checked} file types x {len(quantizable)} tensors equal llama.cpp's snapshot")


def _fixture_tensors() -> tuple[ModelInfo, list[tuple[str, tuple[int, ...]]]]:
    """The llama fixture's tensors under their GGUF names (gguf's TensorNameMap), with its model."""
    config = json.loads((LLAMA / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tensors = []
    for path in sorted(LLAMA.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            for key in sorted(f.keys()):
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                tensors.append((name, tuple(f.get_slice(key).get_shape())))
    heads = (config["num_attention_heads"], config["num_key_value_heads"])
    return ModelInfo("llama", config["num_hidden_layers"], *heads), tensors


CASES = {
    "llama fixture": _fixture_tensors(),
    "tinyllama 22 layers": (
        ModelInfo("llama", 22, 32, 4),
        llama_family(22, 2048, 5632, 32000, 32, 4, 64, tied=False),
    ),
    "llama 70B (80 layers, GQA)": (
        ModelInfo("llama", 80, 64, 8),
        llama_family(80, 512, 1024, 1000, 64, 8, 8, tied=False),
    ),
    "qwen2 tied, biases": (
        ModelInfo("qwen2", 24, 14, 2),
        llama_family(24, 896, 4864, 1536, 14, 2, 64, tied=True, biases=True),
    ),
    "gemma, rows of 96 and 200": (
        ModelInfo("gemma", 9, 4, 1),
        llama_family(9, 96, 200, 384, 4, 1, 24, tied=True),
    ),
}


@pytest.fixture(scope="session")
def chooser():
    """llama-quant.cpp's type selection as a small program (built once, cached under .venv)."""
    return ggml_ref.require(ggml_ref.build_type_chooser)


@pytest.mark.parametrize("case", CASES)
def test_types_equal_llama_cpp_code(case, chooser):
    """Against llama-quant.cpp's selection code, every file type, mixtures and --pure."""
    info, tensors = CASES[case]
    for ftype in FTYPES:
        for pure in (False, True):
            theirs = ggml_ref.choose_types(chooser, info, ftype, pure, tensors)
            ours = tensor_types(tensors, ftype, info, pure=pure)
            for name, shape in tensors:
                want = theirs[name]
                if want is None:  # llama-quantize keeps it: the converter's type (F32 here)
                    assert not allows_quantization(name, shape)
                    want = converter_type(name, shape, T.F16)
                assert ours[name] == want, (ftype.name, pure, name, shape)
    print(f"{case}: {len(tensors)} tensors x {len(FTYPES)} file types x (mixture, pure) agree")


def test_gguf_type_names():
    """Each --gguf-type of the command contract names a file type whose blocks loramerge writes."""
    from loramerge.quant import ggml
    from loramerge.sink.formats import GGUF_TYPE_NAMES

    contract = "f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k q4_k_m q5_k_m"
    assert sorted(GGUF_TYPES) == sorted(contract.split())
    assert tuple(GGUF_TYPES) == GGUF_TYPE_NAMES  # what the command line offers, in its order
    for name, (ftype, _) in GGUF_TYPES.items():
        assert DEFAULT_TYPE[ftype].name.lower() == name.removesuffix("_m"), name
        assert DEFAULT_TYPE[ftype] in ggml.SUPPORTED
