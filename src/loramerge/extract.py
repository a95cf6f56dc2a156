"""`extract`: a LoRA adapter from a fine-tuned model and its base, one matrix at a time.

For every 2-D linear weight that changed, dW = W_ft - W0 in float32 and a truncated SVD (exact
for small matrices, randomized with a fixed seed otherwise) at a fixed rank or the smallest rank
keeping a share of ||dW||_F^2. Changed tensors that are not linear weights (embeddings, norms,
biases, resized vocabulary matrices) become modules_to_save, or are listed and left out.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from loramerge import conv1d, ties
from loramerge.adapter import PREFIX
from loramerge.adapter_build import Factors, adapter_record, lora_config, tensors_of
from loramerge.errors import LoramergeError
from loramerge.execute import BUFFER_BUDGET
from loramerge.hashing import sha256_of
from loramerge.lowrank import delta_svd, rank_for_energy, residual_norm, split
from loramerge.merge import _check_output_is_not_input
from loramerge.sink.atomic import AtomicFolder
from loramerge.sink.peft_adapter import write_adapter
from loramerge.source.checkpoint import Checkpoint, open_weights
from loramerge.source.model_folder import read_config

_COMPARE_CHUNK = 8 << 20


@dataclass(frozen=True)
class RankChoice:
    """How each module's rank is chosen: fixed, or by kept energy, capped."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None

    def check(self) -> None:
        """One of --rank and --energy, with sane values."""
        if (self.rank is None) == (self.energy is None):
            raise LoramergeError("give exactly one of --rank R and --energy E")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise LoramergeError(f"--energy must be in (0, 1], got {self.energy}")
        for value in (self.rank, self.max_rank):
            if value is not None and value <= 0:
                raise LoramergeError(f"ranks must be positive integers, got {value}")

    @property
    def cap(self) -> int | None:
        """The largest rank any module may get (None: no cap)."""
        caps = [v for v in (self.rank, self.max_rank) if v is not None]
        return min(caps) if caps else None


