"""Bind a planned tensor to torch tensors and compute it: the route for what `blocked` leaves out.

This is the step between the Plan (names) and the math in `delta` (tensors) for CUDA, float64
compute, DoRA, convolutions, float16, row and whole-tensor replacements and bias: it reads what
one output tensor needs from the sources, applies replacements, loads each LoRA module's factors
onto the compute device and merges. merge writes the result; verify compares it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import numpy as np
import torch

from loramerge import dtypes
from loramerge.adapter import Adapter
from loramerge.delta import Term, add_bias, merge_weight, replace_rows, round_once
from loramerge.errors import LoramergeError
from loramerge.plan import Lora, TensorPlan, as_matrix
from loramerge.source.checkpoint import Checkpoint, read_buffer

COMPUTE = {"float32": torch.float32, "float64": torch.float64}


def produce(
    plan: TensorPlan,
    base: Checkpoint,
    adapters: list[Adapter],
    device: str,
    compute: str,
    norms_in: Mapping[tuple[int, str], np.ndarray],
    norms_out: dict[tuple[int, str], np.ndarray],
) -> np.ndarray:
    """One output tensor on the CPU, merged on `device` in `compute` precision.

    DoRA norms of the terms added here go to `norms_out` by (adapter index, tensor name).
    """
    on = torch.device(device)
    out_dtype = dtypes.to_torch(plan.dtype)
    weight, terms, biases = tensor_inputs(plan, base, adapters, on, COMPUTE[compute], norms_in)
    if terms:
        in_place = on.type == "cpu" and weight.dtype == out_dtype
        norms: dict[int, torch.Tensor] = {}
        weight = merge_weight(
            weight.to(on),
            terms,
            compute_dtype=COMPUTE[compute],
            out_dtype=out_dtype,
            out=weight if in_place else None,
            norms=norms,
        )
        for index, norm in norms.items():  # dict updates are atomic under the GIL
            norms_out[(plan.lora[index].adapter, plan.name)] = dtypes.as_numpy(norm.float().cpu())
    elif biases:
        weight = add_bias(weight, biases, compute_dtype=COMPUTE[compute], out_dtype=out_dtype)
    return dtypes.as_numpy(round_once(weight, out_dtype).cpu()).reshape(plan.shape)


def tensor_inputs(
    plan: TensorPlan,
    base: Checkpoint,
    adapters: list[Adapter],
    device: torch.device,
    compute: torch.dtype,
    norms: Mapping[tuple[int, str], np.ndarray] | None = None,
) -> tuple[torch.Tensor, list[Term], list[tuple[float, torch.Tensor]]]:
    """(W0 as the plan starts it, LoRA terms on `device`, (coef, bias) pairs) for one tensor.

    W0 lives in this thread's read buffer until the next call, so it may be merged in place;
    stacked experts come as one matrix (`as_matrix`).
    `norms[(adapter index, tensor name)]` holds the DoRA norms a DoRA undo term needs.
    """
    weight = _read(base, plan.source, read_buffer(base.tensors[plan.source].nbytes))
    if plan.replace:
        weight = _read(adapters[plan.replace.adapter].weights, plan.replace.key)
    if plan.rows:
        weight = weight.to(compute)  # new rows stay exact until the one final rounding
    for rows in plan.rows:
        new_rows = _read(adapters[rows.adapter].weights, rows.rows.key)
        weight = replace_rows(weight, list(rows.rows.indices), new_rows)
    terms = []
    for t in plan.lora:
        norm = None
        if t.undo and t.module.magnitude_key:
            if norms is None or (t.adapter, plan.name) not in norms:
                raise LoramergeError(f"no stored DoRA norm for {plan.name}: pass --base BASE")
            norm = dtypes.as_torch(norms[(t.adapter, plan.name)]).to(device)
        terms.append(_term(adapters[t.adapter], t, device, norm))
    biases = [(t.coef, _read(adapters[t.adapter].weights, t.module.bias_key)) for t in plan.bias]
    return as_matrix(weight, plan), terms, biases


def _term(adapter: Adapter, lora: Lora, device: torch.device, norm: torch.Tensor | None) -> Term:
    """Load one LoRA module's tensors (this tensor's share of them) onto the compute device."""
    module = lora.module
    read = partial(_read, adapter.weights)
    magnitude = read(module.magnitude_key).to(device) if module.magnitude_key else None
    a, b = lora.factors(read(module.a_key), read(module.b_key))
    return Term(
        kind=module.kind,
        a=a.to(device),
        b=b.to(device),
        coef=lora.coef,
        weight=lora.weight,
        scale=module.scale,
        fan_in_fan_out=module.fan_in_fan_out,
        magnitude=magnitude,
        undo=lora.undo,
        norm=norm,
        at=lora.part.at if lora.part else 0,
    )


def _read(checkpoint: Checkpoint, name: str, into: np.ndarray | None = None) -> torch.Tensor:
    """One tensor as a CPU torch tensor (sharing the array the source read)."""
    return dtypes.as_torch(checkpoint.read(name, into))
