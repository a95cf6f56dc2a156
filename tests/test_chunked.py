"""Tensors streamed in row parts: every route gives the same bytes at any part size.

`LORAMERGE_CHUNK_BYTES` forces parts far smaller than the fixtures' tensors (one row, or one
NF4 block / GGUF row at a time, and a size that divides nothing), so each merge crosses part
boundaries inside every tensor: the numpy and torch loops, DoRA (norms per output row),
embeddings and Conv1D (rows of dW from A's columns), replaced rows, whole replacements, the
DoRA undo, the NF4 sink (codes per part, scales at the end; a Conv1D weight whole, since it is
quantized transposed) and the GGUF sink (whole rows).
Merge blocks are one row here (`blocked.BLOCK_ELEMENTS` = 1) in every run, whole or in parts: a
part is a whole number of blocks, so each BLAS call is the same whatever the part size, and the
outputs must equal the whole-tensor merge byte for byte; the safetensors ones also stay within
the float64 reference's bound.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import ADAPTERS, GPT2, LLAMA
from reference import float32_bound, float64_bound, load_base, reference_merge, ulp_error

from loramerge import blocked
from loramerge.merge import MergeOptions, merge
from loramerge.sink import safetensors_writer
from loramerge.sink.nf4_folder import NF4Options
from loramerge.swap import unmerge

CASES = {
    "numpy": (LLAMA, ["llama-lora"], {}),
    "two-adapters": (LLAMA, ["llama-lora", "llama-lora-b"], {"weights": (1.0, -0.5)}),
    "embedding": (LLAMA, ["llama-embed"], {}),
    "conv1d-fan-in-fan-out": (GPT2, ["gpt2-lora"], {}),
    "gpt2-embedding": (GPT2, ["gpt2-embed"], {}),
    "torch-float64": (LLAMA, ["llama-lora"], {"compute_dtype": "float64"}),
    "float32-output": (LLAMA, ["llama-lora"], {"dtype": "float32"}),
    "dora": (LLAMA, ["llama-dora"], {}),
    "dora-plus-lora": (LLAMA, ["llama-dora", "llama-lora-b"], {"weights": (1.0, 0.75)}),
    "replaced-rows": (LLAMA, ["llama-tokens"], {}),
    "resized": (LLAMA, ["llama-resized"], {}),
    "nf4": (LLAMA, ["llama-lora"], {"to": "nf4", "quant": NF4Options(blocksize=64)}),
    "nf4-conv1d": (GPT2, ["gpt2-lora"], {"to": "nf4", "quant": NF4Options(blocksize=64)}),
    "gguf-q8_0": (LLAMA, ["llama-lora"], {"to": "gguf", "gguf_type": "q8_0"}),
    "gguf-q4_k_m": (LLAMA, ["llama-embed"], {"to": "gguf", "gguf_type": "q4_k_m"}),
}
# One row (or one block) per part, and a size that is no multiple of any row.
SMALL_CHUNKS = ("1", "3000")


def _merge(out: Path, case: str) -> Path:
    base, adapters, options = CASES[case]
    merge(base, [ADAPTERS / a for a in adapters], out, MergeOptions(**options))
    return out


def _weights(out: Path) -> dict[str, bytes]:
    """Every tensor file's bytes (the record holds timings, so it is left out); a GGUF file's
    tensors by name."""
    if out.is_file():
        return {
            t.name: bytes(np.asarray(t.data).view(np.uint8)) for t in gguf.GGUFReader(out).tensors
        }
    files = sorted(out.rglob("*.safetensors")) + sorted(out.rglob("*.index.json"))
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


@pytest.fixture(autouse=True)
def row_blocks(monkeypatch):
    """Merge blocks of one row, in every run of this module."""
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 1)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Each case merged with the default part size (whole tensors on these fixtures)."""
    root = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blocked, "BLOCK_ELEMENTS", 1)
        patch.delenv("LORAMERGE_CHUNK_BYTES", raising=False)
        return {case: _weights(_merge(root / _name(case), case)) for case in CASES}


