"""Execute a plan: every tensor by its route (raw copy, numpy, or torch) on a few threads.

mergekit's split, kept: `plan` decides what each output tensor is, this module only runs it.
Untouched tensors are copied as raw bytes; plain LoRA on the CPU goes through `blocked` with numpy
alone; the rest (CUDA, float64, DoRA, convolutions, float16, replacements, bias) through
`transform` with torch, which is imported only when some tensor needs it.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from loramerge import blocked, dtypes, kernels
from loramerge.adapter import Adapter
from loramerge.errors import LoramergeError
from loramerge.nf4_layout import StoredNF4
from loramerge.plan import Plan, TensorPlan, matrix_shape
from loramerge.sink.direct_io import ALIGN
from loramerge.sink.formats import Sink
from loramerge.source.checkpoint import Checkpoint, RawRange, read_buffer
from loramerge.source.nf4 import stored_nf4

# Called after each tensor with (bytes just written, total bytes to write).
Progress = Callable[[int, int], None]


def resolve_device(device: str) -> str:
    """`auto` picks CUDA when torch sees a GPU; an explicit CUDA device must exist.

    On Linux without a GPU device node, `auto` means the CPU without importing torch.
    """
    if device == "cpu" or (device == "auto" and not _gpu_node_present()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LoramergeError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LoramergeError(f"--device {device}: no CUDA device is available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LoramergeError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif resolved.type != "cpu":
        raise LoramergeError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return str(resolved)


def _gpu_node_present() -> bool:
    """Whether torch could see a GPU: an NVIDIA or ROCm device node (only Linux can tell)."""
    if not sys.platform.startswith("linux"):
        return True
    dev = Path("/dev")
    return (dev / "kfd").exists() or any(dev.glob("nvidia[0-9]*"))


@dataclass(frozen=True)
class Route:
    """Where and how modified tensors are computed, and the DoRA norms going in and out."""

    device: str  # "cpu", "cuda", "cuda:N"
    compute: str  # "float32" or "float64"
    norms_in: dict[tuple[int, str], np.ndarray]
    norms_out: dict[tuple[int, str], np.ndarray]
    # (tensor, its stored dtype) -> a hook shown each block numpy merges (`blocked.merge_rows`),
    # or None: the checks done inside the pass (`verify.in_pass`)
    check: Callable[[TensorPlan, str], blocked.BlockCheck | None] | None = None

    def by_numpy(self, plan: TensorPlan, stored_dtype: str) -> bool:
        """Whether numpy computes this tensor: plain LoRA on a bf16/f32 matrix (or a bare dtype
        change), in float32 on the CPU."""
        if not (
            self.device == "cpu"
            and self.compute == "float32"
            and stored_dtype in blocked.DTYPES
            and plan.dtype in blocked.DTYPES
            and not (plan.replace or plan.rows or plan.bias)
        ):
            return False
        return not plan.lora or (
            (len(plan.shape) == 2 or all(t.part for t in plan.lora))
            and all(t.module.kind != "conv" and not t.module.magnitude_key for t in plan.lora)
        )

    def by_torch(self, plan: TensorPlan, base: Checkpoint) -> bool:
        """Whether this tensor needs torch (neither copied as raw bytes nor done by numpy)."""
        stored = base.tensors[plan.source].dtype
        return _copied(plan, base) is None and not self.by_numpy(plan, stored)


def _copied(plan: TensorPlan, base: Checkpoint) -> RawRange | None:
    """The stored bytes of a tensor that is written unchanged, when they can be copied as such."""
    if plan.modified or plan.dtype != base.tensors[plan.source].dtype:
        return None
    return base.raw(plan.source)


def write_tensors(
    writer: Sink,
    plan: Plan,
    checkpoint: Checkpoint,
    adapters: list[Adapter],
    route: Route,
    progress: Progress | None,
) -> int:
    """Produce every tensor on a few threads (numpy, torch and file I/O release the GIL).

    Each thread owns one tensor at a time and writes it, part by part, to its own byte range, in
    the writer's order so each shard's hash keeps pace; the parts of a tensor numpy merges are
    shared out instead, so one big tensor keeps every thread busy. BLAS and torch thread pools
    are held to one thread meanwhile (no oversubscription).
    """
    computed = [t for t in plan.tensors if _raw(t, checkpoint, writer) is None]
    workers = worker_count(
        [min(t.nbytes, chunk_bytes()) for t in computed], route.check is not None
    )
    by_torch = any(route.by_torch(t, checkpoint) for t in plan.tensors)
    done = 0
    with (
        collector_paused(),
        threadpool_limits(limits=1, user_api="blas"),
        _torch_threads(1 if by_torch else None),
        ThreadPoolExecutor(workers, thread_name_prefix="loramerge") as pool,
    ):
        by_name = {t.name: t for t in plan.tensors}
        tasks = [
            task
            for name in writer.order
            for task in _tasks(writer, checkpoint, adapters, route, by_name[name])
        ]
        futures = [pool.submit(work) for work, _ in tasks]
        try:
            for future, (_, nbytes) in zip(futures, tasks, strict=True):
                _finished(future)
                done += nbytes
                if progress:
                    progress(nbytes, plan.nbytes)
        except BaseException:
            for future in futures:
                future.cancel()
            writer.cancel()  # a worker may wait for bytes that will never come
            raise
    return done


# Buffers the workers may hold at once: each holds its tensor's part, and may leave a copy of it
# with the hasher when it finishes ahead of an earlier tensor.
BUFFER_BUDGET = 2 << 30


def _finished(future: Future) -> None:
    """future.result(), waking every second: a lock wait is interrupted only by a signal the
    kernel hands to this thread, and Ctrl-C handed to a worker would otherwise wait for ever."""
    while future not in wait([future], timeout=1.0).done:
        pass  # back in Python for a moment: a pending signal's handler runs here
    future.result()


# Bytes of a tensor read, merged and written at a time: memory stays flat whatever its size.
CHUNK_BYTES = 16 << 20


def worker_count(tensor_sizes: list[int], checked: bool = False) -> int:
    """Threads for the tensors: two more than the cores (direct writes and the in-order hash
    leave threads waiting), at most 4, and fewer when big tensors would pass the buffer budget.
    One more than the cores when a check runs in the pass (`checked`): each thread then waits
    less for each byte, and a fourth one only adds its buffers (about 80 MiB of peak RSS)."""
    largest = max(tensor_sizes, default=0)
    by_memory = BUFFER_BUDGET // max(2 * largest, 1)
    spare = 1 if checked else 2
    return max(1, min(4, (os.cpu_count() or 1) + spare, by_memory))


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while tensors stream (a merge's or a check's): the loop
    makes no cycles, and each pass would walk every object the imports left (frozen out of
    later passes too)."""
    enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Hold torch's intra-op pool to `count` threads (None: torch is not needed, not imported)."""
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _stored(plan: TensorPlan, base: Checkpoint) -> StoredNF4 | None:
    """How an untouched weight of an NF4 base is stored, if it is."""
    if plan.modified or plan.dtype != base.tensors[plan.source].dtype:
        return None
    return stored_nf4(base, plan.source)


