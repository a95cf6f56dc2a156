"""A GGUF file as a base: merge (and rebase) into it, inspect it, verify against it.

What each test compares against:
- tensors and metadata of base and output: gguf-py's own `GGUFReader` (not loramerge's parser),
  names mapped with gguf's `TensorNameMap`;
- merged values: the float64 truth dequant(W0) + scale * B @ A, W0 dequantized by gguf-py
  (`gguf.quants.dequantize`), the factors read from the adapter file; `verify` holds each merged
  tensor to its format's bound of it, and llama.cpp's reference quantizer (ggml-quants.c through
  tests/ggml_ref.py, or gguf-py's for the types it has) applied to the float64 truth rounded to
  float32 gives the blocks loramerge's should equal: the share that do is printed and must be
  at least 99% (float32 merge vs float64 truth moves a rare element across a rounding point);
- bases written by loramerge's export and by llama.cpp's convert_hf_to_gguf.py (the sdist's);
- loading: llama.cpp (llama-cpp-python), its logits on the merged F32 GGUF against
  transformers' forward pass of PEFT's merge_and_unload.
"""

from __future__ import annotations

import json
from pathlib import Path

import ggml_ref
import gguf
import numpy as np
import pytest
from conftest import ADAPTERS, LLAMA
from safetensors.numpy import load_file
from test_gguf_export import TOKENS, _llama_cpp, _llama_cpp_logits, _tiny

from loramerge.gguf_names import permute_qk

T = gguf.GGMLQuantizationType
GGUF_PY = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, Path]:
    """A random Llama whose rows are whole K-quant blocks, and a random r=8 LoRA on every
    projection (PEFT's own adapter files, B not zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gguf-base")
    model_dir = _tiny("llama", root / "wide", hidden_size=256, intermediate_size=512, head_dim=64)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, init_lora_weights=False)
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    peft.save_pretrained(root / "adapter")
    return model_dir, root / "adapter"


@pytest.fixture(scope="module")
def bases(wide, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """GGUF bases of the wide model: loramerge's export (q8_0, q4_k_m, bf16, f32) and
    llama.cpp's convert_hf_to_gguf.py (q8_0, bf16)."""
    from click.testing import CliRunner

    from loramerge.cli import cli

    model_dir, _ = wide
    out = tmp_path_factory.mktemp("bases")
    found = {}
    for t in ("q8_0", "q4_k_m", "bf16", "f32"):
        path = out / f"loramerge-{t}.gguf"
        args = ["quantize", str(model_dir), "-o", str(path), "--to", "gguf", "--gguf-type", t]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        found[("loramerge", t)] = path
    try:
        converted = ggml_ref.convert({"wide": model_dir}, out, ["q8_0", "bf16"])
    except ggml_ref.Unavailable as exc:  # no network for the sdist
        print(f"llama.cpp's converter unavailable: {exc}")
        converted = {}
    for (_, t), path in converted.items():
        found[("llama.cpp", t)] = path
    return found


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _bytes(tensor: gguf.ReaderTensor) -> np.ndarray:
    return np.asarray(tensor.data).view(np.uint8).reshape(-1)


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def _deltas(adapter: Path, config: dict) -> dict[str, np.ndarray]:
    """GGUF name -> float64 scale * B @ A in the GGUF layout (the adapter's factors as stored)."""
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    deltas = {}
    for key, a in factors.items():
        if ".lora_A." not in key:
            continue
        b = factors[key.replace(".lora_A.", ".lora_B.")]
        hf = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = scale * b.astype(np.float64) @ a.astype(np.float64)
        heads = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}
        for proj, key_name in heads.items():
            if f".{proj}." in hf:  # convert_hf_to_gguf.py's permute (test_gguf_names checks it)
                delta = permute_qk(delta, config[key_name])
        deltas[names.get_name(hf, try_suffixes=(".weight",))] = delta
    return deltas


