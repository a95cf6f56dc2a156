"""The torch NF4 quantizer (the CUDA path), run here on CPU torch: bit for bit the numpy one and
bitsandbytes' quantize_4bit, on fixture weights and awkward sizes, with and without double
quantization. Its CUDA run is in test_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LLAMA
from test_nf4 import TORCH_DTYPES, assert_same_as_bitsandbytes

from loramerge import dtypes
from loramerge.quant import nf4, nf4_torch
from loramerge.source.checkpoint import open_weights


def assert_torch_matches(tensor: torch.Tensor, blocksize: int, double_quant: bool) -> None:
    """The torch quantizer's state equals the numpy one's, which equals bitsandbytes'."""
    ours = nf4_torch.quantize(tensor, blocksize, double_quant)
    assert_same_as_bitsandbytes(tensor, blocksize, double_quant, state=ours)


@pytest.mark.parametrize("double_quant", [True, False])
def test_fixture_weights(double_quant):
    with open_weights(LLAMA, stem="model", allow_pickle=False) as checkpoint:
        names = [n for n, info in checkpoint.tensors.items() if len(info.shape) == 2]
        for name in names:
            tensor = dtypes.as_torch(checkpoint.read(name).copy())
            assert_torch_matches(tensor, 64, double_quant)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_awkward_sizes(dtype, blocksize, double_quant):
    generator = torch.Generator().manual_seed(blocksize + len(str(dtype)))
    for numel in [1, 2, 63, 65, blocksize + 1, 3 * blocksize - 1, 70001, 256 * 64 + 7]:
        tensor = (torch.randn(numel, generator=generator) * 0.05).to(dtype)
        assert_torch_matches(tensor, blocksize, double_quant)


def assert_same_as_numpy(
    tensor: torch.Tensor, blocksize: int, double_quant: bool, device: str = "cpu"
) -> None:
    """The torch quantizer's state on `device` equals the numpy one's (here: for tensors
    test_nf4 already holds against bitsandbytes, on which bitsandbytes is slow)."""
    ours = nf4_torch.quantize(tensor.to(device), blocksize, double_quant)
    theirs = nf4.quantize(dtypes.as_numpy(tensor), blocksize, double_quant)
    for field in ("packed", "absmax", "nested_absmax"):
        mine, other = getattr(ours, field), getattr(theirs, field)
        assert (mine is None) == (other is None)
        if mine is not None:
            assert mine.dtype == other.dtype and mine.shape == other.shape
            np.testing.assert_array_equal(mine, other)
    assert (ours.offset, ours.shape, ours.dtype) == (theirs.offset, theirs.shape, theirs.dtype)


def test_zero_blocks_ties_and_tiny_values():
    zeros = torch.zeros(64 * 300 + 5, dtype=torch.bfloat16)
    zeros[64 * 7 : 64 * 9] = 0.5  # test_nf4 holds this one against bitsandbytes
    assert_same_as_numpy(zeros, 64, True)
    assert_torch_matches(torch.zeros(7), 64, False)  # the short block all zero
    # Every midpoint itself (a tie: the lower code) and its float32 neighbours, in blocks whose
    # absmax is 1 so the scaled value is the value.
    mids = torch.from_numpy(nf4.MIDPOINTS)
    around = torch.stack(
        [mids, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0))]
    )
    values = torch.cat([around.reshape(-1), torch.tensor([1.0])])
    assert_torch_matches(values.repeat(64), 64, False)
    assert_torch_matches(
        torch.randn(64 * 50, generator=torch.Generator().manual_seed(3)) * 1e-38, 64, True
    )


def test_refuses_what_nf4_cannot_hold():
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4_torch.quantize(torch.tensor([1.0, float("nan")] * 40))
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4_torch.quantize(torch.tensor([1.0] * 64 + [float("inf")]))
    with pytest.raises(ValueError, match="blocksize"):
        nf4_torch.quantize(torch.ones(64), blocksize=100)
    with pytest.raises(ValueError, match="quantizes"):
        nf4_torch.quantize(torch.ones(64, dtype=torch.float64))
