"""The expected value of the tensors numpy does not compute (DoRA, convolutions, bias, replaced
rows or tensors), in float64 with torch through `delta`, the merge's own arithmetic."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from loramerge import dtypes
from loramerge.adapter import Adapter
from loramerge.delta import Term, add_bias, merged_blocks
from loramerge.plan import TensorPlan
from loramerge.source.checkpoint import Checkpoint
from loramerge.transform import tensor_inputs
from loramerge.verify.expected import Blocks, float32_gamma

_CPU = torch.device("cpu")


def expected_blocks(
    plan: TensorPlan, base: Checkpoint, adapters: list[Adapter], allowance: bool
) -> tuple[np.ndarray, Blocks, Blocks | None]:
    """As `expected.expected_blocks`, with torch."""
    start, terms, biases = tensor_inputs(plan, base, adapters, _CPU, torch.float64)
    bound = _float32_allowance(start, terms) if allowance else None
    if terms:
        blocks = merged_blocks(start, terms, torch.float64)
    elif biases:
        whole = add_bias(start, biases, compute_dtype=torch.float64, out_dtype=torch.float64)
        blocks = iter([(0, whole.shape[0], whole)])
    else:
        blocks = iter([(0, start.shape[0], start.to(torch.float64))])
    return dtypes.as_numpy(start), _numpy(blocks), None if bound is None else _numpy(bound)


def _numpy(blocks) -> Blocks:
    return ((r0, r1, block.numpy()) for r0, r1, block in blocks)


def _float32_allowance(start: torch.Tensor, terms: list[Term]):
    """Blocks of the float32 arithmetic error bound (see `expected._float32_allowance`), or
    None: plain LoRA only; DoRA and convolutions are held to the ulp tolerance alone."""
    if not terms or any(t.magnitude is not None or t.kind == "conv" for t in terms):
        return None
    gamma = float32_gamma([t.a.shape[0] for t in terms])
    absolute = [replace(t, a=t.a.abs(), b=t.b.abs(), coef=abs(t.coef)) for t in terms]
    magnitude = merged_blocks(start.to(torch.float64).abs(), absolute, torch.float64)
    return ((r0, r1, gamma * block) for r0, r1, block in magnitude)
