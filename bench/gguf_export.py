#!/usr/bin/env python
"""Benchmark: HF checkpoint -> GGUF with loramerge beside llama.cpp's own tools, in one run.

The 22-layer TinyLlama-shaped checkpoint of bench/merge.py (built once under --workdir) with the
llama fixture's tokenizer beside it (hard links, no copy), exported as Q8_0, BF16 and Q4_K_M:

- `loramerge quantize MODEL -o OUT.gguf --to gguf --gguf-type T` (and `merge` with the adapter);
- llama.cpp's `convert_hf_to_gguf.py` from the llama-cpp-python 0.3.36 sdist (Q8_0, BF16), run by
  tests/hf_to_gguf_runner.py, which skips the vocabulary (the only change to the converter);
- for Q4_K_M, `llama_model_quantize` from the installed llama-cpp-python (the library function
  the `llama-quantize` tool is a thin CLI for; nthread 0 = all cores, the tool's default) on the
  converter's BF16 GGUF, written untimed beforehand.

Every tool runs as its own process, interleaved, repeats in turn; wall seconds, CPU seconds and
peak RSS come from bench/runner.py (os.wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import merge as fixture
import runner

QUANTIZE_SCRIPT = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""

WARM_KERNELS = """
import numpy as np
from loramerge.quant import ggml
for qtype in ggml.SUPPORTED:
    ggml.quantize(np.ones((1, 256), np.float32), qtype)
"""

SOURCES_SCRIPT = (
    "import sys; sys.path.insert(0, 'tests'); import ggml_ref; print(ggml_ref.sources())"
)

TOKENIZER = runner.REPO / "fixtures" / "llama-base"
TOOLS = [
    "loramerge-q8_0",
    "converter-q8_0",
    "loramerge-bf16",
    "converter-bf16",
    "loramerge-q4_k_m",
    "llama-quantize-q4_k_m",
    "merge-q8_0",
    "merge-q4_k_m",
]
PAIRS = [  # (loramerge, llama.cpp, target: llama.cpp time / loramerge time at least)
    ("loramerge-q8_0", "converter-q8_0", 3.0),
    ("loramerge-bf16", "converter-bf16", 3.0),
    ("loramerge-q4_k_m", "llama-quantize-q4_k_m", 1.0),
]


def model_folder(base: Path, out: Path) -> Path:
    """The benchmark checkpoint with the fixture tokenizer beside it (shards hard-linked)."""
    out.mkdir(parents=True, exist_ok=True)
    for src in [*base.iterdir(), TOKENIZER / "tokenizer.json", TOKENIZER / "tokenizer_config.json"]:
        dst = out / src.name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    return out


def commands(args: argparse.Namespace, model: Path, adapter: Path, bf16: Path) -> dict[str, str]:
    """Shell command of each tool; `{out}` is the output file."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    py = q(sys.executable)
    lm = f"{py} -m loramerge"
    conv = f"{py} tests/hf_to_gguf_runner.py {q(args.sources)} {q(model)}"
    script = args.out_dir / "llama_quantize.py"
    script.write_text(QUANTIZE_SCRIPT.lstrip())
    sync = " && sync"
    return {
        "loramerge-q8_0": f"{lm} quantize {q(model)} -o {{out}} --to gguf --gguf-type q8_0 --quiet",
        "converter-q8_0": f"{conv}=q8_0={{out}}{sync}",
        "loramerge-bf16": f"{lm} quantize {q(model)} -o {{out}} --to gguf --gguf-type bf16 --quiet",
        "converter-bf16": f"{conv}=bf16={{out}}{sync}",
        "loramerge-q4_k_m": f"{lm} quantize {q(model)} -o {{out}} --to gguf "
        "--gguf-type q4_k_m --quiet",
        "llama-quantize-q4_k_m": f"{py} {q(script)} {q(bf16)} {{out}}{sync}",
        "merge-q8_0": f"{lm} merge {q(model)} {q(adapter)} -o {{out}} --to gguf "
        "--gguf-type q8_0 --quiet",
        "merge-q4_k_m": f"{lm} merge {q(model)} {q(adapter)} -o {{out}} --to gguf "
        "--gguf-type q4_k_m --quiet",
    }


def shell(command: str, log: Path, out: Path) -> runner.Run:
    """Measure one shell command writing `out` (loramerge from src/)."""
    argv = ["sh", "-c", command.format(out=shlex.quote(str(out)))]
    return runner.measure(argv, log, runner.child_env())


