"""Bind a planned tensor to real tensors: the starting weight and the adapter terms to add.

This is the step between the Plan (names) and the math in `delta` (tensors): it reads what one
output tensor needs from the sources, applies whole-tensor and row replacements, and loads each
LoRA module's factors onto the compute device. merge writes the result; verify compares it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from loramerge.adapter import Adapter, LoraModule
from loramerge.delta import Term, replace_rows
from loramerge.errors import LoramergeError
from loramerge.plan import TensorPlan
from loramerge.source.checkpoint import Checkpoint

_scratch = threading.local()


def read_buffer(nbytes: int) -> torch.Tensor:
    """This thread's reusable read buffer, grown as needed (no fresh pages per tensor)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _scratch.buffer = torch.empty(nbytes, dtype=torch.uint8)
    return buffer


def tensor_inputs(
    plan: TensorPlan,
    base: Checkpoint,
    adapters: list[Adapter],
    device: torch.device,
    compute: torch.dtype,
    norms: Mapping[tuple[int, str], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[Term], list[tuple[float, torch.Tensor]]]:
    """(W0 as the plan starts it, LoRA terms on `device`, (coef, bias) pairs) for one tensor.

    W0 lives in this thread's read buffer until the next call, so it may be merged in place.
    `norms[(adapter index, tensor name)]` holds the DoRA norms a DoRA undo term needs.
    """
    weight = base.read(plan.source, read_buffer(base.tensors[plan.source].nbytes))
    if plan.replace:
        weight = adapters[plan.replace.adapter].weights.read(plan.replace.key)
    if plan.rows:
        weight = weight.to(compute)  # new rows stay exact until the one final rounding
    for rows in plan.rows:
        new_rows = adapters[rows.adapter].weights.read(rows.rows.key)
        weight = replace_rows(weight, list(rows.rows.indices), new_rows)
    terms = []
    for t in plan.lora:
        norm = None
        if t.undo and t.module.magnitude_key:
            if norms is None or (t.adapter, plan.name) not in norms:
                raise LoramergeError(f"no stored DoRA norm for {plan.name}: pass --base BASE")
            norm = norms[(t.adapter, plan.name)].to(device)
        terms.append(_term(adapters[t.adapter], t.module, t.weight, device, t.undo, norm))
    biases = [
        (t.weight * t.module.scale, adapters[t.adapter].weights.read(t.module.bias_key))
        for t in plan.bias
    ]
    return weight, terms, biases


def _term(
    adapter: Adapter,
    module: LoraModule,
    weight: float,
    device: torch.device,
    undo: bool = False,
    norm: torch.Tensor | None = None,
) -> Term:
    """Load one LoRA module's tensors onto the compute device."""
    read = adapter.weights.read
    magnitude = read(module.magnitude_key).to(device) if module.magnitude_key else None
    return Term(
        kind=module.kind,
        a=read(module.a_key).to(device),
        b=read(module.b_key).to(device),
        coef=weight * module.scale,
        weight=weight,
        scale=module.scale,
        fan_in_fan_out=module.fan_in_fan_out,
        magnitude=magnitude,
        undo=undo,
        norm=norm,
    )
