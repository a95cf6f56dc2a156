"""Benchmark: `loramerge extract` beside `mergekit-extract-lora`, wall time and peak memory.

Uses bench/merge.py's TinyLlama-shaped fixture (built once under --workdir) and its loramerge
merge of the r=16 adapter (154 modules at 22 layers) as the fine-tuned model, then runs each
tool as a separate process at rank 16 and reports wall seconds, CPU seconds and peak RSS
(`os.wait4`) and the load average around each run. mergekit runs only when `--mergekit` names
its `mergekit-extract-lora` (install it in its own venv: `pip install torch==2.13.0
mergekit==0.1.5`); loramerge then runs once before and once after it, so a change of load on a
shared machine shows. Outputs and the log go under `--out` (default: the workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as fixture  # noqa: E402  (bench/merge.py: fixture builder and helpers)
import runner  # noqa: E402  (bench/runner.py: measuring a child process)


def measure(command: str, log: Path) -> dict:
    """Run a shell command; wall and CPU seconds, peak RSS (MiB), exit code."""
    run = runner.measure(["sh", "-c", command], log, runner.child_env())
    return {
        "seconds": round(run.seconds, 2),
        "cpu_seconds": round(run.cpu_seconds, 2),
        "peak_rss_mib": round(run.rss_kib / 1024, 1),
        "returncode": run.returncode,
    }


def main() -> None:
    """Build or reuse the fixture and its merge, run each tool, print and save the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=fixture.DEFAULT_WORKDIR)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mergekit", help="path of mergekit-extract-lora (its own venv)")
    p.add_argument("--out", type=Path, help="where outputs and the log go (default: --workdir)")
    p.add_argument("--json", type=Path, help="write results as JSON here")
    args = p.parse_args()
    margs, base, adapter = fixture.prepared_fixture(args.workdir, args.layers)
    if args.out:
        margs.outdir = args.out
    fixture.ensure_merged(margs, base, adapter, runner.child_env())
    merged = fixture.merged_copy(margs, base)
    q = shlex.quote
    commands = {
        "loramerge": f"{margs.loramerge_cmd} extract {q(str(merged))} --base {q(str(base))} "
        f"--rank {args.rank} -o {{out}}"
    }
    if args.mergekit:
        commands["mergekit"] = (
            f"{q(args.mergekit)} --model {q(str(merged))} --base-model {q(str(base))} "
            f"--out-path {{out}} --max-rank {args.rank}"
        )
    where = args.out or margs.workdir
    log = where / "logs" / "extract.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    order = ["loramerge", "mergekit", "loramerge"] if args.mergekit else ["loramerge"]
    results = []
    for tool in order:
        out = where / f"extract-{tool}"
        shutil.rmtree(out, ignore_errors=True)
        runner.warm_cache(merged)
        command = commands[tool].format(out=q(str(out)))
        load = os.getloadavg()[0]
        run = {"tool": tool, "command": command, **measure(command, log)}
        run["load_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        results.append(run)
        print(f"{tool:<10} {json.dumps(run)}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
