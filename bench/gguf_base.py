"""Benchmark: merging into a GGUF base (BF16 and Q4_K_M) beside a durable copy of that base.

Uses bench/merge.py's TinyLlama-shaped fixture (built by `bench/merge.py --build-only` under
--workdir; r=16 adapter, 154 modules at 22 layers). Its GGUF bases are written once by
`loramerge quantize --to gguf` (the fixture has no tokenizer, so the test fixture's 384-token one
is borrowed and padded to 32000 entries). Then, interleaved over --repeat rounds, each as a
separate process: `cp BASE OUT && sync` (the floor: every byte read and written durably) and
`loramerge merge BASE ADAPTER -o OUT`, reporting wall and CPU seconds and peak RSS (`os.wait4`),
with the load average at the start.

The peer a user has today is llama.cpp's `llama-export-lora` (which writes F16 for every tensor
it touches), followed for a Q4_K_M result by `llama-quantize --allow-requantize`. Neither is
built here (llama-cpp-python builds the library, not the tools), so they are left out rather
than estimated; the issue's figures for them were measured on another machine.
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
from extract import measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "fixtures" / "llama-base"


def ensure_bases(
    margs: argparse.Namespace, base: Path, out: Path, kinds: list[str]
) -> dict[str, Path]:
    """The GGUF bases (`--gguf-type` names) of the fixture, written once."""
    view = out / "base-with-tokenizer"
    if not view.is_dir():
        view.mkdir(parents=True)
        for f in base.iterdir():
            os.link(f, view / f.name)  # same file system; the index checks shards lie inside
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
            run = measure(command, out / "build.log")
            assert run["returncode"] == 0, (out / "build.log").read_text()[-2000:]
            print(f"built {path.name}: {run}")
        bases[kind] = path
    return bases


def main() -> None:
    """Build or reuse the fixture and its GGUF bases, run each command, print and save."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=fixture.DEFAULT_WORKDIR)
    p.add_argument(
        "--out", type=Path, help="where the GGUF bases and outputs go (default: under --workdir)"
    )
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--bases", default="bf16,q4_k_m", help="GGUF base types, comma-separated")
    p.add_argument("--json", type=Path, help="write results as JSON here")
    args = p.parse_args()
    margs = fixture.parse_args(["--workdir", str(args.workdir), "--layers", str(args.layers)])
    root = margs.workdir / f"L{args.layers}"
    if not (root / "fixture.json").is_file():
        sys.exit(f"no fixture at {root}: build it with bench/merge.py --build-only first")
    out = args.out or margs.workdir / f"L{args.layers}-gguf"
    out.mkdir(parents=True, exist_ok=True)
    bases = ensure_bases(margs, root / "base", out, args.bases.split(","))
    adapter = root / "adapter"
    q = shlex.quote
    results: list[dict] = []
    for round_ in range(args.repeat):
        for kind, base in bases.items():
            target = out / f"out-{kind}.gguf"
            commands = {
                "copy": f"cp {q(str(base))} {q(str(target))} && sync",
                "loramerge": f"{margs.loramerge_cmd} merge {q(str(base))} {q(str(adapter))} "
                f"-o {q(str(target))} --quiet",
            }
            for tool, command in commands.items():
                target.unlink(missing_ok=True)
                os.sync()
                load = os.getloadavg()[0]
                run = measure(command, out / f"{tool}-{kind}.log")
                assert run["returncode"] == 0, (out / f"{tool}-{kind}.log").read_text()[-2000:]
                row = {"round": round_, "base": kind, "tool": tool, "load": round(load, 1), **run}
                results.append(row)
                print(json.dumps(row))
            target.unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": fixture.machine_facts(), "rows": results}))


if __name__ == "__main__":
    main()
