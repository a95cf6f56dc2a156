#!/usr/bin/env python
"""How busy one loramerge command keeps the cores while its pass runs: thread states, sampled.

Runs the command in process and, while `write_tensors` runs, reads every thread's state from
`/proc/self/task/*/stat` every few milliseconds (Linux only). It prints the share of samples
with none, one, or two or more threads runnable (`R`: on a core or waiting for one), and the
count of each state seen (`S`: sleeping, a lock or a condition; `D`: in the kernel, a direct
write):

    python bench/thread_states.py merge BASE ADAPTER -o OUT --quiet
    python bench/thread_states.py rebase MERGED --remove A --add A --base BASE -o OUT --quiet

On two cores, samples with fewer than two runnable threads are time a core could have worked.
The sampling thread leaves itself out; the main thread waits for the workers and counts as `S`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
from collections import Counter

from loramerge import execute
from loramerge.cli import run

INTERVAL = 0.003  # seconds between samples
merge_module = importlib.import_module("loramerge.merge")  # (the package exports a `merge` too)


def main() -> None:
    runnable, states = Counter(), Counter()
    sampling, done = threading.Event(), threading.Event()

    def sample() -> None:
        me = str(threading.get_native_id())
        while not done.is_set():
            if sampling.wait(INTERVAL):
                seen = [_state(tid) for tid in os.listdir("/proc/self/task") if tid != me]
                states.update(s for s in seen if s)
                runnable[min(seen.count("R"), 2)] += 1
                time.sleep(INTERVAL)

    write_tensors = execute.write_tensors

    def watched(*args, **kwargs):
        sampling.set()
        try:
            return write_tensors(*args, **kwargs)
        finally:
            sampling.clear()

    merge_module.write_tensors = watched
    threading.Thread(target=sample, daemon=True).start()
    sys.argv = ["loramerge", *sys.argv[1:]]
    start = time.perf_counter()
    with contextlib.suppress(SystemExit):  # the command's exit status is not this script's
        run()
    done.set()
    total = sum(runnable.values()) or 1
    shares = ", ".join(
        f"{label}: {runnable[k] / total:.0%}" for k, label in [(0, "none"), (1, "one"), (2, "2+")]
    )
    print(f"wall {time.perf_counter() - start:.2f} s; runnable threads during the pass: {shares}")
    print(f"states seen: {dict(states)} in {sum(runnable.values())} samples")


def _state(tid: str) -> str:
    """A thread's one-letter state, or "" when it has just ended."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


if __name__ == "__main__":
    main()
