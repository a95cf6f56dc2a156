#!/usr/bin/env python
"""CPU-seconds of one `loramerge merge`, split by stage, measured per thread.

Sampling profilers attribute wall-clock samples, which on a loaded machine counts threads that
wait for a core as busy. This runs the merge in process with each stage's function wrapped in
`time.thread_time()` (the calling thread's user + system CPU), so the split holds under load:

    python bench/cpu_split.py BASE ADAPTER OUT

Stages: start-up (imports), planning and checks, reading parts, the merge arithmetic (float32
widening, rank-r update, rounding: `blocked.merge_rows`, itself split into numpy's `copyto` and
`add`, which widen and sum, the compiled bfloat16 rounding, and `matmul`), writing (direct
writes, copies held for the hash; for a GGUF output the conversion to its type too), raw copies
of untouched tensors, the output's hash (on the hasher thread, or in a writer that hashes what
is due while it waits), finishing (fsync, record, rename). BASE may be a GGUF file (OUT
then a .gguf).
"""

from __future__ import annotations

import importlib
import resource
import sys
import threading
import time
from collections import defaultdict
from functools import wraps

start_cpu = time.process_time()
import numpy as np  # noqa: E402

from loramerge import blocked, execute, kernels  # noqa: E402
from loramerge.cli import main  # noqa: E402
from loramerge.sink import safetensors_writer  # noqa: E402
from loramerge.source import checkpoint  # noqa: E402

# the GGUF sinks only for a GGUF job: the command itself loads them (and gguf) only then
GGUF = any(path.endswith(".gguf") for path in sys.argv[1:4])
if GGUF:
    from loramerge.sink import gguf_file, gguf_rewrite

cpu: dict[str, float] = defaultdict(float)
CONVERSIONS = "  of which: widening, sums and rounding (copyto, add, compiled rounding)"
WRITING = "writing parts (conversion, direct I/O, held copies)"
HASH = "hash of the output (hasher thread, writers waiting for it)"
lock = threading.Lock()
local = threading.local()


def timed(stage: str, function):
    """`function`, its callers' thread CPU added to `stage` (nested calls counted once)."""

    @wraps(function)
    def wrapper(*args, **kwargs):
        if getattr(local, "stage", None):
            return function(*args, **kwargs)
        local.stage = stage
        before = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent = time.thread_time() - before
            local.stage = None
            with lock:
                cpu[stage] += spent

    return wrapper


def inner(stage: str, function, apart: bool = False):
    """A function called inside a timed stage, its CPU counted in `stage` as well (a line of
    that stage's split), or, `apart`, instead (taken out of the stage it is called in)."""

    @wraps(function)
    def wrapper(*args, **kwargs):
        before = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent = time.thread_time() - before
            with lock:
                cpu[stage] += spent
                if apart and getattr(local, "stage", None):
                    cpu[local.stage] -= spent

    return wrapper


def run() -> None:
    """Patch, run the CLI, print the table."""
    cpu["start-up (imports)"] = time.process_time() - start_cpu
    blocked.np = _NumpyView()
    blocked.merge_rows = timed("merge arithmetic", blocked.merge_rows)
    execute.blocked = blocked
    checkpoint.Checkpoint.read_part = timed("reading parts", checkpoint.Checkpoint.read_part)
    writers = [safetensors_writer.SafetensorsWriter]
    copiers = [safetensors_writer.SafetensorsWriter]
    if GGUF:
        writers.append(gguf_file.BlockSink)
        copiers.append(gguf_rewrite.GGUFRewrite)
    for writer in writers:
        writer.write = timed(WRITING, writer.write)
    for writer in copiers:
        writer.copy = timed("raw copies of untouched tensors", writer.copy)
    rounding = kernels._Bfloat16Rounding
    rounding.round = inner(CONVERSIONS, rounding.round)
    rounding.round_sum = inner(CONVERSIONS, rounding.round_sum)
    hasher = safetensors_writer.PrefixHasher
    # the hasher's loop, on its thread or in a writer that waits for it
    hasher._help = inner(HASH, hasher._help, apart=True)
    original = execute.write_tensors
    main_before = {}

    def write_tensors(*args, **kwargs):
        main_before["cpu"] = time.thread_time()
        cpu["planning and checks"] = time.process_time() - start_cpu - cpu["start-up (imports)"]
        try:
            return original(*args, **kwargs)
        finally:
            main_before["after"] = time.thread_time()

    execute.write_tensors = write_tensors
    importlib.import_module("loramerge.merge").write_tensors = write_tensors
    base, adapter, out = sys.argv[1:4]
    sys.argv = ["loramerge", "merge", base, adapter, "-o", out, "--quiet"]
    wall = time.perf_counter()
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
    wall = time.perf_counter() - wall
    cpu["finishing (fsync, record, rename)"] = time.thread_time() - main_before["after"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    inside = cpu[CONVERSIONS] + cpu["  of which: rank-r update (matmul)"]
    cpu["  of which: accumulate and loop"] = cpu["merge arithmetic"] - inside
    order = ["start-up (imports)", "planning and checks", "reading parts", "merge arithmetic"]
    order += [k for k in cpu if k.startswith("  ")] + [k for k in cpu if k not in order]
    print("| stage | CPU-s | share |\n|---|---|---|")
    for stage in dict.fromkeys(order):
        seconds = cpu[stage]
        print(f"| {stage} | {seconds:.2f} | {seconds / total:.0%} |")
    counted = sum(v for k, v in cpu.items() if not k.startswith("  "))
    print(f"| other (threads' bookkeeping, hash waits' wake-ups) | {total - counted:.2f} | |")
    print(f"| **total** (user {usage.ru_utime:.2f} + system {usage.ru_stime:.2f}) | {total:.2f} |")
    print(f"wall {wall:.2f} s from the command's start")


class _NumpyView:
    """numpy as `blocked` sees it, with copyto, add and matmul timed."""

    copyto = staticmethod(inner(CONVERSIONS, np.copyto))
    add = staticmethod(inner(CONVERSIONS, np.add))
    matmul = staticmethod(inner("  of which: rank-r update (matmul)", np.matmul))

    def __getattr__(self, name):
        return getattr(np, name)


if __name__ == "__main__":
    run()