def _raw(plan: TensorPlan, base: Checkpoint, writer: Sink) -> RawRange | None:
    """The bytes to copy for a tensor the writer takes unchanged, if it does."""
    return _copied(plan, base) if writer.copyable(plan.name) else None


def part_rows(rows: int, cols: int, itemsize: int, granule: int) -> int:
    """Rows per part of a (rows, cols) tensor: about `chunk_bytes()` each, a whole number of
    merge blocks (`blocked.block_rows`, so the arithmetic is that of the whole tensor), every
    part starting at a multiple of the sink's granule."""
    unit = math.lcm(granule // math.gcd(granule, cols) if cols else 1, blocked.block_rows(cols))
    step = chunk_bytes() // max(1, cols * itemsize)
    return min(max(unit, step // unit * unit), max(rows, 1))


def chunk_bytes() -> int:
    """Bytes a tensor is read, merged and written in at a time (`LORAMERGE_CHUNK_BYTES`)."""
    value = os.environ.get("LORAMERGE_CHUNK_BYTES", "")
    return int(value) if value.isdigit() and int(value) > 0 else CHUNK_BYTES


def _tasks(
    writer: Sink, base: Checkpoint, adapters: list[Adapter], route: Route, plan: TensorPlan
) -> list[tuple[Callable[[], None], int]]:
    """(work, bytes it writes) for one output tensor: the whole tensor, or, where the writer
    takes a tensor's parts in any order, each piece of one copied unchanged and each part of
    rows of one numpy merges."""
    stored_dtype = base.tensors[plan.source].dtype
    numpy = route.by_numpy(plan, stored_dtype)
    # a check in the pass sees a tensor copied unchanged too, read and written from memory
    hook = route.check(plan, stored_dtype) if numpy and route.check else None
    raw = None if hook is not None else _raw(plan, base, writer)
    whole = [(partial(_write_tensor, writer, base, adapters, route, plan, hook, raw), plan.nbytes)]
    if not writer.parts_any_order(plan.name):
        return whole
    if raw is not None:  # copied in CHUNK_BYTES pieces
        return [
            (partial(writer.copy, plan.name, raw.fd, raw.offset + at, size, at), size)
            for at in range(0, raw.nbytes, CHUNK_BYTES)
            for size in [min(CHUNK_BYTES, raw.nbytes - at)]
        ] or whole
    if not numpy:
        return whole
    rows, step = matrix_shape(plan, plan.shape)[0], _numpy_step(writer, base, plan)
    if rows <= step:
        return whole
    starts = range(0, rows, step)
    factors = _SharedFactors(plan, adapters, len(starts))
    row_bytes = plan.nbytes // rows
    return [
        (
            partial(_write_part, writer, base, plan, factors, hook, r0, min(rows, r0 + step)),
            (min(rows, r0 + step) - r0) * row_bytes,
        )
        for r0 in starts
    ]


def _write_tensor(
    writer: Sink,
    base: Checkpoint,
    adapters: list[Adapter],
    route: Route,
    plan: TensorPlan,
    hook: blocked.BlockCheck | None,
    raw: RawRange | None,
) -> None:
    """Produce one output tensor and hand it to the writer part by part (`raw`: its bytes, to
    copy as they are)."""
    if raw is not None:
        writer.copy(plan.name, raw.fd, raw.offset, raw.nbytes)
        return
    stored = _stored(plan, base)
    if stored is not None and writer.copy_stored(plan.name, stored):
        return
    rows, cols = matrix_shape(plan, plan.shape)
    if route.by_numpy(plan, base.tensors[plan.source].dtype):
        step = _numpy_step(writer, base, plan)
        factors = _numpy_factors(plan, adapters)
        parts = (
            _merged_part(writer, plan, base, factors, r0, min(rows, r0 + step), hook)
            for r0 in range(0, max(rows, 1), step)
        )
    else:
        from loramerge import transform  # torch; imported (once) only when some tensor needs it

        parts = transform.produce(
            plan,
            base,
            adapters,
            route.device,
            route.compute,
            route.norms_in,
            route.norms_out,
            part_rows(rows, cols, dtypes.itemsize(plan.dtype), writer.granule(plan.name)),
        )
    numel = math.prod(plan.shape)
    for start, values in parts:
        writer.write(
            plan.name, values.reshape(plan.shape) if values.size == numel else values, start
        )


def _numpy_step(writer: Sink, base: Checkpoint, plan: TensorPlan) -> int:
    """Rows per part of a tensor numpy merges (`part_rows`); all of them when the base's tensor
    is computed or held whole."""
    rows, cols = matrix_shape(plan, plan.shape)
    if base.raw(plan.source) is None:
        return max(rows, 1)
    return part_rows(rows, cols, dtypes.itemsize(plan.dtype), writer.granule(plan.name))


class _SharedFactors:
    """The float32 factors of a tensor whose parts several threads merge: made by the first
    part, dropped after the last."""

    def __init__(self, plan: TensorPlan, adapters: list[Adapter], parts: int) -> None:
        self._plan, self._adapters, self._left = plan, adapters, parts
        self._lock = threading.Lock()
        self._factors: list[blocked.Factor] | None = None

    def take(self) -> list[blocked.Factor]:
        """The factors (the other parts wait while the first part makes them)."""
        with self._lock:
            if self._factors is None:
                self._factors = _numpy_factors(self._plan, self._adapters)
            return self._factors

    def release(self) -> None:
        """One part is done with them."""
        with self._lock:
            self._left -= 1
            if not self._left:
                self._factors = None


def _write_part(
    writer: Sink,
    base: Checkpoint,
    plan: TensorPlan,
    factors: _SharedFactors,
    hook: blocked.BlockCheck | None,
    r0: int,
    r1: int,
) -> None:
    """Merge rows r0:r1 of a tensor and hand them to the writer."""
    try:
        start, values = _merged_part(writer, plan, base, factors.take(), r0, r1, hook)
        writer.write(plan.name, values, start)
    finally:
        factors.release()


def _numpy_factors(plan: TensorPlan, adapters: list[Adapter]) -> list[blocked.Factor]:
    """A tensor's plain LoRA terms as `blocked` takes them (float32, coefficients folded in)."""
    factors = []
    for t in plan.lora:
        read = adapters[t.adapter].weights.read
        a, b = t.factors(read(t.module.a_key), read(t.module.b_key))
        at = t.part.at if t.part else 0
        factors.append(blocked.factor(a, b, t.coef, t.module.transposed, at))
    return factors


def _merged_part(
    writer: Sink,
    plan: TensorPlan,
    base: Checkpoint,
    factors: list[blocked.Factor],
    r0: int,
    r1: int,
    hook: blocked.BlockCheck | None = None,
) -> tuple[int, np.ndarray]:
    """Rows r0:r1 of a bf16/f32 matrix with plain LoRA merged by `blocked`, as (flat start,
    values), merged in place in the read buffer if it can; `hook` sees every block merged."""
    out_dtype = dtypes.to_numpy(plan.dtype)
    cols = matrix_shape(plan, plan.shape)[1]
    start, stop = r0 * cols, r1 * cols
    # in place, then written with no staging copy
    phase = (writer.position(plan.name) + start * out_dtype.itemsize) % ALIGN
    in_itemsize = dtypes.itemsize(base.tensors[plan.source].dtype)
    buffer = read_buffer((stop - start) * in_itemsize, phase)
    w0 = base.read_part(plan.source, start, stop, buffer)
    if not plan.lora:  # unchanged, a pickled tensor as it is, or a bare dtype change
        with np.errstate(all="ignore"):
            values = w0.astype(out_dtype, copy=False)
        if hook is not None:  # only ever unchanged (bfloat16 in and out)
            hook(r0, w0.reshape(r1 - r0, cols), values.reshape(r1 - r0, cols))
        return start, values
    w0 = w0.reshape(r1 - r0, cols)
    out = w0 if w0.dtype == out_dtype else np.empty(w0.shape, dtype=out_dtype)
    blocked.merge_rows(w0, factors, out, r0, kernels.rounding(), hook)
    return start, out
