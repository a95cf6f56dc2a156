"""Benchmark: merging into a GGUF base (BF16 and Q4_K_M), loramerge beside llama.cpp's tools.

Uses bench/merge.py's TinyLlama-shaped fixture (built by `bench/merge.py --build-only` under
--workdir; r=16 adapter, 154 modules at 22 layers). Its GGUF bases are written once by
`loramerge quantize --to gguf` (the fixture has no tokenizer, so the test fixture's 384-token one
is borrowed and padded to 32000 entries), and so is the GGUF LoRA adapter llama.cpp's tool takes
(`loramerge export-adapter`, F32: the adapter is plain LoRA, so its pairs are exactly those of
llama.cpp's `convert_lora_to_gguf.py`, whose B carries no scale but whose alpha gives the same 2).

Then, interleaved over --repeat rounds, each as a separate process, per base:
- `cp BASE OUT && sync`: the floor, every byte read and written durably;
- `loramerge merge BASE ADAPTER -o OUT`: every type kept;
- `llama-export-lora -m BASE --lora ADAPTER.gguf -o OUT`: what llama.cpp offers (it writes F16
  for every tensor it touches);
- for a quantized base, the chain a user needs today for a result of the base's type:
  `llama-export-lora` then `llama-quantize --allow-requantize F16OUT OUT TYPE` (one process tree).
Each row: wall and CPU seconds and peak RSS (`os.wait4`; for the chain the largest of its two
processes), the load average at the start, the output's size and tensor types (`loramerge
inspect --json`, in a child). llama.cpp's tools come from `bench/build_llama_tools.sh`; pass its
bin folder as --llama-bin (without it they are skipped, with a message saying so).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as fixture  # noqa: E402  (bench/merge.py: fixture builder and helpers)
import runner  # noqa: E402  (bench/runner.py: measuring a child process)
from extract import measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "fixtures" / "llama-base"
LLAMA_TYPES = {"q4_k_m": "Q4_K_M", "q8_0": "Q8_0"}  # llama-quantize's names of our base types


def ensure_bases(
    margs: argparse.Namespace, base: Path, out: Path, kinds: list[str]
) -> dict[str, Path]:
    """The GGUF bases (`--gguf-type` names) of the fixture, written once."""
    view = out / "base-with-tokenizer"
    if not view.is_dir():
        view.mkdir(parents=True)
        for f in base.iterdir():
            try:
                os.link(f, view / f.name)  # the index checks shards lie inside
            except OSError:
                os.symlink(f, view / f.name)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER / name, view / name)
    bases = {}
    for kind in kinds:
        path = out / f"base-{kind}.gguf"
        if not path.is_file():
            command = (
                f"{margs.loramerge_cmd} quantize {shlex.quote(str(view))} -o "
                f"{shlex.quote(str(path))} --to gguf --gguf-type {kind} --quiet"
            )
            built(measure(command, out / "build.log"), out, path)
        bases[kind] = path
    return bases


def ensure_lora(margs: argparse.Namespace, adapter: Path, base: Path, out: Path) -> Path:
    """The adapter as an F32 GGUF LoRA adapter (llama-export-lora's input), written once."""
    path = out / "adapter-f32.gguf"
    if not path.is_file():
        q = shlex.quote
        command = (
            f"{margs.loramerge_cmd} export-adapter {q(str(adapter))} --base {q(str(base))} "
            f"-o {q(str(path))} --quiet"
        )
        built(measure(command, out / "build.log"), out, path)
    return path


def built(run: dict, out: Path, path: Path) -> None:
    """Stop with the log's tail if building `path` failed."""
    if run["returncode"]:
        sys.exit(f"building {path} failed:\n" + (out / "build.log").read_text()[-2000:])
    print(f"built {path.name}: {run}", flush=True)


def llama_tools(bin_dir: Path | None) -> tuple[Path, Path] | None:
    """(llama-export-lora, llama-quantize) in bin_dir, or None with the reason printed."""
    if bin_dir is None:
        print("llama.cpp tools skipped: pass --llama-bin DIR (bench/build_llama_tools.sh)")
        return None
    tools = (bin_dir / "llama-export-lora", bin_dir / "llama-quantize")
    missing = [str(t) for t in tools if not os.access(t, os.X_OK)]
    if missing:
        built_by = "bench/build_llama_tools.sh"
        print(f"llama.cpp tools skipped: {', '.join(missing)} not built ({built_by})")
        return None
    return tools


def commands(
    margs: argparse.Namespace,
    kind: str,
    base: Path,
    adapter: Path,
    lora: Path,
    tools: tuple[Path, Path] | None,
    target: Path,
) -> dict[str, str]:
    """The shell command of each tool for one base, writing `target`."""
    q = shlex.quote
    threads = len(os.sched_getaffinity(0))
    rows = {
        "copy": f"cp {q(str(base))} {q(str(target))} && sync",
        "loramerge": f"{margs.loramerge_cmd} merge {q(str(base))} {q(str(adapter))} "
        f"-o {q(str(target))} --quiet",
    }
    if tools is None:
        return rows
    export_lora, quantize = (q(str(t)) for t in tools)
    export = f"{export_lora} -m {q(str(base))} --lora {q(str(lora))} -t {threads}"
    rows["llama-export-lora"] = f"{export} -o {q(str(target))}"
    if kind in LLAMA_TYPES:
        f16 = q(str(target.with_suffix(".f16.gguf")))
        rows["llama-export-lora + llama-quantize"] = (
            f"{export} -o {f16} && {quantize} --allow-requantize {f16} {q(str(target))} "
            f"{LLAMA_TYPES[kind]} {threads} && rm {f16}"
        )
    return rows


def describe(margs: argparse.Namespace, path: Path) -> dict:
    """The output's size and how many tensors of each type (`loramerge inspect --json`)."""
    result = subprocess.run(
        [*shlex.split(margs.loramerge_cmd), "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        env=runner.child_env(),
        cwd=REPO,
    )
    types = json.loads(result.stdout)["tensor_types"] if result.returncode == 0 else result.stderr
    return {"out_bytes": path.stat().st_size, "out_types": types}


def main() -> None:
    """Build or reuse the fixture, its GGUF bases and adapter, run each command, print, save."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=fixture.DEFAULT_WORKDIR)
    p.add_argument(
        "--out", type=Path, help="where the GGUF bases and outputs go (default: under --workdir)"
    )
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--bases", default="bf16,q4_k_m", help="GGUF base types, comma-separated")
    p.add_argument("--llama-bin", type=Path, help="folder with llama-export-lora, llama-quantize")
    p.add_argument("--tools", help="run only these tools (comma-separated row names)")
    p.add_argument("--json", type=Path, help="write results as JSON here")
    args = p.parse_args()
    margs = fixture.parse_args(["--workdir", str(args.workdir), "--layers", str(args.layers)])
    root = margs.workdir / f"L{args.layers}"
    if not (root / "fixture.json").is_file():
        sys.exit(f"no fixture at {root}: build it with bench/merge.py --build-only first")
    out = args.out or margs.workdir / f"L{args.layers}-gguf"
    out.mkdir(parents=True, exist_ok=True)
    adapter = root / "adapter"
    bases = ensure_bases(margs, root / "base", out, args.bases.split(","))
    lora = ensure_lora(margs, adapter, root / "base", out)
    tools = llama_tools(args.llama_bin)
    wanted = set(args.tools.split(",")) if args.tools else None
    results: list[dict] = []
    for round_ in range(args.repeat):
        for kind, base in bases.items():
            runner.warm_cache(base)
            target = out / f"out-{kind}.gguf"
            for tool, command in commands(margs, kind, base, adapter, lora, tools, target).items():
                if wanted is not None and tool not in wanted:
                    continue
                target.unlink(missing_ok=True)
                os.sync()
                load = os.getloadavg()[0]
                log = out / f"{tool.replace(' ', '')}-{kind}.log"
                run = measure(command, log)
                if run["returncode"]:
                    sys.exit(f"{tool} failed on {kind}:\n" + log.read_text()[-2000:])
                row = {"round": round_, "base": kind, "tool": tool, "load": round(load, 1), **run}
                if tool != "copy":
                    row.update(describe(margs, target))
                results.append(row)
                print(json.dumps(row), flush=True)
            target.unlink(missing_ok=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(uptime)
    if args.json:
        facts = {**fixture.machine_facts(), "cpu": cpu_model()}
        args.json.write_text(
            json.dumps({"machine": facts, "uptime_at_end": uptime, "rows": results}, indent=1)
        )


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")


if __name__ == "__main__":
    main()
