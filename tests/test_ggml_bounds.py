"""verify's bounds for ggml blocks (quant.ggml.bounds), held against llama.cpp's own quantizer.

Blocks are written by llama.cpp's `quantize_row_*_ref` (ggml-quants.c compiled by
tests/ggml_ref.py) for random tensors with awkward distributions, and read with its
`dequantize_row_*`. For the 32-element types every element must sit within `block_bound` of the
value quantized, and the bound must be nearly reached somewhere (it is not slack). For the
K-quants every dequantized value must be a point of the block's grid (`grid`: lowest code plus a
whole number of steps), and the nearest one to the value quantized (clamped to the grid's ends),
up to float32 arithmetic at the grid's magnitude.
"""

from __future__ import annotations

import ggml_ref
import gguf
import numpy as np
import pytest

from loramerge.quant.ggml import bounds
from loramerge.verify.quantized import GRID_F32

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def llama_cpp():
    return ggml_ref.Reference(ggml_ref.require(ggml_ref.build))


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    normal = rng.standard_normal((32, 1024)).astype(np.float32)
    blocks = (0.02 * normal).reshape(-1, 256).copy()
    blocks[0::5] = 0.0
    blocks[1::5, 3] = 40.0  # an outlier per block
    blocks[2::5] = np.abs(blocks[2::5])  # all positive
    blocks[3::5, :16] = 0.0  # a zero sub-block beside live ones
    return {
        "weights-like": (0.02 * normal).astype(np.float32),
        "structured": blocks.reshape(-1, 1024),
        "heavy tails": rng.standard_t(1.5, (32, 1024)).astype(np.float32),
        "uniform positive": rng.random((32, 1024)).astype(np.float32),
        "tiny": (normal * np.float32(1e-6)).astype(np.float32),
    }


INPUTS = _inputs()


@pytest.mark.parametrize("qtype", sorted(bounds.LEGACY, key=lambda t: t.value), ids=str)
def test_block_bound_holds_and_is_tight(llama_cpp, qtype):
    worst = 0.0
    for name, x in INPUTS.items():
        data = llama_cpp.quantize(x, qtype)
        error = np.abs(llama_cpp.dequantize(data, qtype).astype(np.float64) - x).reshape(-1)
        allowed = bounds.block_bound(data, qtype)
        assert (error <= allowed).all(), (name, float((error / allowed).max()))
        worst = max(worst, float((error[allowed > 0] / allowed[allowed > 0]).max()))
    print(f"{qtype.name}: worst error {worst:.4f} of the bound")
    assert worst > 0.9  # some element comes close: the bound is not loose


@pytest.mark.parametrize("qtype", sorted(bounds.GRIDS, key=lambda t: t.value), ids=str)
def test_k_quant_codes_are_the_nearest_grid_points(llama_cpp, qtype):
    clamped = 0
    for name, x in INPUTS.items():
        data = llama_cpp.quantize(x, qtype)
        values = llama_cpp.dequantize(data, qtype).astype(np.float64).reshape(-1)
        low, step, levels = bounds.grid(data, qtype)
        high = low + step * (levels - 1)
        magnitude = np.maximum(np.abs(low), np.abs(high))
        k = np.divide(values - low, step, out=np.zeros_like(values), where=step != 0)
        on_grid = np.abs(low + np.rint(k) * step - values) <= GRID_F32 * magnitude
        assert on_grid.all() and (np.rint(k) >= 0).all() and (np.rint(k) < levels).all(), name
        flat = x.reshape(-1).astype(np.float64)
        nearest = bounds.nearest_distance(flat, low, step, levels)
        slack = GRID_F32 * np.maximum(magnitude, np.abs(flat))
        error = np.abs(values - flat)
        assert (error <= nearest + slack).all(), (name, float((error - nearest).max()))
        clamped += int(((flat < np.minimum(low, high)) | (flat > np.maximum(low, high))).sum())
    print(f"{qtype.name}: every code the nearest grid point ({clamped} elements past an end)")
