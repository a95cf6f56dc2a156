"""Plan a merge before a byte is written: which adapter touches which base tensor, and how.

The plan is pure data. Building it reads headers and configs (and, to recognise them, the values of
base-layer copies PEFT sometimes saves beside an adapter), and collects every mismatch
(a module with no base tensor, a shape that does not fit, a grouped convolution, a vocabulary
resized on one side only) into one error, so a wrong adapter is caught before any output exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from loramerge import dtypes
from loramerge.adapter import Adapter, FullTensor, LoraModule, TokenRows
from loramerge.errors import LoramergeError
from loramerge.source.checkpoint import Checkpoint

# transformers' name for the output embedding of *ForCausalLM models; used only when a tied
# checkpoint does not store it and we must write it to untie.
TIED_OUTPUT = "lm_head.weight"


@dataclass(frozen=True)
class Lora:
    """Adapter `adapter`'s LoRA module applied with user weight `weight`.

    `undo` marks a term taken out of a merged weight: plain LoRA then carries the negated weight
    (the arithmetic is the same sum), DoRA the weight it was merged with (it is inverted).
    """

    adapter: int
    module: LoraModule
    weight: float
    undo: bool = False

    @property
    def coef(self) -> float:
        """The user weight times the LoRA scale: what multiplies B@A (and B's bias)."""
        return self.weight * self.module.scale


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
    undo = undo or [False] * len(adapters)
    builder = _Builder(base, config or {}, adapters, weights, out_dtype, undo)
    builder.add_adapters()
    builder.handle_vocab_and_ties()
    if builder.errors:
        lines = "\n  - ".join(builder.errors)
        raise LoramergeError(f"the adapters do not fit the base:\n  - {lines}")
    return Plan(builder.ordered(), builder.config_updates, builder.notes)


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
        self.embedding = self._input_embedding()

    # -- matching -------------------------------------------------------------------------------

    def add_adapters(self) -> None:
        for index, (adapter, weight) in enumerate(zip(self.adapters, self.weights, strict=True)):
            undo = self.undo[index]
            for module in adapter.modules:
                self._add_lora(index, adapter, module, weight, undo)
            for full in adapter.full:
                if full.base_copy and (undo or self._equals_base(adapter, full)):
                    continue  # PEFT saved the untouched base layer along with the LoRA
                if undo:
                    self._cannot_undo(adapter, f"replaced {full.target} whole (modules_to_save)")
                else:
                    self._add_replace(index, adapter, full.target, full.key, weight)
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

    def _resolve(self, adapter: Adapter, target: str) -> TensorPlan | None:
        """The plan for a target name; tolerant of a base-model prefix on either side."""
        if target in self.plans:
            return self.plans[target]
        hits = [
            n for n in self.base.tensors if n.endswith("." + target) or target.endswith("." + n)
        ]
        if len(hits) == 1:
            return self.plans[hits[0]]
        if target == TIED_OUTPUT and self._tied() and self.embedding:
            return self._tied_output()
        reason = "matches several" if hits else "matches no"
        self.errors.append(f"{adapter.path.name}: {target} {reason} tensor of the base")
        return None

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
        plan = self._resolve(adapter, f"{module.module}.weight")
        if plan is None:
            return
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
        if module.bias_key:
            bias = self._resolve(adapter, f"{module.module}.bias")
            if bias is not None and tuple(bias.shape) != tuple(tensors[module.bias_key].shape):
                self.errors.append(f"{adapter.path.name}: lora_B bias of {module.module} misfits")
            elif bias is not None:
                bias.bias.append(Lora(index, module, -weight if undo else weight, undo))

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
            self.errors.append(
                f"{adapter.path.name}: {key} has shape {list(shape)} but base tensor {plan.name} "
                f"is {list(plan.shape)}"
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

    def _vocab_resize(self, plan: TensorPlan, shape: tuple[int, ...]) -> bool:
        """A replacement may change the row count of a vocabulary-sized matrix, nothing else."""
        return (
            len(shape) == 2
            and len(plan.shape) == 2
            and shape[1] == plan.shape[1]
            and plan.shape[0] == self.config.get("vocab_size")
        )

    def _input_embedding(self) -> str | None:
        """The base tensor shaped (vocab_size, hidden) that is not the output head."""
        vocab = self.config.get("vocab_size")
        candidates = [
            n
            for n, info in self.base.tensors.items()
            if len(info.shape) == 2 and info.shape[0] == vocab and n != TIED_OUTPUT
        ]
        return candidates[0] if len(candidates) == 1 else None

    def _tied(self) -> bool:
        return bool(self.config) and self.config.get("tie_word_embeddings", True) is not False

    def _tied_output(self) -> TensorPlan:
        """The output head of a tied model that stores only the input embedding."""
        if TIED_OUTPUT not in self.plans:
            source = self.plans[self.embedding]
            self.plans[TIED_OUTPUT] = TensorPlan(
                TIED_OUTPUT,
                source.source,
                source.dtype,
                tuple(self.base.tensors[source.source].shape),
            )
        return self.plans[TIED_OUTPUT]

    def handle_vocab_and_ties(self) -> None:
        vocab = self.config.get("vocab_size")
        resized = {
            p.name: p.shape[0]
            for p in self.plans.values()
            if p.replace and len(p.shape) == 2 and p.shape != self.base_shape(p)
        }
        if resized:
            sizes = set(resized.values())
            vocab_tensors = [
                p.name
                for p in self.plans.values()
                if len(self.base_shape(p)) == 2 and self.base_shape(p)[0] == vocab
            ]
            stale = [n for n in vocab_tensors if n not in resized]
            if len(sizes) > 1:
                self.errors.append(f"vocabulary resized to different sizes: {resized}")
            elif stale and not (self._tied() and stale == [TIED_OUTPUT]):
                self.errors.append(
                    f"vocabulary resized in {sorted(resized)} but not in {stale}; the adapter "
                    "must carry every vocabulary-sized tensor it resized"
                )
            else:
                self.config_updates["vocab_size"] = sizes.pop()
                self.notes.append(
                    f"vocabulary resized from {vocab} to {self.config_updates['vocab_size']}"
                )
        self._untie_if_needed()
        if self.out_dtype:
            key = "dtype" if "dtype" in self.config else "torch_dtype"
            self.config_updates[key] = dtypes.to_name(self.out_dtype)

    def base_shape(self, plan: TensorPlan) -> tuple[int, ...]:
        return tuple(self.base.tensors[plan.source].shape)

    def _untie_if_needed(self) -> None:
        """Tied embeddings whose two sides now differ must be written apart and untied."""
        if not (self._tied() and self.embedding):
            return
        embedding = self.plans[self.embedding]
        output = self.plans.get(TIED_OUTPUT)
        if not embedding.modified and (output is None or not output.modified):
            return
        if output is None:
            output = self._tied_output()
        if output.replace is None and embedding.replace and output.shape != embedding.shape:
            self.errors.append(
                f"{self.embedding} is resized but the tied output head is not; "
                "the adapter must carry both (modules_to_save with lm_head and the embedding)"
            )
        self.config_updates["tie_word_embeddings"] = False
        self.notes.append(
            f"untied {self.embedding} and {TIED_OUTPUT}: the adapters change them differently"
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
