"""loramerge.quant.ggml against the two judges: the gguf package and llama.cpp's own C code.

(a) `gguf.quants.quantize` / `dequantize` (gguf-py): bit for bit, for every type it implements.
(b) llama.cpp's `quantize_row_*_ref` and `dequantize_row_*` from ggml-quants.c, compiled from the
    llama-cpp-python sdist (tests/ggml_ref.py): bit for bit for every type, K-quants included.
    Each type prints its share of identical blocks; a differing block reports its error next to
    llama.cpp's own.
Inputs: every fixture tensor (bf16 weights, f32 adapters) and random tensors with awkward
distributions (zero, constant and negative-zero blocks, outliers, subnormals, heavy tails).
"""

from __future__ import annotations

from importlib.metadata import version

import ggml_ref
import gguf
import ml_dtypes
import numpy as np
import pytest
from conftest import ADAPTERS, FIXTURES
from safetensors import safe_open

from loramerge.quant import ggml

T = gguf.GGMLQuantizationType
TYPES = sorted(ggml.SUPPORTED - {T.F32}, key=lambda t: t.value)
QUANTIZED = [t for t in TYPES if t not in (T.F16, T.BF16)]
ROW = 1024  # a whole number of blocks for every type
GGUF_VERSION = version("gguf")


@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp's ggml-quants.c through ctypes (built once, cached under .venv)."""
    return ggml_ref.Reference(ggml_ref.require(ggml_ref.build))


def _fixture_values() -> np.ndarray:
    """Every float tensor in the fixture bases and adapters, flattened into rows of ROW."""
    parts = []
    for path in sorted([*FIXTURES.glob("*-base/*.safetensors"), *ADAPTERS.glob("*/*.safetensors")]):
        with safe_open(str(path), "pt") as f:
            parts += [f.get_tensor(k).float().numpy().ravel() for k in sorted(f.keys())]
    flat = np.concatenate(parts)
    return flat[: flat.size // ROW * ROW].reshape(-1, ROW)


def _awkward() -> dict[str, np.ndarray]:
    """Random tensors (rows of ROW) with the distributions that break quantizers."""
    rng = np.random.default_rng(12)
    normal = rng.standard_normal((64, ROW)).astype(np.float32)
    blocks = (0.02 * rng.standard_normal((64, ROW))).astype(np.float32).reshape(-1, 256)
    blocks[0::9] = 0.0
    blocks[1::9] = -0.0
    blocks[2::9] = 0.37
    blocks[3::9] = -1.5
    blocks[4::9, ::7] = 0.0  # sparse zeros inside blocks
    blocks[5::9, 3] = 40.0  # one outlier per block
    blocks[6::9] = np.abs(blocks[6::9])  # all positive (min > 0)
    blocks[7::9, :16] = 0.0  # a whole zero sub-block next to live ones
    blocks[8::9, 100:] = 1e-3 * blocks[8::9, 100:]  # two very different scales in one block
    return {
        # enough blocks that a K-quant summed in another order would differ (reversed: 0.04-3%)
        "weights-like, 2M": (0.02 * rng.standard_normal((512, 4096))).astype(np.float32),
        "normal": normal,
        "weights-like": (0.02 * normal).astype(np.float32),
        "structured blocks": blocks.reshape(-1, ROW),
        "heavy tails": rng.standard_t(1.5, (64, ROW)).astype(np.float32),
        "outliers": np.where(rng.random((64, ROW)) < 0.002, 1e3, normal).astype(np.float32),
        "subnormal": (normal * np.float32(1e-39)).astype(np.float32),
        "tiny": (normal * np.float32(1e-20)).astype(np.float32),
        "huge": (normal * np.float32(1e4)).astype(np.float32),
        "small integers": rng.integers(-8, 8, (64, ROW)).astype(np.float32),
        "uniform positive": rng.random((64, ROW)).astype(np.float32),
    }


CASES = {"fixture tensors": _fixture_values(), **_awkward()}


def _blocks(data: np.ndarray, qtype) -> np.ndarray:
    return data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])