def _name(case: str) -> str:
    return case + (".gguf" if CASES[case][2].get("to") == "gguf" else "")


@pytest.mark.parametrize("chunk", SMALL_CHUNKS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_small_parts_give_the_same_bytes(tmp_path, monkeypatch, whole, case, chunk):
    monkeypatch.setenv("LORAMERGE_CHUNK_BYTES", chunk)
    if chunk == "1":  # nothing held ahead of a gap: every later part waits for the hash
        monkeypatch.setattr(safetensors_writer, "_HOLD_BYTES", 0)
    out = _merge(tmp_path / _name(case), case)
    parts = _weights(out)
    assert parts.keys() == whole[case].keys()
    for name, data in parts.items():
        assert data == whole[case][name], f"{case}: {name} differs from the whole-tensor merge"
    base, adapters, options = CASES[case]
    if options.get("to") or chunk != "1":
        return
    ours = load_base(out)
    weights = list(options.get("weights", [1.0] * len(adapters)))
    expected = reference_merge(base, [ADAPTERS / a for a in adapters], weights)
    float64 = options.get("compute_dtype") == "float64"
    for name, exp in expected.items():
        tensor = ours[name]
        bound = (float64_bound if float64 else float32_bound)(exp, tensor.dtype)
        assert not (ulp_error(tensor, exp.value) > bound).any(), f"{case}: {name}"


@pytest.mark.parametrize("case", ["dora", "embedding", "replaced-rows"])
def test_unmerge_in_small_parts_gives_the_same_bytes(tmp_path, monkeypatch, case):
    """Taking an adapter out (DoRA inverted with its stored per-row norms) part by part."""
    base, adapters, options = CASES[case]
    merged = _merge(tmp_path / "merged", case)
    outputs = {}
    for chunk in ("", "1"):
        monkeypatch.setenv("LORAMERGE_CHUNK_BYTES", chunk)
        out = tmp_path / f"undone-{chunk or 'whole'}"
        unmerge(merged, [ADAPTERS / a for a in adapters], out, base=base)
        outputs[chunk] = _weights(out)
    assert outputs["1"] == outputs[""]


@pytest.mark.parametrize("case", ["mixtral-fused", "qwen3-moe", "gpt-oss"])
def test_stacked_experts_in_small_parts(tmp_path, monkeypatch, case):
    """Part-ed expert terms (stored 3-D stacks, one expert's rows each) across part boundaries:
    the same bytes as whole tensors, and PEFT's float64 merge within the float32 bound."""
    from test_transformers5_names import _check_weights
    from transformers5_models import build

    base, adapter = build(case, tmp_path, 0)
    outputs = {}
    for chunk in ("", "1", "3000"):
        monkeypatch.setenv("LORAMERGE_CHUNK_BYTES", chunk)
        out = tmp_path / f"out-{chunk or 'whole'}"
        merge(base, [adapter], out, MergeOptions())
        outputs[chunk] = _weights(out)
    assert outputs["1"] == outputs[""] == outputs["3000"]
    print(f"\n{case}: {_check_weights(tmp_path / 'out-1', base, [adapter], [1.0], 'float32')}")


@pytest.mark.parametrize("cols", [1, 48, 64, 100, 2048, 8192])
@pytest.mark.parametrize("granule", [1, 64, 256, 4096])
@pytest.mark.parametrize("chunk", ["1", "3000", str(32 << 20)])
def test_part_rows_fall_on_blocks_and_granules(monkeypatch, cols, granule, chunk):
    """Every part starts at a multiple of the sink's granule and of the merge block, and is no
    bigger than the chunk size unless one such unit is."""
    from loramerge.execute import part_rows

    monkeypatch.setenv("LORAMERGE_CHUNK_BYTES", chunk)
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 1 << 18)
    rows = 100_000
    step = part_rows(rows, cols, 2, granule)
    assert step * cols % granule == 0 or step == rows
    assert step % blocked.block_rows(cols) == 0 or step == rows
    unit = np.lcm(granule // np.gcd(granule, cols), blocked.block_rows(cols))
    assert step * cols * 2 <= max(int(chunk), unit * cols * 2)
