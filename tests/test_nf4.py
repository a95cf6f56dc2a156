"""NF4 quantizer and dequantizer against bitsandbytes itself (the oracle), byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LLAMA
from hypothesis import given, settings
from hypothesis import strategies as st

from loramerge import dtypes
from loramerge.quant import nf4
from loramerge.source.checkpoint import open_weights

F = pytest.importorskip("bitsandbytes.functional")

TORCH_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _oracle(tensor: torch.Tensor, blocksize: int, double_quant: bool):
    """bitsandbytes' quantize_4bit, one torch thread (its offset's summation order then does not
    depend on the thread count), and its dequantize_4bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        packed, state = F.quantize_4bit(
            tensor, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
        )
    finally:
        torch.set_num_threads(threads)
    return packed, state, F.dequantize_4bit(packed, state)


def assert_same_as_bitsandbytes(
    tensor: torch.Tensor, blocksize: int, double_quant: bool, state: nf4.NF4 | None = None
):
    """Our NF4 state of `tensor` (numpy's, or the one given) is bitsandbytes', bit for bit."""
    packed, state_bnb, dequantized = _oracle(tensor, blocksize, double_quant)
    ours = state or nf4.quantize(dtypes.as_numpy(tensor), blocksize, double_quant, threads=2)
    if state is not None:  # and the numpy one's
        numpy_state = nf4.quantize(dtypes.as_numpy(tensor), blocksize, double_quant)
        for field in ("packed", "absmax", "nested_absmax"):
            np.testing.assert_array_equal(getattr(ours, field), getattr(numpy_state, field))
        assert ours.offset == numpy_state.offset
    state = state_bnb
    assert ours.packed.shape == tuple(packed.shape)
    np.testing.assert_array_equal(ours.packed, packed.numpy())
    np.testing.assert_array_equal(ours.absmax, state.absmax.numpy())
    assert ours.dtype == str(tensor.dtype).removeprefix("torch.")
    assert ours.shape == tuple(tensor.shape)
    if double_quant:
        np.testing.assert_array_equal(ours.nested_absmax, state.state2.absmax.numpy())
        np.testing.assert_array_equal(nf4.DYNAMIC_MAP, state.state2.code.numpy())
        assert ours.offset == state.offset.item()
    else:
        assert ours.nested_absmax is None and ours.offset is None
    np.testing.assert_array_equal(nf4.CODE, state.code.numpy())
    values = nf4.dequantize(ours).astype(dtypes.to_numpy(dtypes.from_torch(tensor.dtype)))
    np.testing.assert_array_equal(values, dtypes.as_numpy(dequantized.reshape(tensor.shape)))


def test_tables_are_bitsandbytes_tables():
    np.testing.assert_array_equal(nf4.CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(nf4.DYNAMIC_MAP, F.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("double_quant", [True, False])
def test_fixture_weights(double_quant):
    with open_weights(LLAMA, stem="model", allow_pickle=False) as checkpoint:
        names = [n for n, info in checkpoint.tensors.items() if len(info.shape) == 2]
        assert len(names) >= 14
        for name in names:
            tensor = dtypes.as_torch(checkpoint.read(name).copy())
            assert_same_as_bitsandbytes(tensor, 64, double_quant)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_random_awkward_sizes(dtype, blocksize, double_quant):
    generator = torch.Generator().manual_seed(blocksize + len(str(dtype)))
    sizes = [1, 2, 63, 65, blocksize + 1, 3 * blocksize - 1, 70001]
    if blocksize <= 256:
        sizes.append(256 * blocksize + 7)  # a short last block of nested absmax too
    for numel in sizes:
        tensor = (torch.randn(numel, generator=generator) * 0.05).to(dtype)
        assert_same_as_bitsandbytes(tensor, blocksize, double_quant)


def test_zero_blocks_constant_tensors_and_matrices():
    zeros = torch.zeros(64 * 300 + 5, dtype=torch.bfloat16)
    zeros[64 * 7 : 64 * 9] = 0.5  # most blocks all-zero, two not
    assert_same_as_bitsandbytes(zeros, 64, True)
    assert_same_as_bitsandbytes(torch.full((40, 33), -2.0), 64, True)  # every absmax equal
    matrix = torch.randn(96, 130, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert_same_as_bitsandbytes(matrix, 64, True)


def test_large_tensor_offset_order():
    """More than 32768 blocks: torch sums them in a cascade whose order we reproduce."""
    tensor = torch.randn(64 * 40000 + 3, generator=torch.Generator().manual_seed(2))
    assert_same_as_bitsandbytes(tensor.to(torch.bfloat16), 64, True)


def test_refuses_what_nf4_cannot_hold():
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize(np.array([1.0, np.nan] * 40, dtype=np.float32))
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(np.ones(64, dtype=np.float32), blocksize=100)
    with pytest.raises(ValueError, match="quantizes"):
        nf4.quantize(np.ones(64, dtype=np.float64))


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 3000),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    dtype=st.sampled_from(TORCH_DTYPES),
    blocksize=st.sampled_from([64, 128, 256]),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_hypothesis_matches_bitsandbytes(numel, scale, dtype, blocksize, double_quant, seed):
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale
    tensor = values.to(dtype)
    if not torch.isfinite(tensor).all():
        return  # float16 overflow: nothing to compare
    assert_same_as_bitsandbytes(tensor, blocksize, double_quant)
