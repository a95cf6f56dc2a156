"""Bind a planned tensor to torch tensors and compute it: the route for what `blocked` leaves out.

This is the step between the Plan (names) and the math in `delta` (tensors) for CUDA, float64
compute, DoRA, convolutions, float16, row and whole-tensor replacements and bias: it reads what
one output tensor needs from the sources, applies replacements, loads each LoRA module's factors
onto the compute device and merges. merge writes the result; verify compares it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from functools import partial

import numpy as np
import torch

from loramerge import dtypes
from loramerge.adapter import Adapter
from loramerge.delta import (
    Term,
    add_bias,
    merge_weight,
    replace_rows,
    round_once,
    row_wise,
    window,
)
from loramerge.errors import LoramergeError
from loramerge.plan import Lora, TensorPlan, as_matrix, matrix_shape
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
    part_rows: int,
) -> Iterator[tuple[int, np.ndarray]]:
    """One output tensor on the CPU, merged on `device` in `compute` precision, as (flat start,
    values) parts of about `part_rows` rows each (one part when it cannot be split by rows).

    DoRA norms of the terms added here go to `norms_out` by (adapter index, tensor name).
    """
    on = torch.device(device)
    out_dtype = dtypes.to_torch(plan.dtype)
    compute_dtype = COMPUTE[compute]
    terms = lora_terms(plan, adapters, on, norms_in)
    biases = bias_terms(plan, adapters)
    origin, key = weight_origin(plan, base, adapters)
    rows, cols = matrix_shape(plan, origin.tensors[key].shape)
    if origin.raw(key) is None or not row_wise(terms):  # computed or held whole, or not by rows
        part_rows = rows
    norms: dict[int, list[torch.Tensor]] = {}
    for r0 in range(0, max(rows, 1), max(part_rows, 1)):
        r1 = min(rows, r0 + part_rows)
        weight = start_rows(plan, origin, key, adapters, compute_dtype, r0, r1, cols)
        if terms:
            kept = [(i, t) for i, t in enumerate(window(t, r0, r1) for t in terms) if t]
            found: dict[int, torch.Tensor] = {}
            in_place = on.type == "cpu" and weight.dtype == out_dtype
            weight = merge_weight(
                weight.to(on),
                [t for _, t in kept],
                compute_dtype=compute_dtype,
                out_dtype=out_dtype,
                out=weight if in_place else None,
                norms=found,
            )
            for index, norm in found.items():
                norms.setdefault(kept[index][0], []).append(norm.float().cpu())
        elif biases:
            weight = add_bias(weight, biases, compute_dtype=compute_dtype, out_dtype=out_dtype)
        yield r0 * cols, dtypes.as_numpy(round_once(weight, out_dtype).cpu())
    for index, parts in norms.items():  # dict updates are atomic under the GIL
        norm = dtypes.as_numpy(torch.cat(parts))
        norms_out[(plan.lora[index].adapter, plan.name)] = norm


def weight_origin(
    plan: TensorPlan, base: Checkpoint, adapters: list[Adapter]
) -> tuple[Checkpoint, str]:
    """The checkpoint and name W0 is read from: the base's, or an adapter's replacement."""
    if plan.replace:
        return adapters[plan.replace.adapter].weights, plan.replace.key
    return base, plan.source


def start_rows(
    plan: TensorPlan,
    origin: Checkpoint,
    key: str,
    adapters: list[Adapter],
    compute: torch.dtype,
    r0: int,
    r1: int,
    cols: int,
) -> torch.Tensor:
    """Rows r0:r1 of W0 as the plan starts it (replaced rows in), in this thread's read buffer
    (until the next call, so it may be merged in place); the whole tensor as `as_matrix` sees it
    when the rows are all of it."""
    itemsize = dtypes.itemsize(origin.tensors[key].dtype)
    buffer = read_buffer((r1 - r0) * cols * itemsize)
    whole = (r1 - r0) * cols == math.prod(origin.tensors[key].shape)
    if whole:
        weight = as_matrix(_read(origin, key, buffer), plan)
    else:
        weight = dtypes.as_torch(origin.read_part(key, r0 * cols, r1 * cols, buffer))
        weight = weight.reshape(r1 - r0, cols)
    if plan.rows:
        weight = weight.to(compute)  # new rows stay exact until the one final rounding
    for rows in plan.rows:
        new_rows = _read(adapters[rows.adapter].weights, rows.rows.key)
        at = torch.tensor(rows.rows.indices, dtype=torch.long)
        inside = (at >= r0) & (at < r1)
        if inside.any():
            weight = replace_rows(weight, (at[inside] - r0).tolist(), new_rows[inside])
    return weight


def lora_terms(
    plan: TensorPlan,
    adapters: list[Adapter],
    device: torch.device,
    norms: Mapping[tuple[int, str], np.ndarray] | None = None,
) -> list[Term]:
    """The plan's LoRA terms with their tensors on `device`.

    `norms[(adapter index, tensor name)]` holds the DoRA norms a DoRA undo term needs.
    """
    terms = []
    for t in plan.lora:
        norm = None
        if t.undo and t.module.magnitude_key:
            if norms is None or (t.adapter, plan.name) not in norms:
                raise LoramergeError(f"no stored DoRA norm for {plan.name}: pass --base BASE")
            norm = dtypes.as_torch(norms[(t.adapter, plan.name)]).to(device)
        terms.append(_term(adapters[t.adapter], t, device, norm))
    return terms


def bias_terms(plan: TensorPlan, adapters: list[Adapter]) -> list[tuple[float, torch.Tensor]]:
    """(coef, bias) pairs of the plan's LoRA biases."""
    return [(t.coef, _read(adapters[t.adapter].weights, t.module.bias_key)) for t in plan.bias]


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
    """
    origin, key = weight_origin(plan, base, adapters)
    rows, cols = matrix_shape(plan, origin.tensors[key].shape)
    weight = start_rows(plan, origin, key, adapters, compute, 0, rows, cols)
    return weight, lora_terms(plan, adapters, device, norms), bias_terms(plan, adapters)


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
