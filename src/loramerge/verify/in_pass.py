"""The weight check done inside a write's own pass: each block of rows is measured as the merge
produces it, from the rows the merge has just read, so the check reads nothing twice.

A check names a candidate, a base, adapters and the models the candidate passed through; any of
them may be what the pass itself reads (its source) or writes (its output). `--verify` checks
the output against the source + adapters; an unmerge's drift report checks the output against
the recorded base, the source in the ulp scale; a rebuild from `--base` checks the merged
model it replaces against the source + the adapters inside. Each tensor the pass computes with
numpy (`blocked.merge_rows`) is measured block by block with the same `Distance` calls as
`weights._check` makes on the files, so its row is the one a check after the pass would give;
every other tensor is left to that check (`verify_weights(done=...)`), which reads it back.
A rebuild's check, which only passes or refuses, places what it can from float32 terms first
(`verify.gate`): the same verdict, without the maxima of what it placed.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np

from loramerge.adapter import Adapter, load_adapter
from loramerge.compare import Distance
from loramerge.plan import TensorPlan, build_plan, matrix_shape
from loramerge.source.checkpoint import Checkpoint, open_weights
from loramerge.source.model_folder import read_config
from loramerge.verify.expected import add_terms, by_numpy, float64_factors
from loramerge.verify.gate import Float32Gate
from loramerge.verify.weights import (
    TensorCheck,
    _Flat,
    merged_result,
    models_at_hand,
    same_bytes,
    tolerance,
    untouched_result,
)

# What a role reads: the pass's source rows, its output rows, or a stored checkpoint.
SOURCE, OUTPUT = "source", "output"

_local = threading.local()


class PassCheck:
    """One weight check fed by the pass: `hook(plan)` gives each tensor's block hook, and
    `results()` the rows of the tensors it measured whole."""

    def __init__(
        self,
        source: tuple[Path, Checkpoint],
        base: Path,
        adapters: list[Path],
        weights: list[float],
        through: list[Path],
        candidate: Path | None = None,
        allow_pickle: bool = False,
        verdict_only: bool = False,
    ) -> None:
        """`source`: what the pass reads (its path, and the checkpoint it reads it through);
        `candidate`: None for the pass's output. `verdict_only`: for a check that only passes
        or refuses; it keeps the rows of the tensors that pass, without the figures nobody
        reads (`Distance.add_verdict`, or `verify.gate` from float32 terms where it applies),
        and leaves each one that fails to the check after the pass, which measures it in full
        for the refusal."""
        self.verdict_only = verdict_only
        self._source_path, self._source = Path(source[0]).resolve(), source[1]
        self._pickle = allow_pickle
        self._opened: list[Checkpoint] = []
        self._adapters: list[Adapter] = []
        self._rows: dict[str, TensorCheck] = {}
        self.base = self._role(base)
        self.candidate = OUTPUT if candidate is None else self._role(candidate)
        at_hand = models_at_hand(through)
        self.tolerance, self.through = tolerance(len(through)), [self._role(p) for p in at_hand]
        self._base_ck = self._source if self.base == SOURCE else self.base
        self._adapters = [load_adapter(a, allow_pickle=allow_pickle) for a in adapters]
        plan = build_plan(self._base_ck, read_config(base), self._adapters, weights, None)
        self._by_name = {t.name: t for t in plan.tensors}

    def _role(self, path: Path) -> str | Checkpoint:
        """SOURCE for the model the pass reads; any other, opened."""
        if Path(path).resolve() == self._source_path:
            return SOURCE
        checkpoint = open_weights(path, stem="model", allow_pickle=self._pickle)
        self._opened.append(checkpoint)
        return checkpoint

    def hook(self, plan: TensorPlan, source_dtype: str) -> _Tensor | None:
        """The block hook for a tensor the pass merges with numpy from `source_dtype` rows,
        when this check can measure it there; None leaves it to the check after the pass."""
        mine = self._measurable(plan, source_dtype)
        return None if mine is None else _Tensor(self, mine, plan)

    def measures(self, plan: TensorPlan, source_dtype: str) -> bool:
        """Whether `hook` would measure this tensor in the pass."""
        return self._measurable(plan, source_dtype) is not None

    def checks(self, name: str) -> bool:
        """Whether the tensor is one this check's plan has (so the check after the pass reads it
        back, unless measured in the pass)."""
        return name in self._by_name

    def _measurable(self, plan: TensorPlan, source_dtype: str) -> TensorPlan | None:
        """This check's plan of the tensor, when its rows can be measured in the pass: bfloat16
        all through, rows as the check sees them, plain LoRA (or none)."""
        mine = self._by_name.get(plan.name)
        if mine is None or source_dtype != "BF16" or plan.dtype != "BF16":
            return None
        stored = self._base_ck.tensors.get(mine.source)
        if stored is None or stored.dtype != "BF16" or tuple(stored.shape) != tuple(plan.shape):
            return None
        if matrix_shape(mine, mine.shape) != matrix_shape(plan, plan.shape):
            return None
        if self.base == SOURCE and mine.source != plan.source:
            return None
        if mine.modified and not by_numpy(mine, self._base_ck):
            return None
        others = [(role, plan.name) for role in (self.candidate, *self.through)]
        if not all(_holds(role, name, plan) for role, name in [(self.base, mine.source), *others]):
            return None
        return mine

    def finished(self, tensor: _Tensor) -> None:
        """Keep the row of a tensor whose every element was measured (a verdict-only check:
        that passed)."""
        row = tensor.result()
        if row.passed or not self.verdict_only:
            self._rows[tensor.plan.name] = row

    def results(self) -> dict[str, TensorCheck]:
        """The rows of the tensors measured in the pass, every element of them."""
        return dict(self._rows)

    def close(self) -> None:
        """Close what this check opened."""
        for adapter in self._adapters:
            adapter.close()
        for checkpoint in self._opened:
            checkpoint.close()


def _holds(role, name: str, plan: TensorPlan) -> bool:
    """Whether a role gives the tensor's rows as stored bfloat16 (the pass's own always do)."""
    if role in (SOURCE, OUTPUT):
        return True
    info = role.tensors.get(name)
    return (
        info is not None
        and info.dtype == "BF16"
        and tuple(info.shape) == tuple(plan.shape)
        and role.raw(name) is not None
        and getattr(role, "gguf", None) is None
    )


class _Tensor:
    """One tensor's check, fed its blocks of rows by the workers that merge it (in any order,
    several at once): each block is measured on its own and folded in under a lock."""

    def __init__(self, check: PassCheck, mine: TensorPlan, plan: TensorPlan) -> None:
        self.plan, self.distance = mine, Distance()
        self._check, self._size, self._name = check, math.prod(plan.shape), plan.name
        self._cols = matrix_shape(plan, plan.shape)[1]
        self._lock = threading.Lock()
        self._factors: list | None = None  # read by the first block, dropped after the last
        self._gate: Float32Gate | None = None  # built with the factors, dropped with them
        self._readers: dict[tuple[int, int], _Flat] = {}  # (thread, role): each reads its own

    def __call__(self, first: int, source: np.ndarray, output: np.ndarray) -> None:
        rows = source.shape[0]
        at, count = first * self._cols, rows * self._cols

        def rows_of(role) -> np.ndarray:
            if role == SOURCE:
                return source.reshape(-1)
            if role == OUTPUT:
                return output.reshape(-1)
            return self._reader(role).read(at, count)

        check, block = self._check, Distance()
        candidate, base = rows_of(check.candidate), rows_of(check.base)
        factors = self._terms()
        if not factors:
            # the rows the pass read are the rows it writes (a tensor copied unchanged)
            if _same_memory(candidate, base) or same_bytes(candidate, base):
                block.add_identical(count)
            else:
                through = [rows_of(role) for role in check.through]
                block.add_stored(candidate, base, through)
        else:
            through = [rows_of(role) for role in check.through]
            gate = self._gate  # built only for a verdict with nothing in the scale
            if gate is not None and gate.passes(first, candidate, base, check.tolerance):
                block.add_within(count)
            else:
                terms, scratch = _scratch(count)
                terms = terms.reshape(rows, self._cols)
                add_terms(terms, scratch, first, first + rows, factors, fresh=True)
                if check.verdict_only and not through:
                    block.add_verdict(candidate, base, terms)
                else:
                    block.add_sum(candidate, base, terms, through)
        with self._lock:
            self.distance.fold(block)
            last = self.distance.elements == self._size
        if last:  # the last block: nothing more is held
            self._check.finished(self)
            self._factors, self._readers, self._gate = [], {}, None

    def _terms(self) -> list:
        """The tensor's float64 factors (`expected.float64_factors`), read once, and for a
        verdict-only check with no other model in the ulp scale its float32 gate
        (`verify.gate`), where one applies."""
        with self._lock:
            if self._factors is None:
                self._factors = float64_factors(self.plan, self._check._adapters)
                if self._check.verdict_only and not self._check.through:
                    shape = matrix_shape(self.plan, self.plan.shape)
                    self._gate = Float32Gate.of(self._factors, shape)
            return self._factors

    def _reader(self, role) -> _Flat:
        """This thread's reader of the tensor in another model."""
        key = (threading.get_ident(), id(role))
        with self._lock:
            if key not in self._readers:
                name = self.plan.source if role is self._check.base else self._name
                self._readers[key] = _Flat(role, name)
            return self._readers[key]

    def result(self) -> TensorCheck:
        """The tensor's row, as `weights._check` words it (a verdict-only check's without the
        figures it does not keep, as `Distance.add_verdict` leaves them)."""
        tol = self._check.tolerance
        if self._check.verdict_only:
            self.distance.figures = False
        if self.plan.modified:
            return merged_result(self.plan.name, "BF16", self.distance, tol)
        through = bool(self._check.through)
        return untouched_result(self.plan.name, "BF16", self.distance, tol, through)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two flat arrays are views of the same bytes."""
    return a.dtype == b.dtype and a.size == b.size and a.ctypes.data == b.ctypes.data


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's two float64 block buffers (the terms, and the scratch they are summed in)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None or buffers[0].size < n:
        buffers = _local.buffers = (np.empty(n, np.float64), np.empty(n, np.float64))
    return buffers[0][:n], buffers[1][:n]