def _gguf_quantize(x: np.ndarray, qtype) -> np.ndarray:
    with np.errstate(all="ignore"):  # gguf-py divides by zero-scaled blocks, then masks
        out = gguf.quants.quantize(x, qtype)
    return np.ascontiguousarray(out).view(np.uint8).reshape(x.shape[0], -1)


def _gguf_implements(qtype) -> bool:
    try:
        _gguf_quantize(np.zeros((1, 256), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


# gguf-py 0.19 quantizes the float and 32-element types; the K-quants are judged by llama.cpp.
GGUF_TYPES = [t for t in TYPES if _gguf_implements(t)]


@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda t: t.name)
def test_bytes_equal_gguf_package(qtype):
    """Against gguf-py's own quantizer, for every type it implements."""
    compared = 0
    for name, x in CASES.items():
        if name == "structured blocks" and qtype in (T.Q4_0, T.Q5_0):
            # gguf-py signs an all-(-0.0) block's scale -0.0; llama.cpp (tested below) writes +0.0.
            x = np.where(x == 0, np.float32(0), x)
        theirs = _gguf_quantize(x, qtype)
        ours = ggml.quantize(x, qtype)
        same = (_blocks(ours, qtype) == _blocks(theirs, qtype)).all(axis=1)
        assert same.all(), f"{qtype.name} on {name}: {same.mean():.4%} of blocks equal gguf's"
        compared += same.size
    print(f"{qtype.name}: {compared} blocks equal gguf-py {GGUF_VERSION}'s quantize")


def _block_error(x: np.ndarray, data: np.ndarray, qtype, llama_cpp) -> np.ndarray:
    """Max |dequantized - x| per block (llama.cpp's dequantizer)."""
    size = gguf.GGML_QUANT_SIZES[qtype][0]
    return np.abs(llama_cpp.dequantize(data, qtype) - x).reshape(-1, size).max(axis=1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_equal_llama_cpp(qtype, llama_cpp):
    """Against llama.cpp's quantize_row_*_ref (and fp32->fp16/bf16 row conversions) from C."""
    report = []
    for name, x in CASES.items():
        ours, theirs = ggml.quantize(x, qtype), llama_cpp.quantize(x, qtype)
        same = (_blocks(ours, qtype) == _blocks(theirs, qtype)).all(axis=1)
        report.append(f"{name}: {same.mean():.2%} of {same.size}")
        if not same.all():
            if qtype in QUANTIZED:
                mine = _block_error(x, ours, qtype, llama_cpp)
                ref = _block_error(x, theirs, qtype, llama_cpp)
                worst = int(np.argmax(np.where(same, -np.inf, mine - ref)))
                report.append(
                    f"  worst differing block {worst}: max error {mine[worst]:.6g}"
                    f" (llama.cpp's {ref[worst]:.6g})"
                )
            pytest.fail(f"{qtype.name} differs from llama.cpp:\n" + "\n".join(report))
    print(f"{qtype.name} identical blocks vs llama.cpp: " + "; ".join(report))


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_dequantize_equals_llama_cpp_and_gguf(qtype, llama_cpp):
    """Round trip: our dequantizer equals llama.cpp's dequantize_row_* and gguf-py's exactly."""
    for name, x in CASES.items():
        data = ggml.quantize(x, qtype)
        ours = ggml.dequantize(data, qtype)
        assert ours.shape == x.shape
        assert np.array_equal(
            ours.view(np.uint32), llama_cpp.dequantize(data, qtype).view(np.uint32)
        ), name
        theirs = gguf.quants.dequantize(data, qtype).reshape(x.shape)
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), name


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_round_trip(qtype):
    """F16/BF16 decode to the nearest representable value: within half a spacing of the input."""
    x = CASES["normal"].astype(np.float64)
    back = ggml.dequantize(ggml.quantize(x, qtype), qtype)
    mantissa, subnormal = (10, 2.0**-24) if qtype == T.F16 else (7, 0.0)
    bound = np.maximum(np.abs(x) * 2.0 ** -(mantissa + 1), subnormal / 2)
    assert np.all(np.abs(back - x) <= bound)


def test_chunks_and_shapes(llama_cpp, monkeypatch):
    """Chunking never changes a byte; any leading shape works; ragged rows are refused."""
    x = CASES["weights-like"][:8].reshape(2, 4, ROW)
    expected = {t: llama_cpp.quantize(x.reshape(-1, ROW), t) for t in QUANTIZED}
    monkeypatch.setattr(ggml, "CHUNK", 512)
    for t, want in expected.items():
        got = ggml.quantize(x, t)
        assert got.shape == (2, 4, ggml.row_bytes(t, ROW))
        assert np.array_equal(got.reshape(want.shape), want), t.name
        pieces = list(ggml.iter_quantize(x.astype(np.float16), t))
        assert len(pieces) > 1
        assert np.array_equal(
            np.concatenate(pieces), llama_cpp.quantize(x.astype(np.float16), t).ravel()
        )
        assert ggml.dequantize(got, t).shape == x.shape
    with pytest.raises(ValueError, match="whole number"):
        ggml.quantize(np.zeros((2, 100), np.float32), T.Q4_K)


def test_bfloat16_input_to_bf16_keeps_its_bits(llama_cpp):
    """BF16 from bfloat16 values (the fast path, no float32 widening) equals llama.cpp's
    ggml_fp32_to_bf16 of the widened values, NaNs (quieted) and infinities included."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**16, (64, ROW), dtype=np.uint16)
    bits[0, :6] = [0x7F80, 0xFF80, 0x7F81, 0xFFC1, 0x0001, 0x8000]  # inf, -inf, sNaN, qNaN, ...
    x = bits.view(ml_dtypes.bfloat16)
    expected = llama_cpp.quantize(x.astype(np.float32), T.BF16)
    assert np.array_equal(ggml.quantize(x, T.BF16), expected.reshape(64, -1))
    assert not np.array_equal(expected.view(np.uint16), bits)  # the NaNs did change


@pytest.mark.parametrize("at", [0, ggml.CHUNK - 1, ggml.CHUNK, 3 * ggml.CHUNK - 1])
def test_bfloat16_lone_nan_in_any_chunk(llama_cpp, at):
    """One signaling NaN among finite bfloat16 values, in the first, a middle or the last chunk
    of a tensor written in one piece: quieted as llama.cpp does, every other bit kept."""
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 0x7F80, 3 * ggml.CHUNK, dtype=np.uint16)
    bits |= rng.integers(0, 2, bits.size, dtype=np.uint16) << 15
    bits[at] = 0xFF81
    x = bits.reshape(-1, ROW).view(ml_dtypes.bfloat16)
    expected = llama_cpp.quantize(x.astype(np.float32), T.BF16)
    got = ggml.quantize(x, T.BF16)
    assert np.array_equal(got, expected.reshape(got.shape))
    assert got.view(np.uint16).reshape(-1)[at] == 0xFFC1


def test_bf16_of_any_float32_bits(llama_cpp):
    """BF16 from float32 equals llama.cpp's ggml_fp32_to_bf16 on every kind of bit pattern: all
    65536 low halves (so every rounding tie, both ways) under subnormal, normal, largest-finite,
    infinite and NaN high halves of both signs, and random bits (NaN payloads included)."""
    high = np.array(
        [0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3FFF, 0x7F7F, 0x7F80, 0x7F81, 0x7FC0, 0x7FFF],
        dtype=np.uint32,
    )
    high = np.concatenate([high, high | 0x8000])
    bits = (high[:, None] << 16 | np.arange(1 << 16, dtype=np.uint32)).reshape(-1, ROW)
    rng = np.random.default_rng(4)
    random = rng.integers(0, 2**32, (256, ROW), dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits, random]).view(np.float32)
    assert np.array_equal(
        ggml.quantize(x, T.BF16), llama_cpp.quantize(x, T.BF16).reshape(x.shape[0], -1)
    )
