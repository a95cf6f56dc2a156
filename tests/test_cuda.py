"""CUDA paths: run when a GPU is present, skip cleanly when not.

The GPU computes tensor by tensor; in float32 it may differ from the CPU only by summation order
(both stay within the float32 error bound the oracle tests check), and in float64 both give the
unique correctly rounded value, so they must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA
from reference import float32_bound, load_base, reference_merge, ulp_error

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
@pytest.mark.parametrize("base, adapters, weights", CASES, ids=lambda v: str(v)[-20:])
def test_cuda_float64_is_bit_identical_to_cpu(tmp_path, base, adapters, weights):
    paths = [ADAPTERS / a for a in adapters]
    outputs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        merge(base, paths, out, MergeOptions(weights, device=device, compute_dtype="float64"))
        outputs[device] = load_base(out)
    for name, tensor in outputs["cpu"].items():
        assert torch.equal(tensor, outputs["cuda"][name]), name


@cuda
@pytest.mark.parametrize("base, adapters, weights", CASES, ids=lambda v: str(v)[-20:])
def test_cuda_float32_matches_cpu_up_to_summation_order(tmp_path, base, adapters, weights):
    paths = [ADAPTERS / a for a in adapters]
    cpu, gpu = tmp_path / "cpu", tmp_path / "cuda"
    merge(base, paths, cpu, MergeOptions(weights, device="cpu"))
    merge(base, paths, gpu, MergeOptions(weights, device="cuda"))
    expected = reference_merge(base, paths, list(weights))
    ours_cpu, ours_gpu = load_base(cpu), load_base(gpu)
    identical = total = 0
    for name, tensor in ours_gpu.items():
        other = ours_cpu[name]
        if name in expected:
            err = ulp_error(tensor, expected[name].value)
            assert (err <= float32_bound(expected[name], tensor.dtype)).all(), name
        else:
            assert torch.equal(tensor, other), name
        identical += int((tensor == other).sum())
        total += tensor.numel()
    print(f"\nCUDA vs CPU float32: {identical / total:.4%} of elements identical")
    assert identical / total > 0.99


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
