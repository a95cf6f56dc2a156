"""What every benchmark here shares: run a tool as a child process and measure it.

Wall seconds, CPU seconds and peak RSS come from `os.wait4` (`ru_maxrss`, KiB on Linux). A
child's ru_maxrss includes the RSS of the process that spawned it (the kernel carries the old
address space's high-water mark across exec), so the orchestrators import neither numpy nor
torch and read files through a small buffer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """One measured process: wall seconds, peak RSS, exit status and CPU seconds."""

    seconds: float
    rss_kib: int
    returncode: int
    cpu_seconds: float = 0.0


def measure(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run argv as a child (output appended to log); wall, CPU and peak RSS from os.wait4."""
    with open(log, "ab") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return Run(seconds, usage.ru_maxrss, proc.returncode, cpu)


def child_env() -> dict[str, str]:
    """Environment for tool runs: repo's src/ on PYTHONPATH so an uninstalled loramerge imports,
    its bytecode compiled as pip compiles an installed package's (with PYTHONDONTWRITEBYTECODE
    set, a checkout would compile every module again at every start: 0.08-0.16 CPU-s)."""
    env = dict(os.environ)
    src = REPO / "src"
    if src.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
        compile_all = [sys.executable, "-m", "compileall", "-q", str(src)]
        subprocess.run(compile_all, check=True, stdout=subprocess.DEVNULL)
    return env


def warm_cache(path: Path) -> None:
    """Read every file once so all tools start from a warm page cache."""
    buf = bytearray(1 << 20)  # small buffer: this process's RSS is every child's ru_maxrss floor
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def settle(out: Path, seconds: float) -> None:
    """Remove an output, flush dirty pages and wait, untimed, so runs do not disturb each other.

    The wait matters on VMs that hand freed memory back to the host (virtio-balloon free page
    reporting, about 2 s after it is freed): memory touched again after that is slow to fault
    in, so a run that starts right after the previous output was deleted, and finishes within
    2 s, gets faster page cache than one that starts later or runs longer. Waiting puts every
    run in the same (slower) state.
    """
    if out.is_dir():
        shutil.rmtree(out, ignore_errors=True)
    else:
        out.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)
    time.sleep(seconds)
