"""CUDA paths: run when a GPU is present, skip cleanly when not.

The GPU computes tensor by tensor and sums in its own order, so its results are held, like the
CPU's, against the float64 reference: within the float32 error bound in float32, within half an
ulp (plus float64's own error) in float64. How many elements the two devices share is printed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA
from reference import float32_bound, float64_bound, load_base, reference_merge, ulp_error

from loramerge import blocked
from loramerge.errors import LoramergeError
from loramerge.execute import resolve_device
from loramerge.merge import MergeOptions, merge

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CASES = [
    (LLAMA, ["llama-lora", "llama-lora-b"], (1.0, -0.5)),
    (LLAMA, ["llama-dora"], (1.0,)),
    (LLAMA, ["llama-embed"], (1.0,)),
    (LLAMA, ["llama-resized"], (1.0,)),
    (GPT2, ["gpt2-lora"], (1.0,)),
]


@cuda
@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("base, adapters, weights", CASES, ids=lambda v: str(v)[-20:])
def test_cuda_and_cpu_are_both_within_the_bound(tmp_path, base, adapters, weights, compute):
    paths = [ADAPTERS / a for a in adapters]
    outputs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        merge(base, paths, out, MergeOptions(weights, device=device, compute_dtype=compute))
        outputs[device] = load_base(out)
    expected = reference_merge(base, paths, list(weights))
    bound = float64_bound if compute == "float64" else float32_bound
    identical = total = 0
    for name, tensor in outputs["cuda"].items():
        other = outputs["cpu"][name]
        if name in expected:
            for result in (tensor, other):
                err = ulp_error(result, expected[name].value)
                assert (err <= bound(expected[name], result.dtype)).all(), name
        else:
            assert torch.equal(tensor, other), name  # untouched: the base's bytes
        identical += int((tensor == other).sum())
        total += tensor.numel()
    print(f"\nCUDA vs CPU {compute}: {identical / total:.4%} of elements identical")


@cuda
def test_cuda_index_out_of_range_is_refused():
    with pytest.raises(LoramergeError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_cuda_requested_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(LoramergeError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"


# NF4 on CUDA (quant/nf4_torch.py). What to expect, from bitsandbytes' csrc (kQuantizeBlockwise,
# dQuantizeNF4, dQuantize): our torch quantizer does the CPU reference's arithmetic, so on the GPU
# it must give the numpy quantizer's bytes exactly. bitsandbytes' CUDA kernel uses the same 15
# float32 thresholds (ties to the lower code) and x * (1 / absmax) on whole blocks, so on tensors
# of whole blocks with no all-zero block its packed codes and float32 absmax are ours bit for
# bit. It differs on a short last block (reciprocal instead of division: a value may round to
# the other side of a threshold), on all-zero blocks (absmax 0, codes 0 from 0 * inf = NaN), and
# in double quantization (the offset is a CUDA sum, the nested codes a binary search of the
# dynamic map): there only the 4-bit codes are compared, and the offset within its summation
# error.
@cuda
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_on_cuda_is_the_numpy_quantizer(double_quant):
    from test_nf4_torch import assert_same_as_numpy

    from loramerge import dtypes
    from loramerge.source.checkpoint import open_weights

    with open_weights(LLAMA, stem="model", allow_pickle=False) as checkpoint:
        for name in [n for n, info in checkpoint.tensors.items() if len(info.shape) == 2]:
            tensor = dtypes.as_torch(checkpoint.read(name).copy())
            assert_same_as_numpy(tensor, 64, double_quant, device="cuda")
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for numel in (1, 63, 65, 64 * 300 + 5, 64 * 40000 + 3):
            tensor = (torch.randn(numel, generator=generator) * 0.05).to(dtype)
            tensor[64 : 64 * 3] = 0  # whole zero blocks
            assert_same_as_numpy(tensor, 64, double_quant, device="cuda")


@cuda
def test_nf4_on_cuda_against_bitsandbytes_cuda_kernel():
    functional = pytest.importorskip("bitsandbytes.functional")
    from loramerge.quant import nf4_torch

    generator = torch.Generator().manual_seed(6)
    tensor = (torch.randn(512, 640, generator=generator) * 0.05).to(torch.bfloat16).cuda()
    packed, state = functional.quantize_4bit(tensor, blocksize=64, quant_type="nf4")
    ours = nf4_torch.quantize(tensor, 64, double_quant=False)
    assert torch.equal(torch.from_numpy(ours.packed), packed.cpu())
    assert torch.equal(torch.from_numpy(ours.absmax), state.absmax.cpu())
    packed, state = functional.quantize_4bit(
        tensor, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    ours = nf4_torch.quantize(tensor, 64, double_quant=True)
    assert torch.equal(torch.from_numpy(ours.packed), packed.cpu())
    blocks = ours.absmax.size
    assert abs(ours.offset - state.offset.item()) <= blocks * 2.0**-24 * abs(ours.offset)
    same = (torch.from_numpy(ours.absmax) == state.absmax.cpu()).float().mean().item()
    print(f"\nnested absmax codes equal to bitsandbytes' CUDA kernel: {same:.4%}")


@cuda
@pytest.mark.parametrize("model", [LLAMA, GPT2], ids=["llama", "gpt2-conv1d"])
def test_quantize_to_nf4_on_cuda_writes_the_cpu_bytes(tmp_path, model):
    from loramerge.quantize import quantize

    for device in ("cpu", "cuda"):
        quantize(model, tmp_path / device, MergeOptions(to="nf4", device=device))
    shards = sorted(p.name for p in (tmp_path / "cpu").glob("*.safetensors"))
    assert shards
    for shard in shards:
        assert (tmp_path / "cpu" / shard).read_bytes() == (tmp_path / "cuda" / shard).read_bytes()


@cuda
@pytest.mark.parametrize("base, adapters, weights", CASES, ids=lambda v: str(v)[-20:])
def test_cuda_in_row_parts_is_within_the_bound(tmp_path, monkeypatch, base, adapters, weights):
    """Parts of one row each (`LORAMERGE_CHUNK_BYTES`, blocks of one row): every part goes to
    the GPU on its own."""
    monkeypatch.setenv("LORAMERGE_CHUNK_BYTES", "1")
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 1)
    paths = [ADAPTERS / a for a in adapters]
    merge(base, paths, tmp_path / "out", MergeOptions(weights, device="cuda"))
    ours = load_base(tmp_path / "out")
    for name, exp in reference_merge(base, paths, list(weights)).items():
        err = ulp_error(ours[name], exp.value)
        assert (err <= float32_bound(exp, ours[name].dtype)).all(), name