def main() -> None:
    """Prepare the inputs, run every tool in turn `--repeat` times, print and save the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=fixture.DEFAULT_WORKDIR)
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/loramerge-gguf-bench"))
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    p.add_argument("--settle", type=float, default=0.0, help="seconds to wait before each run")
    p.add_argument("--json", type=Path, help="write results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the outputs (0.6-2.2 GB each)")
    args = p.parse_args()
    margs = fixture.parse_args(["--workdir", str(args.workdir), "--layers", str(args.layers)])
    fixture.ensure_fixture(margs, args.layers)
    root = margs.workdir / f"L{args.layers}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = args.out_dir / "gguf-bench.log"
    log.write_text("")
    model = model_folder(root / "base", args.out_dir / "model")
    done = subprocess.run(
        [sys.executable, "-c", SOURCES_SCRIPT], capture_output=True, text=True, cwd=runner.REPO
    )
    if done.returncode:
        sys.exit(f"llama.cpp sources unavailable: {done.stderr[-500:]}")
    args.sources = Path(done.stdout.strip().splitlines()[-1])
    bf16 = args.out_dir / "converter-bf16-input.gguf"
    cmds = commands(args, model, root / "adapter", bf16)
    if "llama-quantize-q4_k_m" in args.tools and not bf16.exists():
        print("writing the converter's BF16 GGUF (untimed input of llama-quantize) ...", flush=True)
        if shell(cmds["converter-bf16"], log, bf16).returncode:
            sys.exit(f"converter failed, see {log}")
    out = args.out_dir / "out.gguf"
    # untimed: page cache warm, numba's compiled K-quant kernels cached (first run compiles them)
    runner.warm_cache(model)
    runner.warm_cache(bf16)
    shell(f"{shlex.quote(sys.executable)} -c {shlex.quote(WARM_KERNELS)}", log, out)
    runs: dict[str, list[runner.Run]] = {t: [] for t in args.tools}
    loads: list[float] = []  # the 1-minute load average before each run
    for rep in range(args.repeat):
        for tool in args.tools:
            runner.settle(out, args.settle)
            loads.append(os.getloadavg()[0])
            with open(log, "a") as f:
                f.write(f"\n=== {tool} repeat {rep + 1}\n")
            run = shell(cmds[tool], log, out)
            runs[tool].append(run)
            size = out.stat().st_size if out.exists() else 0
            print(
                f"  {tool:<22} repeat {rep + 1}: {run.seconds:7.2f} s wall "
                f"{run.cpu_seconds:7.2f} s CPU {run.rss_kib / 1024:7.1f} MiB "
                f"rc={run.returncode} {size / 2**20:.0f} MiB out",
                flush=True,
            )
    runner.settle(out, 0)
    if not args.keep:
        bf16.unlink(missing_ok=True)
        shutil.rmtree(model)  # hard links (or, across file systems, a copy)
    rows = {
        tool: {
            "seconds": statistics.median(r.seconds for r in rr),
            "cpu_seconds": statistics.median(r.cpu_seconds for r in rr),
            "peak_rss_mib": statistics.median(r.rss_kib for r in rr) / 1024,
            "failed": sum(r.returncode != 0 for r in rr),
            "command": cmds[tool],
        }
        for tool, rr in runs.items()
        if rr
    }
    print(f"\n{'tool':<22} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}")
    for tool, row in rows.items():
        print(
            f"{tool:<22} {row['seconds']:8.2f} {row['cpu_seconds']:8.2f} "
            f"{row['peak_rss_mib']:13.1f}{'  FAILED' if row['failed'] else ''}"
        )
    print()
    for ours, theirs, target in PAIRS:
        if ours in rows and theirs in rows:
            a, b = rows[ours], rows[theirs]
            speed, cpu = b["seconds"] / a["seconds"], b["cpu_seconds"] / a["cpu_seconds"]
            print(
                f"{theirs} / {ours}: wall {speed:.2f}x (target >= {target:g}x: "
                f"{'met' if speed >= target else 'NOT met'}), CPU {cpu:.2f}x, "
                f"peak RSS {a['peak_rss_mib']:.0f} vs {b['peak_rss_mib']:.0f} MiB"
            )
    facts: dict = {"load_before_runs": [round(v, 2) for v in loads]}
    facts["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    with open("/proc/cpuinfo") as f:
        facts["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "?")
    facts["cores"] = len(os.sched_getaffinity(0))
    print(
        f"\nCPU: {facts['cpu']} x {facts['cores']}; "
        f"1-minute load average before each run: {facts['load_before_runs']}"
    )
    print(f"at the end: {facts['uptime']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": facts, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