@dataclass
class ExtractResult:
    """What extract wrote: per-module rank, kept energy and error; tensors saved or left out."""

    output: Path
    modules: dict[str, dict]
    saved: list[str]
    skipped: list[str]
    unchanged: int
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The JSON object `--json` prints."""
        errors = [m["relative_error"] for m in self.modules.values()]
        return {
            "command": "extract",
            "output": str(self.output),
            "lora_modules": len(self.modules),
            "ranks": sorted({m["rank"] for m in self.modules.values()}),
            "max_relative_error": max(errors, default=0.0),
            "modules_to_save": self.saved,
            "skipped_nonlinear": self.skipped,
            "unchanged_tensors": self.unchanged,
            "seconds": round(self.seconds, 3),
            "modules": self.modules,
        }


def extract(
    finetuned: Path,
    base: Path,
    output: Path,
    choice: RankChoice,
    *,
    targets: tuple[str, ...] = (),
    skip_nonlinear: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> ExtractResult:
    """Write a PEFT adapter whose merge into `base` approximates `finetuned`."""
    start = time.perf_counter()
    choice.check()
    finetuned, base = Path(finetuned), Path(base)
    _check_output_is_not_input(Path(output), [finetuned, base])
    config = read_config(base) or {}
    transposed = config.get("model_type") in conv1d.MODELS  # stored (in, out): dW = (B @ A)^T
    with (
        open_weights(base, stem="model", allow_pickle=allow_pickle) as w0,
        open_weights(finetuned, stem="model", allow_pickle=allow_pickle) as ft,
    ):
        vocab = _vocabulary_matrices(config, w0)
        missing = sorted(set(ft.tensors) ^ set(w0.tensors))
        if missing:
            raise LoramergeError(
                f"{finetuned} and {base} do not hold the same tensors (e.g. {missing[0]!r}); "
                "is BASE the model FINETUNED was trained from?"
            )
        modules, report, full, skipped, unchanged = [], {}, {}, [], 0
        work = _TensorJob(ft, w0, vocab, targets, transposed, choice, skip_nonlinear)
        with (
            threadpool_limits(limits=1, user_api="blas"),
            ThreadPoolExecutor(_workers(ft) + 1, thread_name_prefix="loramerge") as pool,
        ):
            # The provenance hashes read both checkpoints once more, on a thread of their own.
            hashes = pool.submit(lambda: [sha256_of(c.files) for c in (ft, w0)])
            names = sorted(ft.tensors)
            for name, (kind, value) in zip(names, pool.map(work, names), strict=True):
                if kind == "unchanged":
                    unchanged += 1
                elif kind == "lora":
                    modules.append(value[0])
                    report[value[0].module] = value[1]
                elif kind == "skipped":
                    skipped.append(name)
                else:
                    full[name] = value
            hashes = dict(zip(("finetuned", "base"), hashes.result(), strict=True))
        _check_saved(full, report)
    saved = sorted(n.rsplit(".", 1)[0] for n in full)
    lora = lora_config(
        modules,
        base_model=str(base),
        fan_in_fan_out=transposed,
        modules_to_save=saved or None,
        target_modules=sorted(report) or None,
    )
    record = adapter_record("extract", str(base), [], report)
    record["history"][-1]["adapters"] = [str(finetuned)]
    record["extracted_from"] = {"source": str(finetuned), "sha256": hashes["finetuned"]}
    record["base"]["sha256"] = hashes["base"]
    record["history"][-1].update(
        {k: v for k, v in vars(choice).items() if v is not None}, skipped=skipped
    )
    tensors = tensors_of(modules) | {PREFIX + n: t for n, t in full.items()}
    with AtomicFolder(Path(output), overwrite=overwrite) as folder:
        write_adapter(folder.path, lora, tensors, record)
        folder.commit()
    result = ExtractResult(Path(output), report, saved, skipped, unchanged)
    result.files = sorted(record["files"])
    result.seconds = time.perf_counter() - start
    return result


def _workers(checkpoint: Checkpoint) -> int:
    """One extracting thread per core (each with single-threaded BLAS), at most 4, fewer when
    their buffers (a tensor's bytes and its float32 delta) would pass the merge's budget."""
    largest = max((info.nbytes * 3 for info in checkpoint.tensors.values()), default=1)
    return max(1, min(4, os.cpu_count() or 1, BUFFER_BUDGET // max(largest, 1)))


@dataclass(frozen=True)
class _TensorJob:
    """What becomes of one tensor: unchanged, LoRA (factors and report), saved whole or skipped."""

    ft: Checkpoint
    w0: Checkpoint
    vocab: set[str]
    targets: tuple[str, ...]
    transposed: bool
    choice: RankChoice
    skip_nonlinear: bool
    scratch: _Scratch = field(default_factory=lambda: _Scratch())

    def __call__(self, name: str) -> tuple[str, object]:
        """(kind, value) for tensor `name`; runs on any worker thread."""
        ft, w0, scratch = self.ft, self.w0, self.scratch
        if _same_bytes(ft, w0, name):
            return "unchanged", None
        shape = tuple(ft.tensors[name].shape)
        if _is_linear(name, shape, tuple(w0.tensors[name].shape), self.vocab, self.targets):
            delta = scratch.delta(shape)
            np.copyto(delta, ft.read(name, scratch.raw(ft, name)))
            np.subtract(delta, w0.read(name, scratch.raw(w0, name)), out=delta)
            module = name.rsplit(".", 1)[0]
            return "lora", _extract_module(
                module, delta.T if self.transposed else delta, self.choice
            )
        if self.skip_nonlinear:
            return "skipped", None
        return "saved", ft.read(name).copy()


def _same_bytes(a: Checkpoint, b: Checkpoint, name: str) -> bool:
    """Whether tensor `name` is stored identically in both, compared a piece at a time."""
    info_a, info_b = a.tensors[name], b.tensors[name]
    if (info_a.dtype, tuple(info_a.shape)) != (info_b.dtype, tuple(info_b.shape)):
        return False
    raw_a, raw_b = a.raw(name), b.raw(name)
    if raw_a is None or raw_b is None:  # pickled: already in memory
        return np.array_equal(a.read(name).view(np.uint8), b.read(name).view(np.uint8))
    for start in range(0, raw_a.nbytes, _COMPARE_CHUNK):
        size = min(_COMPARE_CHUNK, raw_a.nbytes - start)
        if os.pread(raw_a.fd, size, raw_a.offset + start) != os.pread(
            raw_b.fd, size, raw_b.offset + start
        ):
            return False
    return True


class _Scratch(threading.local):
    """Each thread's buffers, reused from tensor to tensor (fresh ones fragment the heap)."""

    def __init__(self) -> None:
        self._raw = np.empty(0, np.uint8)
        self._delta = np.empty(0, np.float32)

    def raw(self, checkpoint: Checkpoint, name: str) -> np.ndarray:
        """A byte buffer large enough for tensor `name`."""
        nbytes = checkpoint.tensors[name].nbytes
        if self._raw.size < nbytes:
            self._raw = np.empty(nbytes, np.uint8)
        return self._raw

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of `shape` on the reused buffer."""
        size = int(np.prod(shape))
        if self._delta.size < size:
            self._delta = np.empty(size, np.float32)
        return self._delta[:size].reshape(shape)


def _vocabulary_matrices(config: dict, base: Checkpoint) -> set[str]:
    """Stored names of the embeddings and output heads (never guessed from shapes)."""
    groups = ties.tie_groups(config)
    if groups is None:
        raise LoramergeError(
            f"{ties.architecture(config) or 'no architecture'} in config.json is not a model "
            "class loramerge knows, so it cannot tell embeddings from linear layers"
        )
    names = {m for g in groups for m in g.members}
    return {n for n in base.tensors if n in names or any(n.endswith("." + m) for m in names)}


def _is_linear(name: str, new: tuple, old: tuple, vocab: set[str], targets) -> bool:
    """A 2-D weight (shapes `new`, `old`) of unchanged shape, not a vocabulary matrix, and
    targeted (if any given)."""
    if len(new) != 2 or new != old or not name.endswith(".weight") or name in vocab:
        return False
    layer = name.rsplit(".", 2)[-2]
    return not targets or layer in targets


def _extract_module(module: str, delta: np.ndarray, choice: RankChoice) -> tuple[Factors, dict]:
    """Truncated SVD of one delta; the error is measured with the stored float32 factors."""
    total = float(np.einsum("ij,ij->", delta, delta, dtype=np.float64))
    u, s, vt = delta_svd(delta, choice.cap if choice.energy is None else choice.max_rank)
    keep = choice.rank if choice.energy is None else rank_for_energy(s, total, choice.energy)
    keep = max(1, min(keep, choice.cap or keep, len(s)))
    b, a = split(u[:, :keep], s[:keep], vt[:keep])
    b, a = b.astype(np.float32), a.astype(np.float32)
    error = residual_norm(delta, b, a)
    entry = {
        "rank": keep,
        "kept_energy": float(np.sum(s[:keep] ** 2) / total) if total else 1.0,
        "relative_error": error / np.sqrt(total) if total else 0.0,
        "shape": list(delta.shape),
    }
    return Factors(module, "linear", b, a), entry


def _check_saved(full: dict[str, np.ndarray], lora: dict[str, dict]) -> None:
    """A module cannot be both LoRA and modules_to_save (a changed bias of a LoRA layer)."""
    clash = sorted(n for n in full if n.rsplit(".", 1)[0] in lora)
    if clash:
        raise LoramergeError(
            f"{clash[0]} changed, but its module also gets LoRA; PEFT cannot save one module "
            "both ways (pass --skip-nonlinear to leave such tensors out)"
        )
