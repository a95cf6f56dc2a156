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
