"""Plan a merge before a byte is written: which adapter touches which base tensor, and how.

The plan is pure data. Building it reads headers and configs (and, to recognise them, the values of
base-layer copies PEFT sometimes saves beside an adapter), and collects every mismatch
(a module with no base tensor, a shape that does not fit, a grouped convolution, a vocabulary
resized on one side only) into one error, so a wrong adapter is caught before any output exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from loramerge import conv1d, dtypes, ties
from loramerge.adapter import Adapter, FullTensor, LoraModule, TokenRows, bind_parameter
from loramerge.errors import LoramergeError
from loramerge.names import Layout, ModelNames, NamesUnavailable, model_names
from loramerge.source.checkpoint import Checkpoint

# A numpy array or a torch tensor: the plan slices either the same way.
Array = TypeVar("Array")


@dataclass(frozen=True)
class Part:
    """The share of a module's delta that one stored tensor receives.

    A stored tensor may be a piece of the parameter PEFT adapted (one expert of a fused MoE
    parameter, the gate or up half of `gate_up_proj`), or hold several experts of it. The part is
    expert `expert`'s delta (the whole delta when None), cut to `rows` and `cols` of the stored
    orientation, added at row `at` of the stored tensor seen as a matrix (its experts stacked).
    """

    expert: int | None = None
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    at: int = 0


@dataclass(frozen=True)
class Lora:
    """Adapter `adapter`'s LoRA module applied with user weight `weight`.

    `undo` marks a term taken out of a merged weight: plain LoRA then carries the negated weight
    (the arithmetic is the same sum), DoRA the weight it was merged with (it is inverted). `part`,
    when set, is the share of the module's delta this tensor receives.
    """

    adapter: int
    module: LoraModule
    weight: float
    undo: bool = False
    part: Part | None = None

    @property
    def coef(self) -> float:
        """The user weight times the LoRA scale: what multiplies B@A (and B's bias)."""
        return self.weight * self.module.scale

    def factors(self, a: Array, b: Array) -> tuple[Array, Array]:
        """(A, B) of this tensor's share: dW = B@A, or (B@A)^T when the module is transposed.

        PEFT's ParamWrapper lays a 3-D parameter's factors out as A (experts*r, in), rows expert
        by expert, and B (out, r*experts), columns rank by rank (`get_delta_weight`).
        """
        part = self.part
        if part is None:
            return a, b
        if part.expert is not None and self.module.experts > 1:
            r, e = self.module.rank, part.expert
            a, b = a[e * r : (e + 1) * r], b[:, e :: self.module.experts]
        out_range, in_range = (
            (part.cols, part.rows) if self.module.transposed else (part.rows, part.cols)
        )
        if out_range:
            b = b[out_range[0] : out_range[1]]
        if in_range:
            a = a[:, in_range[0] : in_range[1]]
        return a, b


@dataclass(frozen=True)
class Replace:
    """A whole tensor taken from adapter `adapter` (modules_to_save, resized embeddings)."""

    adapter: int
    key: str


@dataclass(frozen=True)
class Rows:
    """Embedding rows taken from adapter `adapter` (trainable tokens)."""

    adapter: int
    rows: TokenRows


@dataclass
class TensorPlan:
    """How one output tensor is made."""

    name: str
    source: str  # base tensor it starts from
    dtype: str  # output dtype
    shape: tuple[int, ...]
    replace: Replace | None = None
    rows: list[Rows] = field(default_factory=list)
    lora: list[Lora] = field(default_factory=list)
    bias: list[Lora] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        """Whether any adapter changes this tensor's values."""
        return bool(self.replace or self.rows or self.lora or self.bias)

    @property
    def nbytes(self) -> int:
        """Size of the output tensor."""
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


@dataclass
class Plan:
    """Every output tensor in write order, plus the config changes the merge implies."""

    tensors: list[TensorPlan]
    config_updates: dict[str, object]
    notes: list[str]

    @property
    def modified(self) -> list[TensorPlan]:
        """The tensors some adapter changes."""
        return [t for t in self.tensors if t.modified]

    @property
    def nbytes(self) -> int:
        """Total tensor bytes of the output."""
        return sum(t.nbytes for t in self.tensors)


def as_matrix(weight: Array, plan: TensorPlan) -> Array:
    """A numpy or torch tensor of stacked experts seen as one matrix, the experts one under
    another (a view), the way `Part.at` counts rows; any other tensor as it is."""
    if weight.ndim == 3 and any(t.part for t in plan.lora):
        return weight.reshape(-1, weight.shape[-1])
    return weight


def matrix_shape(plan: TensorPlan, shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a tensor of `shape` seen as the matrix its parts split by rows: stacked
    experts one under another (`as_matrix`), else the first axis by the rest."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    if len(shape) == 3 and any(t.part for t in plan.lora):
        return shape[0] * shape[1], shape[2]
    return shape[0], math.prod(shape[1:])


def build_plan(
    base: Checkpoint,
    config: dict | None,
    adapters: list[Adapter],
    weights: list[float],
    out_dtype: str | None,
    undo: list[bool] | None = None,
) -> Plan:
    """Match every adapter tensor to a base tensor; raise one error listing all mismatches.

    `undo[i]` marks adapter i as one to take out of `base` (a merged model) with the weight it
    was merged with, instead of adding it.
    """
    check_weights(weights)
    undo = undo or [False] * len(adapters)
    builder = _Builder(base, config or {}, adapters, weights, out_dtype, undo)
    builder.add_adapters()
    builder.handle_vocab_and_ties()
    if builder.errors:
        lines = "\n  - ".join(builder.errors)
        raise LoramergeError(f"the adapters do not fit the base:\n  - {lines}")
    return Plan(builder.ordered(), builder.config_updates, builder.notes)


# The largest finite float32: the terms are scaled by each weight in float32.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_weights(weights: list[float]) -> None:
    """Refuse an adapter weight that is not a finite float32 number (NaN, inf, 1e39): it would
    turn every weight it touches into NaN or inf, and a check against it would expect the same."""
    for weight in weights:
        if not (math.isfinite(weight) and abs(weight) <= _FLOAT32_MAX):
            raise LoramergeError(
                f"adapter weight {weight:g} is not a finite number float32 can hold"
            )


class _Builder:
    """Mutable state while a plan is assembled."""

    def __init__(self, base, config, adapters, weights, out_dtype, undo):
        self.base = base
        self.config = config
        self.adapters = adapters
        self.weights = weights
        self.out_dtype = out_dtype
        self.undo = undo
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.config_updates: dict[str, object] = {}
        self.plans: dict[str, TensorPlan] = {
            name: TensorPlan(name, name, self._dtype_for(info.dtype), info.shape)
            for name, info in base.tensors.items()
        }
        self.names: ModelNames | NamesUnavailable | None = None
        self.tied = bool(config) and ties.ties_enabled(config)
        self.groups = ties.tie_groups(config)
        self.stored = {
            m: self._stored_name(m) for group in self.groups or [] for m in group.members
        }

    # -- matching -------------------------------------------------------------------------------

    def add_adapters(self) -> None:
        for index, (adapter, weight) in enumerate(zip(self.adapters, self.weights, strict=True)):
            undo = self.undo[index]
            # Whole tensors first: a saved base layer resized in training is the W0 of its LoRA.
            for full in adapter.full:
                if full.base_copy and (undo or self._equals_base(adapter, full)):
                    continue  # PEFT saved the untouched base layer along with the LoRA
                if undo:
                    self._cannot_undo(adapter, f"replaced {full.target} whole (modules_to_save)")
                else:
                    self._add_replace(index, adapter, full.target, full.key, weight)
            for module in adapter.modules:
                self._add_lora(index, adapter, module, weight, undo)
            for rows in adapter.token_rows:
                if undo:
                    self._cannot_undo(adapter, f"replaced rows of {rows.target} (trainable tokens)")
                else:
                    self._add_rows(index, adapter, rows, weight)

    def _cannot_undo(self, adapter: Adapter, what: str) -> None:
        self.errors.append(
            f"{adapter.path.name} {what}; the original values are not in the merged model: "
            "pass --base BASE to rebuild from the base"
        )

    def _matches(self, target: str) -> list[str]:
        """Base tensors a parameter name in module naming can mean (a prefix off on either side)."""
        if target in self.base.tensors:
            return [target]
        return [
            n for n in self.base.tensors if n.endswith("." + target) or target.endswith("." + n)
        ]

    def _resolve(self, adapter: Adapter, target: str) -> TensorPlan | None:
        """The plan for a target name; tolerant of a base-model prefix on either side."""
        if target in self.plans:
            return self.plans[target]
        hits = self._matches(target)
        if len(hits) == 1:
            return self.plans[hits[0]]
        why = ""
        if not hits:
            tied = self._tied_plan(target)
            if tied is not None:
                return tied
            layout, why = self._layout(target)
            if layout is not None and len(layout.pieces) == 1:
                return self.plans[layout.pieces[0].stored]  # stored under another name
        reason = "matches several" if hits else "matches no"
        self._error_once(f"{adapter.path.name}: {target} {reason} tensor of the base{why}")
        return None

    def _error_once(self, message: str) -> None:
        """Record an error unless the same one is already recorded (one line per module)."""
        if message not in self.errors:
            self.errors.append(message)

    def _model_names(self) -> ModelNames:
        """transformers' names for this base, built on first need; raises NamesUnavailable."""
        if self.names is None:
            stored = {n: tuple(i.shape) for n, i in self.base.tensors.items()}
            try:
                self.names = model_names(self.config, stored)
            except NamesUnavailable as exc:
                self.names = exc
        if isinstance(self.names, NamesUnavailable):
            raise self.names
        return self.names

    def _layout(self, target: str) -> tuple[Layout | None, str]:
        """How transformers loads `target` from the stored tensors, or why that is not known."""
        try:
            names = self._model_names()
        except NamesUnavailable as exc:
            return None, f" ({exc})"
        layout = names.layout(target)
        if layout is None:
            refused = names.refused.get(target)
            return (
                None,
                f" (transformers loads it from stored tensors: {refused})" if refused else "",
            )
        if len(layout.pieces) > 1:
            stored = ", ".join(p.stored for p in layout.pieces[:2])
            count = len(layout.pieces)
            return (
                layout,
                f" (transformers assembles it from {count} stored tensors: {stored}, ...)",
            )
        return layout, ""

    def _conv1d_layout(self, adapter: Adapter, module: LoraModule, name: str) -> LoraModule:
        """PEFT sets fan_in_fan_out on a LoRA whose target is a Conv1D layer (an adapter trained
        on the model loaded in 4 bits, where the layer was a Linear, says False): so here."""
        if not conv1d.is_conv1d(name, self.config):
            return module
        note = (
            f"{adapter.path.name}: fan_in_fan_out is false, but its targets are GPT-2 style "
            "Conv1D layers, stored (in, out): merged as (B@A)^T, as PEFT does"
        )
        if note not in self.notes:
            self.notes.append(note)
        return replace(module, fan_in_fan_out=True)

    def _equals_base(self, adapter: Adapter, full: FullTensor) -> bool:
        """Whether a saved base-layer copy holds exactly the base tensor (reads both)."""
        plan = self.plans.get(full.target) or self._resolve(adapter, full.target)
        if plan is None or tuple(adapter.weights.tensors[full.key].shape) != tuple(plan.shape):
            return False
        stored = adapter.weights.read(full.key)
        base = self.base.read(plan.source)
        return bool(np.array_equal(stored.astype(np.float64), base.astype(np.float64)))

    def _add_lora(
        self, index: int, adapter: Adapter, module: LoraModule, weight: float, undo: bool
    ) -> None:
        if module.kind == "parameter":
            self._add_parameter(index, adapter, module, -weight if undo else weight, undo)
            return
        plan = self._resolve(adapter, f"{module.module}.weight")
        if plan is None:
            return
        if module.kind == "linear" and not module.fan_in_fan_out:
            module = self._conv1d_layout(adapter, module, plan.name)
        tensors = adapter.weights.tensors
        a, b = tensors[module.a_key].shape, tensors[module.b_key].shape
        if module.kind == "conv":
            expected = (b[0], a[1], *a[2:])
        elif module.transposed:
            expected = (a[1], b[0])
        else:
            expected = (b[0], a[1])
        if tuple(plan.shape) != expected:
            self.errors.append(
                f"{adapter.path.name}: {module.module} makes a delta of shape {list(expected)} "
                f"but base tensor {plan.name} is {list(plan.shape)} (adapter for another base?)"
            )
            return
        if module.magnitude_key:
            out_features = expected[1] if module.transposed else b[0]
            if math.prod(tensors[module.magnitude_key].shape) != out_features:
                self.errors.append(
                    f"{adapter.path.name}: DoRA magnitude of {module.module} does not have "
                    f"{out_features} elements"
                )
                return
        signed = -weight if undo and not module.magnitude_key else weight
        plan.lora.append(Lora(index, module, signed, undo))
        if module.bias_key and not self._matches(f"{module.module}.bias"):
            self.errors.append(
                f"{adapter.path.name}: {module.module} has a trained lora_B bias (lora_bias), but "
                f"base layer {plan.name.removesuffix('.weight')} has no bias to merge it into"
            )
        elif module.bias_key:
            bias = self._resolve(adapter, f"{module.module}.bias")
            if bias is not None and tuple(bias.shape) != tuple(tensors[module.bias_key].shape):
                self.errors.append(f"{adapter.path.name}: lora_B bias of {module.module} misfits")
            elif bias is not None:
                bias.bias.append(Lora(index, module, -weight if undo else weight, undo))

    def _add_parameter(
        self, index: int, adapter: Adapter, module: LoraModule, signed: float, undo: bool
    ) -> None:
        """A target_parameters module (PEFT's ParamWrapper), bound to its parameter and shared
        out to the stored tensors transformers builds that parameter from."""
        try:
            parameter = self._wrapped_parameter(adapter, module)
            target = f"{module.module}.{parameter}"
            shape, pieces = self._stored_pieces(target)
            experts = shape[0] if len(shape) == 3 else 1
            transposed = experts > 1 and module.module in self._model_names().transposed
            bound = bind_parameter(adapter, module, parameter, experts, transposed)
            parts = _parts(bound, shape, pieces, adapter.weights.tensors)
        except LoramergeError as exc:
            self.errors.append(f"{adapter.path.name}: {module.module} (target_parameters): {exc}")
            return
        for plan, part in parts:
            plan.lora.append(Lora(index, bound, signed, undo, part))

    def _wrapped_parameter(self, adapter: Adapter, module: LoraModule) -> str:
        """The parameter a ParamWrapper adapts. PEFT wraps a module's targeted parameters in
        their registration order, the first innermost, so a wrapper with `depth` wrappers inside
        it adapts the parameter that many places from the last."""
        depths = sorted({m.depth for m in adapter.modules if m.module == module.module})
        if depths == [0] and len(module.candidates) == 1:
            return module.candidates[0]
        own = self._model_names().parameters.get(module.module)
        if own is None:
            raise LoramergeError("the base's model class has no such module")
        adapted = [p for p in own if p in module.candidates]
        if depths != list(range(len(adapted))):
            raise LoramergeError(
                f"its {len(depths)} nested wrapper(s) do not match the parameters "
                f"target_parameters reaches on it ({', '.join(adapted) or 'none'})"
            )
        return adapted[len(adapted) - 1 - module.depth]

    def _stored_pieces(self, target: str) -> tuple[tuple[int, ...], list[tuple[TensorPlan, tuple]]]:
        """The in-memory parameter's shape and the stored tensors it is made of, with where each
        sits in it (transformers' layout when the base stores it under other names)."""
        hits = [n for n in self.base.tensors if n == target or n.endswith("." + target)]
        if len(hits) == 1:
            shape = self.base_shape(self.plans[hits[0]])
            return shape, [(self.plans[hits[0]], tuple((0, n) for n in shape))]
        layout, why = self._layout(target) if not hits else (None, "")
        if layout is None:
            reason = "matches several" if hits else "matches no"
            raise LoramergeError(f"{target} {reason} tensor of the base{why}")
        return layout.shape, [(self.plans[p.stored], p.index) for p in layout.pieces]

    def _add_replace(self, index: int, adapter: Adapter, target: str, key: str, weight: float):
        plan = self._resolve(adapter, target)
        if plan is None:
            return
        shape = adapter.weights.tensors[key].shape
        if weight != 1.0:
            self.errors.append(
                f"{adapter.path.name}: replaces {plan.name} whole (modules_to_save), which cannot "
                f"be weighted; use weight 1 for this adapter, not {weight}"
            )
        elif plan.replace is not None:
            self.errors.append(f"{plan.name} is replaced whole by two adapters")
        elif tuple(shape) != tuple(plan.shape) and not self._vocab_resize(plan, shape):
            known = (
                ""
                if self.groups is not None
                else (
                    f" (a vocabulary resize? config.json names no architecture loramerge knows, "
                    f"{ties.architecture(self.config)!r}, so it cannot tell which tensors are the "
                    "vocabulary matrices)"
                )
            )
            self.errors.append(
                f"{adapter.path.name}: {key} has shape {list(shape)} but base tensor {plan.name} "
                f"is {list(plan.shape)}{known}"
            )
        else:
            plan.replace = Replace(index, key)
            plan.shape = tuple(shape)

    def _add_rows(self, index: int, adapter: Adapter, rows: TokenRows, weight: float) -> None:
        plan = self._resolve(adapter, rows.target)
        if plan is None:
            return
        width = adapter.weights.tensors[rows.key].shape[1]
        if weight != 1.0:
            self.errors.append(f"{adapter.path.name}: trainable tokens cannot be weighted")
        elif len(plan.shape) != 2 or width != plan.shape[1] or max(rows.indices) >= plan.shape[0]:
            self.errors.append(
                f"{adapter.path.name}: trainable tokens {rows.target} do not fit base tensor "
                f"{plan.name} {list(plan.shape)}"
            )
        else:
            plan.rows.append(Rows(index, rows))

    # -- vocabulary and tied embeddings ----------------------------------------------------------

    def _stored_name(self, name: str) -> str | None:
        """The base tensor a parameter name (module naming) denotes, when exactly one matches."""
        hits = self._matches(name)
        return hits[0] if len(hits) == 1 else None

    def _vocab_resize(self, plan: TensorPlan, shape: tuple[int, ...]) -> bool:
        """A replacement may change the row count of a vocabulary matrix, nothing else."""
        return (
            len(shape) == 2
            and len(plan.shape) == 2
            and shape[1] == plan.shape[1]
            and plan.name in self._vocab_matrices()
        )

    def _vocab_matrices(self) -> set[str]:
        """Planned names of the architecture's vocabulary matrices (tie-group members)."""
        members = {m for group in self.groups or [] for m in group.members}
        return {self.stored.get(m) or m for m in members} & self.plans.keys()

    def _renamed_members(self, group: ties.TieGroup) -> None:
        """Find members stored under another name, as transformers maps names when it loads."""
        for member in group.members:
            if self.stored[member] is None:
                layout, _ = self._layout(member)
                if layout is not None and len(layout.pieces) == 1:
                    self.stored[member] = layout.pieces[0].stored

    def _tied_plan(self, name: str) -> TensorPlan | None:
        """The plan of a tied parameter not stored under its own name: stored under another
        name, or (not stored at all) a copy of the stored tensor it shares."""
        group = next((g for g in self.groups or [] if name in g.members), None)
        if not self.tied or group is None:
            return None
        if self.stored[group.source] is None:
            self._renamed_members(group)
        if self.stored[name]:
            return self.plans[self.stored[name]]
        source = next((self.stored[m] for m in group.members if self.stored[m]), None)
        return None if source is None else self._tied_copy(name, source)

    def _tied_copy(self, name: str, source: str) -> TensorPlan:
        """A plan writing tied parameter `name` as its own tensor, starting from `source`."""
        if name not in self.plans:
            base = self.plans[source]
            self.plans[name] = TensorPlan(name, base.source, base.dtype, self.base_shape(base))
        return self.plans[name]

    def handle_vocab_and_ties(self) -> None:
        self._untie_if_needed()
        self._check_vocab()
        if self.out_dtype:
            key = "dtype" if "dtype" in self.config else "torch_dtype"
            self.config_updates[key] = dtypes.to_name(self.out_dtype)

    def base_shape(self, plan: TensorPlan) -> tuple[int, ...]:
        return tuple(self.base.tensors[plan.source].shape)

    def _change_config(self, change: dict[str, object]) -> None:
        """Fold a config change into the updates; nested configs (`text_config`) key by key."""
        for key, value in change.items():
            if isinstance(value, dict) and isinstance(self.config_updates.get(key), dict):
                self.config_updates[key] = {**self.config_updates[key], **value}
            else:
                self.config_updates[key] = value

    def _check_vocab(self) -> None:
        """Vocabulary resizes: every vocabulary matrix resized, all to the same size."""
        resized = {
            p.name: p.shape[0]
            for p in self.plans.values()
            if p.replace and len(p.shape) == 2 and p.shape != self.base_shape(p)
        }
        if not resized:
            return
        stale = sorted(self._vocab_matrices() - resized.keys())
        if len(set(resized.values())) > 1:
            self.errors.append(f"vocabulary resized to different sizes: {resized}")
        elif stale:
            self.errors.append(
                f"vocabulary resized in {sorted(resized)} but not in {stale}; the adapter must "
                "carry every vocabulary matrix it resized (modules_to_save with the embedding "
                "and the output head)"
            )
        else:
            size = next(iter(resized.values()))
            self._change_config(ties.vocab_update(self.config, size))
            self.notes.append(f"vocabulary resized from {ties.vocab_size(self.config)} to {size}")

    def _untie_if_needed(self) -> None:
        """Tied parameters an adapter changes are written apart, and the config unties them.

        After this, a config that still ties parameters ties only ones no adapter changed.
        """
        if not self.tied:
            return
        embedding_like = sorted(p.name for p in self.plans.values() if _embedding_like(p))
        if self.groups is None:
            embedding_like += [
                p.name for p in self.plans.values() if p.modified and ties.tie_like(p.name)
            ]
            embedding_like = sorted(set(embedding_like))
            if embedding_like:
                self.errors.append(
                    f"config.json ties the embeddings (tie_word_embeddings) but names no "
                    f"architecture loramerge knows ({ties.architecture(self.config)!r}), so it "
                    f"cannot tell which tensors share storage with {', '.join(embedding_like)}; "
                    "refusing rather than guessing"
                )
            return
        for group in self.groups:
            if embedding_like and self.stored[group.source] is None:
                self._renamed_members(group)
            stored = [self.stored[m] for m in group.members if self.stored[m]]
            if not stored:
                if embedding_like:
                    self.errors.append(
                        f"{ties.architecture(self.config)} ties {' and '.join(group.members)}, "
                        "but the checkpoint stores none of them under a name loramerge can "
                        f"match, so it cannot tell whether {', '.join(embedding_like)} is tied; "
                        "refusing rather than guessing"
                    )
                continue
            planned = [self.plans.get(self.stored[m] or m) for m in group.members]
            if not any(p is not None and p.modified for p in planned):
                continue
            for member, plan in zip(group.members, planned, strict=True):
                if plan is None:
                    self._tied_copy(member, stored[0])
            self._change_config(ties.untie_update(self.config))
            written = [self.stored[m] or m for m in group.members]
            self.notes.append(
                f"untied {' and '.join(written)}: the adapters change them differently"
            )

    def _dtype_for(self, stored: str) -> str:
        return self.out_dtype if self.out_dtype and stored in dtypes.FLOAT_DTYPES else stored

    def ordered(self) -> list[TensorPlan]:
        """Base storage order (file, offset) so reads run forward; added tensors last."""
        files = {path: i for i, path in enumerate(self.base.files)}
        last = (len(files), 0)

        def position(plan: TensorPlan) -> tuple[int, int]:
            info = self.base.tensors.get(plan.name)
            return (files.get(info.path, 0), info.offset) if info else last

        return sorted(self.plans.values(), key=position)


def _embedding_like(plan: TensorPlan) -> bool:
    """Whether a change is of the kind only vocabulary matrices get: embedding LoRA, new rows."""
    kinds = {term.module.kind for term in plan.lora}
    return bool(plan.replace or plan.rows or "embedding" in kinds)


def _parts(
    module: LoraModule, shape: tuple[int, ...], pieces: list[tuple[TensorPlan, tuple]], tensors
) -> list[tuple[TensorPlan, Part | None]]:
    """Each stored tensor's share of a bound ParamWrapper's delta, checked against its shape."""
    out_features = tensors[module.b_key].shape[0]
    in_features = tensors[module.a_key].shape[1]
    matrix = (in_features, out_features) if module.transposed else (out_features, in_features)
    delta = (shape[0], *matrix) if module.experts > 1 else matrix
    if tuple(shape) != delta:
        raise LoramergeError(
            f"{module.target} is {list(shape)} but the adapter makes a delta of {list(delta)}"
        )
    parts = []
    for plan, index in pieces:
        *lead, rows, cols = index
        if not all(isinstance(x, tuple) for x in (rows, cols)):
            raise LoramergeError(f"{plan.name} holds single rows or columns of {module.target}")
        if module.experts == 1:
            parts.append((plan, Part(rows=rows, cols=cols) if len(pieces) > 1 else None))
            continue
        (first, last) = (lead[0], lead[0] + 1) if isinstance(lead[0], int) else lead[0]
        height = rows[1] - rows[0]
        parts += [(plan, Part(e, rows, cols, at=(e - first) * height)) for e in range(first, last)]
    return parts