def _reference_blocks(values: np.ndarray, qtype: T) -> np.ndarray:
    """The blocks llama.cpp's quantizer writes for these float32 values."""
    if qtype in GGUF_PY:
        return gguf.quants.quantize(values, qtype).view(np.uint8).reshape(-1)
    reference = ggml_ref.Reference(ggml_ref.require(ggml_ref.build))
    return reference.quantize(values, qtype).reshape(-1)


CASES = [
    ("loramerge", "q8_0"),
    ("loramerge", "q4_k_m"),
    ("loramerge", "bf16"),
    ("llama.cpp", "q8_0"),
    ("llama.cpp", "bf16"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_merge_into_gguf_base(cli, tmp_path, wide, bases, case):
    """Untouched tensors byte-identical, touched ones keep their type, metadata kept; merged
    blocks equal llama.cpp's quantization of the float64 truth; verify passes."""
    if case not in bases:
        pytest.skip(f"no {case[0]} base (llama.cpp's converter unavailable)")
    model_dir, adapter = wide
    config = json.loads((model_dir / "config.json").read_text())
    base = bases[case]
    out = tmp_path / "merged.gguf"
    result = cli("merge", base, adapter, "-o", out, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    before, after = _tensors(base), _tensors(out)
    assert list(after) == list(before)
    deltas = _deltas(adapter, config)
    assert len(deltas) == 14 and set(deltas) <= set(before)
    same = total = 0
    for name, tensor in before.items():
        merged = after[name]
        assert merged.tensor_type == tensor.tensor_type, name
        assert list(merged.shape) == list(tensor.shape), name
        if name not in deltas:
            assert np.array_equal(_bytes(merged), _bytes(tensor)), name
            continue
        w0 = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        truth = w0.astype(np.float64).reshape(deltas[name].shape) + deltas[name]
        want = _reference_blocks(truth.astype(np.float32), tensor.tensor_type)
        size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
        blocks = (_bytes(merged).reshape(-1, size) == want.reshape(-1, size)).all(axis=1)
        same, total = same + int(blocks.sum()), total + blocks.size
    kinds = sorted({t.tensor_type.name for n, t in before.items() if n in deltas})
    share = f"{case}: {same}/{total} merged blocks equal llama.cpp's of the truth ({kinds})"
    assert same >= 0.99 * total, share
    fields_before, fields_after = _fields(base), _fields(out)
    record = json.loads(fields_after.pop("loramerge.provenance"))
    had_record = fields_before.pop("loramerge.provenance", None) is not None
    assert fields_after.pop("GGUF.kv_count") == fields_before.pop("GGUF.kv_count") + (
        not had_record
    )
    assert fields_after == fields_before
    assert record["history"][-1]["op"] == "merge"
    assert record["base"]["format"] == "gguf"
    assert summary["tensors_modified"] == 14
    check = cli("verify", out, "--base", base, "--adapter", adapter, "--json")
    assert check.code == 0, check.out or check.err
    report = json.loads(check.out)
    merged = [t for t in report["tensors"] if t["kind"] == "merged"]
    untouched = [t for t in report["tensors"] if t["kind"] == "untouched"]
    assert len(merged) == 14 and all(0 < t["bound_ratio"] <= 1 for t in merged)
    assert untouched and all(t["exact_share"] == 1.0 for t in untouched)
    print(f"\n{share}\n{report['verdict']}")  # after the last cli call, which reads capfd


def test_verify_catches_a_wrong_merge(cli, tmp_path, wide, bases):
    """The same Q4_K_M merge checked as if the adapter's weight were 1.1: verify fails (exit 1)."""
    _, adapter = wide
    base = bases[("loramerge", "q4_k_m")]
    out = tmp_path / "merged.gguf"
    assert cli("merge", base, adapter, "-o", out).code == 0
    result = cli("verify", out, "--base", base, "--adapter", adapter, "-w", "1.1", "--json")
    assert result.code == 1
    report = json.loads(result.out)
    failed = {t["dtype"] for t in report["tensors"] if not t["passed"]}
    assert {"Q4_K", "Q6_K"} <= failed, failed


def test_verify_holds_bf16_to_half_an_ulp(cli, tmp_path, wide, bases):
    """A BF16 merge with one merged element moved a single ulp away from the truth fails verify:
    the bound is half a bfloat16 ulp plus the float32 merge's error, with no 16-bit slack (the
    merge rounds to the file's type once)."""
    import shutil

    model_dir, adapter = wide
    config = json.loads((model_dir / "config.json").read_text())
    base = bases[("loramerge", "bf16")]
    out = tmp_path / "merged.gguf"
    assert cli("merge", base, adapter, "-o", out).code == 0
    name = "blk.0.ffn_down.weight"
    tensor = _tensors(out)[name]
    assert tensor.tensor_type == T.BF16
    w0 = _tensors(base)[name]
    truth = (
        gguf.quants.dequantize(np.asarray(w0.data), T.BF16).astype(np.float64)
        + _deltas(adapter, config)[name].reshape(tuple(reversed(w0.shape.tolist())))
    ).reshape(-1)
    bits = _bytes(tensor).view(np.uint16).copy()
    got = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    i = int(np.argmax(np.abs(truth)))
    # one step away from the truth: the magnitude grows when the stored value is at or above it
    away = (got[i] >= truth[i]) == (got[i] >= 0)
    bits[i] += 1 if away else -1
    broken = tmp_path / "broken.gguf"
    shutil.copyfile(out, broken)
    with open(broken, "r+b") as fh:
        fh.seek(int(tensor.data_offset) + 2 * i)
        fh.write(bits[i : i + 1].tobytes())
    assert cli("verify", out, "--base", base, "--adapter", adapter).code == 0
    result = cli("verify", broken, "--base", base, "--adapter", adapter, "--json")
    assert result.code == 1, result.out
    failed = [t["name"] for t in json.loads(result.out)["tensors"] if not t["passed"]]
    assert failed == ["model.layers.0.mlp.down_proj.weight"]


def test_gguf_type_changes_the_output_type(cli, tmp_path, wide, bases):
    """--gguf-type q4_k_m on a BF16 base: llama.cpp's choice per tensor (ggml_types, checked
    against llama-quantize in test_ggml_types.py), each within its bound (verify)."""
    from loramerge.quant.ggml_types import GGUF_TYPES, ModelInfo, tensor_types

    _, adapter = wide
    base = bases[("loramerge", "bf16")]
    out = tmp_path / "q4km.gguf"
    assert cli("merge", base, adapter, "-o", out, "--gguf-type", "q4_k_m").code == 0
    before, after = _tensors(base), _tensors(out)
    shapes = [(n, tuple(int(d) for d in reversed(t.shape))) for n, t in before.items()]
    ftype, pure = GGUF_TYPES["q4_k_m"]
    expected = tensor_types(shapes, ftype, ModelInfo("llama", 2, 4, 2), pure)
    assert {n: t.tensor_type for n, t in after.items()} == expected
    fields = _fields(out)
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    check = cli("verify", out, "--base", base, "--adapter", adapter, "--json")
    assert check.code == 0, check.out


def test_retyped_merge_is_quantized_from_float32(cli, tmp_path, wide, bases):
    """--gguf-type q8_0 on a BF16 base: the merged tensors are quantized from the float32 merge
    (llama.cpp's Q8_0 of the float64 truth in float32), not from a bfloat16 rounding of it; the
    untouched ones are the Q8_0 of their bfloat16 values."""
    model_dir, adapter = wide
    config = json.loads((model_dir / "config.json").read_text())
    base = bases[("loramerge", "bf16")]
    out = tmp_path / "q8.gguf"
    assert cli("merge", base, adapter, "-o", out, "--gguf-type", "q8_0").code == 0
    before, after = _tensors(base), _tensors(out)
    deltas = _deltas(adapter, config)
    same = total = 0
    for name, merged in after.items():
        if merged.tensor_type != T.Q8_0:
            continue
        w0 = gguf.quants.dequantize(np.asarray(before[name].data), before[name].tensor_type)
        values = w0.astype(np.float64)
        if name in deltas:
            values += deltas[name].reshape(w0.shape)
        want = _reference_blocks(values.astype(np.float32), T.Q8_0).reshape(-1, 34)
        blocks = (_bytes(merged).reshape(-1, 34) == want).all(axis=1)
        if name not in deltas:
            assert blocks.all(), name
            continue
        same, total = same + int(blocks.sum()), total + blocks.size
    assert total and same >= 0.99 * total, f"{same}/{total} merged Q8_0 blocks as llama.cpp's"


def test_bf16_tensors_read_as_their_bits(bases):
    """A BF16 GGUF base reads as bfloat16: the stored bits, q/k rows back in Hugging Face order
    (gguf's own reader and convert_hf_to_gguf.py's permutation as the oracle)."""
    import ml_dtypes

    from loramerge.source.gguf_file import GGUFWeights

    base = bases[("loramerge", "bf16")]
    stored = _tensors(base)
    weights = GGUFWeights(base)
    try:
        native = {n for n, t in weights.tensors.items() if t.dtype == "BF16"}
        assert native == {
            hf for hf, g in weights.gguf_names.items() if stored[g].tensor_type == T.BF16
        }
        for hf in native:
            values = weights.read(hf)
            assert values.dtype == ml_dtypes.bfloat16, hf
            bits = _bytes(stored[weights.gguf_names[hf]]).view(np.uint16).reshape(values.shape)
            heads = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}
            proj = next((p for p in heads if f".{p}." in hf), None)
            got = values.view(np.uint16)
            if proj:
                got = permute_qk(got, weights.config[heads[proj]])
            assert np.array_equal(got, bits), hf
    finally:
        weights.close()


@pytest.mark.parametrize("kind", ["q8_0", "bf16"])
def test_rebase_through_the_record(cli, tmp_path, wide, bases, kind):
    """rebase --base BASE.gguf: the record says what is inside; the rebuilt file's tensors are
    byte for byte those of merging the new adapter straight into the base (a BF16 base read as
    bfloat16 as much as a quantized one)."""
    model_dir, adapter = wide
    base = bases[("loramerge", kind)]
    merged, direct, rebased = (tmp_path / f"{n}.gguf" for n in ("merged", "direct", "rebased"))
    half = ("-w", "0.5")
    assert cli("merge", base, adapter, "-o", merged).code == 0
    assert cli("merge", base, adapter, *half, "-o", direct).code == 0
    args = ("rebase", merged, "--remove", adapter, "--add", adapter, *half, "--base", base)
    result = cli(*args, "-o", rebased, "--json")
    assert result.code == 0, result.err
    want, got = _tensors(direct), _tensors(rebased)
    assert all(np.array_equal(_bytes(got[n]), _bytes(t)) for n, t in want.items())
    record = json.loads(_fields(rebased)["loramerge.provenance"])
    assert [a["weight"] for a in record["adapters"]] == [0.5]
    unmerged = tmp_path / "unmerged.gguf"
    result = cli("unmerge", merged, adapter, "-o", unmerged, "--json")
    assert result.code == 0, result.err
    drift = json.loads(result.out)["drift"]
    assert drift["measured"] and drift["max_bound_ratio"] > 0
    if kind == "bf16":  # stored twice: two roundings of at most half an ulp at the largest
        # magnitude it passed through, against half an ulp, plus float32 arithmetic (2^-16 ulp)
        assert drift["max_bound_ratio"] <= 2 + 2**-10
    print(
        f"\nunmerge by subtraction (stored twice): worst error {drift['max_bound_ratio']:.6g}x "
        f"one {kind} rounding's bound of the base"
    )


def test_llama_cpp_loads_the_merged_files(cli, tmp_path, monkeypatch, wide, bases):
    """llama.cpp loads each merged GGUF. On the F32 base its logits equal, within 1e-4 of the
    largest logit, llama.cpp's own on PEFT's merge_and_unload of the same model (exported as
    F32: the weights differ by float32 rounding only); every type reports top-1 agreement and
    the worst logit error against transformers' forward pass of PEFT's merge."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _llama_cpp()
    model_dir, adapter = wide
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        want = merged(torch.tensor([TOKENS])).logits[0].numpy().astype(np.float64)
    peft_dir = tmp_path / "peft-merged"
    merged.save_pretrained(peft_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model_dir / name, peft_dir / name)
    peft_gguf = tmp_path / "peft-merged.gguf"
    args = ("quantize", peft_dir, "-o", peft_gguf, "--to", "gguf", "--gguf-type", "f32")
    assert cli(*args).code == 0
    peft_logits = _llama_cpp_logits(peft_gguf, monkeypatch)
    scale = np.abs(want).max()
    for t in ("f32", "q8_0", "q4_k_m", "bf16"):
        out = tmp_path / f"{t}.gguf"
        assert cli("merge", bases[("loramerge", t)], adapter, "-o", out).code == 0
        got = _llama_cpp_logits(out, monkeypatch)
        error = np.abs(got - want).max()
        agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        print(f"\n{t}: top-1 agreement {agree:.3f}, max |logit error| {error:.3g} of {scale:.3g}")
        assert np.isfinite(got).all()
        if t == "f32":
            same_runtime = np.abs(got - peft_logits).max()
            print(f"f32 vs llama.cpp on PEFT's merge: {same_runtime:.3g}")
            assert same_runtime <= 1e-4 * np.abs(peft_logits).max()


def test_inspect_gguf_model_and_adapter(cli, tmp_path):
    """inspect on a merged GGUF (types per tensor, the record) and on a GGUF LoRA adapter
    written with gguf-py's GGUFWriter (its adapter.* keys)."""
    base = tmp_path / "base.gguf"
    assert cli("quantize", LLAMA, "-o", base, "--to", "gguf", "--gguf-type", "q8_0").code == 0
    out = tmp_path / "merged.gguf"
    assert cli("merge", base, ADAPTERS / "llama-lora", "-o", out).code == 0
    report = json.loads(cli("inspect", out, "--json").out)
    reader = gguf.GGUFReader(out)
    assert report["kind"] == "merged" and report["architecture"] == "llama"
    assert report["tensors"] == len(reader.tensors)
    rows = {r["name"]: r for r in report["tensor_list"]}
    for t in reader.tensors:
        row = rows[t.name]
        assert row["type"] == t.tensor_type.name and row["bytes"] == int(t.n_bytes)
        assert row["shape"] == [int(d) for d in reversed(t.shape)]
    assert report["tensor_types"] == {"F32": 5, "Q8_0": 16}
    assert report["file_type"] == "MOSTLY_Q8_0"
    assert report["general"]["general.name"] == reader.fields["general.name"].contents()
    assert report["provenance"]["adapters"][0]["source"].endswith("llama-lora")
    text = cli("inspect", out)
    assert text.code == 0 and "Q8_0" in text.out and "llama-lora" in text.out

    lora = tmp_path / "lora.gguf"
    writer = gguf.GGUFWriter(lora, "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((8, 64), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((64, 8), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = json.loads(cli("inspect", lora, "--json").out)
    assert report["kind"] == "adapter"
    assert report["adapter"] == {"adapter.type": "lora", "adapter.lora.alpha": 16.0}
    assert report["tensor_types"] == {"F16": 1, "F32": 1}
    assert [r["shape"] for r in report["tensor_list"]] == [[8, 64], [64, 8]]


def test_bad_gguf_base_is_one_clear_error(cli, tmp_path):
    """A truncated GGUF and a GGUF of an architecture loramerge cannot map: exit 2, one line."""
    base = tmp_path / "base.gguf"
    assert cli("quantize", LLAMA, "-o", base, "--to", "gguf", "--gguf-type", "q8_0").code == 0
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(base.read_bytes()[:-100])
    result = cli("merge", cut, ADAPTERS / "llama-lora", "-o", tmp_path / "out.gguf")
    assert result.code == 2 and "ends past the end of the file" in result.err
    assert not (tmp_path / "out.gguf").exists()
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(other, "bert")
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = cli("merge", other, ADAPTERS / "llama-lora", "-o", tmp_path / "out.gguf")
    assert result.code == 2 and "bert" in result.err
    result = cli("merge", base, ADAPTERS / "llama-lora", "-o", tmp_path / "o", "--to", "nf4")
    assert result.code == 2 and "GGUF base" in result.err


@pytest.mark.parametrize("kind", ["q8_0", "f32"])
def test_gguf_base_read_in_small_parts(cli, tmp_path, monkeypatch, wide, bases, kind):
    """A GGUF base read a few rows at a time (only those rows dequantized, q/k tensors whole)
    gives the same file as whole-tensor reads: `LORAMERGE_CHUNK_BYTES` forces parts far
    smaller than the tensors, and merge blocks are one row in both runs."""
    from loramerge import blocked

    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 1)
    _, adapter = wide
    outputs = {}
    for chunk in ("", "3000"):
        monkeypatch.setenv("LORAMERGE_CHUNK_BYTES", chunk)
        out = tmp_path / f"merged-{chunk or 'whole'}.gguf"
        result = cli("merge", bases[("loramerge", kind)], adapter, "-o", out)
        assert result.code == 0, result.err
        outputs[chunk] = {n: _bytes(t).tobytes() for n, t in _tensors(out).items()}
    assert outputs["3000"] == outputs[""]


def test_requantizing_a_quantized_gguf_base_warns(cli, tmp_path):
    """Q8_0 blocks quantized again to Q4_0 carry both errors (llama.cpp's quantize wants
    --allow-requantize for it): a warning; float tensors quantized once: none."""
    made = {}
    for gguf_type in ("q8_0", "f32"):
        made[gguf_type] = tmp_path / f"{gguf_type}.gguf"
        args = ("quantize", LLAMA, "-o", made[gguf_type], "--to", "gguf", "--gguf-type")
        assert cli(*args, gguf_type, "-q").code == 0
    again = cli("quantize", made["q8_0"], "-o", tmp_path / "q4.gguf", "--to", "gguf",
                "--gguf-type", "q4_0")  # fmt: skip
    assert again.code == 0 and "quantized again to q4_0" in again.err, again.err
    once = cli("quantize", made["f32"], "-o", tmp_path / "q8.gguf", "--to", "gguf",
               "--gguf-type", "q8_0")  # fmt: skip
    assert once.code == 0 and "quantized again" not in once.err


def test_a_gguf_base_config_names_its_model_type():
    """The config read from a GGUF base says model_type = the GGUF architecture; for each one
    read back, that is the type of the class it is read as (transformers' own table)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from loramerge.gguf_names import ARCHITECTURES, hf_architecture

    for name in {a.name for a in ARCHITECTURES.values()}:
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name] == hf_architecture(name)[0]


def test_an_adapter_for_another_model_into_a_gguf_base_names_only_the_mismatch(cli, tmp_path):
    base = tmp_path / "q8.gguf"
    assert cli("quantize", LLAMA, "-o", base, "--to", "gguf", "--gguf-type", "q8_0", "-q").code == 0
    result = cli("merge", base, ADAPTERS / "gpt2-lora", "-o", tmp_path / "out.gguf")
    assert result.code == 2 and "matches no tensor of the base" in result.err
    assert "does not know" not in result.err, result.err
