"""Benchmark: `loramerge export-adapter` beside llama.cpp's `convert_lora_to_gguf.py`.

Uses bench/merge.py's TinyLlama-shaped fixture (built once under --workdir): the r=16 adapter on
all 7 projections of every layer (154 modules at 22 layers) on its bf16 base. Both tools write an
F32 GGUF LoRA adapter; they run as separate processes, interleaved round by round, and each run
reports wall seconds, CPU seconds and peak RSS (`os.wait4`). The converter is the one shipped in
the llama-cpp-python 0.3.36 sdist (the tests fetch it into .venv/ggml-ref-0.3.36, see
tests/ggml_ref.py; or pass --converter).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as fixture  # noqa: E402  (bench/merge.py: fixture builder and helpers)
import runner  # noqa: E402  (bench/runner.py: measuring a child process)
from extract import measure  # noqa: E402  (wall, CPU seconds and peak RSS of one command)

CONVERTER = fixture.REPO / ".venv" / "ggml-ref-0.3.36" / "llama.cpp" / "convert_lora_to_gguf.py"


def main() -> None:
    """Build or reuse the fixture, run both tools `--repeat` times interleaved, print medians."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=fixture.DEFAULT_WORKDIR)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/loramerge-bench/export-adapter"),
        help="where outputs go",
    )
    p.add_argument("--converter", type=Path, default=CONVERTER)
    p.add_argument("--json", type=Path, help="write results as JSON here")
    args = p.parse_args()
    margs, base, adapter = fixture.prepared_fixture(args.workdir, args.layers)
    q = shlex.quote
    commands = {
        "loramerge": f"{margs.loramerge_cmd} export-adapter {q(str(adapter))} --base "
        f"{q(str(base))} -o {{out}} --quiet",
        "convert_lora_to_gguf.py": f"{q(sys.executable)} {q(str(args.converter))} "
        f"{q(str(adapter))} --base {q(str(base))} --outfile {{out}} --outtype f32",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "export-adapter.log"
    runs: dict[str, list[dict]] = {tool: [] for tool in commands}
    runner.warm_cache(adapter)
    for _ in range(args.repeat):
        for tool, command in commands.items():
            out = args.out / f"{tool}.gguf"
            out.unlink(missing_ok=True)
            subprocess.run(["sync"], check=True)
            run = measure(command.format(out=q(str(out))), log)
            if run["returncode"]:
                raise SystemExit(f"{tool} failed (exit {run['returncode']}); see {log}")
            run["out_bytes"] = out.stat().st_size
            runs[tool].append(run)
            print(f"{tool:<24} {json.dumps(run)}", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {
        "load": load,
        "machine": fixture.machine_facts(),
        "tools": {
            tool: {
                "command": commands[tool].format(out="OUT.gguf"),
                **{
                    key: statistics.median(r[key] for r in tool_runs)
                    for key in ("seconds", "cpu_seconds", "peak_rss_mib")
                },
                "runs": tool_runs,
            }
            for tool, tool_runs in runs.items()
        },
    }
    for tool, row in results["tools"].items():
        print(
            f"median {tool:<24} wall {row['seconds']:.2f} s  CPU {row['cpu_seconds']:.2f} s  "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB"
        )
    print(load)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    for tool in commands:
        (args.out / f"{tool}.gguf").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
