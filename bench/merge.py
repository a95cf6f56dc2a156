#!/usr/bin/env python
"""Benchmark loramerge against a durable copy and a PEFT merge on a TinyLlama-shaped checkpoint.

The orchestrator itself imports neither torch nor numpy (see bench/runner.py, which measures
every child). Building and verifying the fixtures run in child processes of this same file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner import REPO, Run, child_env, measure, settle, warm_cache

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "loramerge-bench"
BUILD_VERSION = 1  # bump when the fixture layout or values change

# TinyLlama-1.1B shape (num_hidden_layers is set per size).
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
HEAD_DIM = HIDDEN // HEADS
LORA_R, LORA_ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ST_DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}
DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "float16": 2}

PEFT_MERGE_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""

# The baseline for `quantize --to nf4`: read the same tensors, bitsandbytes' quantize_4bit on each
# Linear weight (what transformers quantizes), the rest as it is, one safetensors file written.
BNB_NF4_SCRIPT = """
import json, os, sys, time, torch
import bitsandbytes.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
base, out = sys.argv[1:3]
index = json.load(open(os.path.join(base, "model.safetensors.index.json")))["weight_map"]
state, inside = {}, 0.0
for shard in sorted(set(index.values())):
    with safe_open(os.path.join(base, shard), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            linear = ".layers." in name and t.dim() == 2 and "embed" not in name
            if not linear:
                state[name] = t
                continue
            start = time.perf_counter()
            packed, qs = F.quantize_4bit(
                t, blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            inside += time.perf_counter() - start
            state[name] = packed
            for key, value in qs.as_dict(packed=True).items():
                state[name + "." + key] = value
os.makedirs(out)
save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
print(f"seconds inside quantize_4bit: {inside:.2f}", file=sys.stderr)
"""

# --- fixture layout


@dataclass(frozen=True)
class Spec:
    """One tensor to write: name, shape, dtype name, and how to fill it."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "bfloat16"
    kind: str = "randn"  # "randn" or "ones"
    scale: float = 0.02

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each LoRA-targeted linear in one Llama layer."""
    kv = KV_HEADS * HEAD_DIM
    return {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }


def base_specs(layers: int) -> list[Spec]:
    """All base-model tensors in file order (embeddings, layers, final norm, lm_head)."""
    specs = [Spec("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs.append(Spec(p + "input_layernorm.weight", (HIDDEN,), kind="ones"))
        specs += [Spec(p + mod + ".weight", shape) for mod, shape in linear_shapes().items()]
        specs.append(Spec(p + "post_attention_layernorm.weight", (HIDDEN,), kind="ones"))
    specs.append(Spec("model.norm.weight", (HIDDEN,), kind="ones"))
    specs.append(Spec("lm_head.weight", (VOCAB, HIDDEN)))
    return specs


def adapter_specs(layers: int, dtype: str) -> list[Spec]:
    """All LoRA tensors in PEFT's on-disk naming: A is (r, in), B is (out, r), B non-zero."""
    specs = []
    for i in range(layers):
        for mod, (out_f, in_f) in linear_shapes().items():
            p = f"base_model.model.model.layers.{i}.{mod}."
            specs.append(Spec(p + "lora_A.weight", (LORA_R, in_f), dtype, scale=in_f**-0.5))
            specs.append(Spec(p + "lora_B.weight", (out_f, LORA_R), dtype, scale=0.01))
    return specs


def split_shards(specs: list[Spec], shards: int) -> list[list[Spec]]:
    """Split specs, in order, into `shards` contiguous groups of roughly equal bytes."""
    target = sum(s.nbytes for s in specs) / shards
    groups: list[list[Spec]] = [[]]
    acc = 0
    for s in specs:
        if acc >= target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(s)
        acc += s.nbytes
    return groups


def llama_config(layers: int) -> dict[str, Any]:
    """config.json for the TinyLlama-shaped model (both `torch_dtype` and `dtype` keys)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }


# --- building (child process)


def make_tensor(spec: Spec, seed: int) -> Any:
    """Materialise one tensor, seeded per name (same values at any layer count)."""
    import torch

    dtype = getattr(torch, spec.dtype)
    if spec.kind == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed ^ zlib.crc32(spec.name.encode()))
    return torch.randn(spec.shape, dtype=dtype, generator=gen).mul_(spec.scale)


def write_safetensors(path: Path, specs: list[Spec], seed: int) -> None:
    """Stream-write a safetensors file: header first, then one tensor at a time."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": ST_DTYPES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for s in specs:
            t = make_tensor(s, seed)
            f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
            del t
    os.replace(tmp, path)


def build_base(base: Path, layers: int, shards: int, seed: int) -> None:
    """Write the sharded bf16 checkpoint, its index and config.json."""
    base.mkdir(parents=True, exist_ok=True)
    specs = base_specs(layers)
    groups = split_shards(specs, shards)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(base / fname, group, seed)
        weight_map.update({s.name: fname for s in group})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    write_json(base / "model.safetensors.index.json", index)
    write_json(base / "config.json", llama_config(layers))


def build_adapter(adapter: Path, base: Path, layers: int, dtype: str, seed: int) -> None:
    """Write adapter_model.safetensors and adapter_config.json in PEFT's layout."""
    from peft import LoraConfig

    adapter.mkdir(parents=True, exist_ok=True)
    write_safetensors(adapter / "adapter_model.safetensors", adapter_specs(layers, dtype), seed + 1)
    LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    ).save_pretrained(str(adapter))


def verify_fixture(base: Path, adapter: Path, layers: int) -> None:
    """Load with transformers + PEFT and check every weight came from the files."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch.bfloat16, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers loading problems: {problems}"
    assert model.config.num_hidden_layers == layers
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    state = peft_model.state_dict()
    n = 0
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            live = state[key.replace(".weight", ".default.weight")]
            assert torch.equal(live.to(torch.float32), f.get_tensor(key).to(torch.float32)), key
            n += 1
    assert n == layers * len(TARGETS) * 2, n
    assert all(state[k].abs().sum() > 0 for k in state if "lora_B" in k)
    print(f"verified: transformers + PEFT load {layers} layers, {n} LoRA tensors match the files")


def write_json(path: Path, obj: Any) -> None:
    """Write pretty JSON with a trailing newline."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --- measuring (orchestrator)


@dataclass
class Row:
    """Median results of one tool at one size, plus the individual runs."""

    tool: str
    layers: int
    base_bytes: int
    command: str
    seconds: float | None = None
    rss_mib: float | None = None
    out_bytes: int | None = None
    note: str = ""
    runs: list[Run] = field(default_factory=list)


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under path."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def loramerge_available(cmd: list[str], env: dict[str, str]) -> tuple[bool, str]:
    """Whether `<cmd> --version` succeeds; returns (ok, version or error tail)."""
    res = subprocess.run(cmd + ["--version"], capture_output=True, text=True, env=env, cwd=REPO)
    text = (res.stdout + res.stderr).strip()
    return res.returncode == 0, text.splitlines()[-1] if text else f"exit {res.returncode}"


def tool_commands(args: argparse.Namespace, base: Path, adapter: Path, out: Path) -> dict[str, str]:
    """Shell command of each measured tool for one size (each is run as `sh -c CMD`)."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    peft_script = args.workdir / "peft_merge.py"
    peft_script.write_text(PEFT_MERGE_SCRIPT.lstrip())
    bnb_script = args.workdir / "bnb_nf4.py"
    bnb_script.write_text(BNB_NF4_SCRIPT.lstrip())
    lm = args.loramerge_cmd
    sync = " && sync" if args.sync_all else ""
    merged = merged_copy(args, base)
    return {
        "copy": f"cp -r {q(base)} {q(out)} && sync",
        # the same integrity record loramerge keeps: every output file's sha256
        "copy+sha256": f"cp -r {q(base)} {q(out)} && sync && openssl dgst -sha256 {q(out)}/* "
        "> /dev/null",
        "loramerge": f"{args.loramerge_cmd} merge {q(base)} {q(adapter)} -o {q(out)} --quiet{sync}",
        "peft": f"{q(sys.executable)} {q(peft_script)} {q(base)} {q(adapter)} {q(out)}{sync}",
        "verify": f"{lm} verify {q(merged)} --base {q(base)} --adapter {q(adapter)} --quiet",
        "merge-verify": f"{lm} merge {q(base)} {q(adapter)} -o {q(out)} --verify --quiet{sync}",
        # the record names the base, so the drift report runs
        "unmerge": f"{lm} unmerge {q(merged)} {q(adapter)} -o {q(out)} --quiet{sync}",
        "rebase-base": f"{lm} rebase {q(merged)} --remove {q(adapter)} --add {q(adapter)} "
        f"--base {q(base)} -o {q(out)} --quiet{sync}",
        "bnb-nf4": f"{q(sys.executable)} {q(bnb_script)} {q(base)} {q(out)}{sync}",
        "quantize-nf4": f"{lm} quantize {q(base)} -o {q(out)} --to nf4 --quiet{sync}",
        "merge-nf4": f"{lm} merge {q(base)} {q(adapter)} -o {q(out)} --to nf4 --quiet{sync}",
    }


def merged_copy(args: argparse.Namespace, base: Path) -> Path:
    """Where the candidate of the check rows (a loramerge merge of this size) is kept."""
    return args.outdir / f"{base.parent.name}-merged"


# The rows that read that candidate.
NEED_MERGED = ("verify", "unmerge", "rebase-base")


def ensure_merged(args: argparse.Namespace, base: Path, adapter: Path, env: dict[str, str]) -> None:
    """Merge once, untimed, so the check rows have a candidate."""
    target = merged_copy(args, base)
    if not (target / "loramerge.json").is_file():
        shutil.rmtree(target, ignore_errors=True)
        cmd = f"{args.loramerge_cmd} merge {shlex.quote(str(base))} {shlex.quote(str(adapter))}"
        subprocess.run(
            ["sh", "-c", f"{cmd} -o {shlex.quote(str(target))} --quiet"], check=True, env=env
        )


def bench_size(args: argparse.Namespace, layers: int, lm_ok: tuple[bool, str]) -> list[Row]:
    """Measure every selected tool at one size, interleaving repeats."""
    root = args.workdir / f"L{layers}"
    base, adapter, out = root / "base", root / "adapter", args.outdir / "out"
    log = args.outdir / "logs" / f"L{layers}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    env = child_env()
    cmds = tool_commands(args, base, adapter, out)
    base_bytes = tree_bytes(base)
    rows = {t: Row(t, layers, base_bytes, cmds[t]) for t in args.tools}
    for tool in ("loramerge", *NEED_MERGED, "merge-verify"):
        if tool in rows and not lm_ok[0]:
            rows[tool].note = f"skipped: `{args.loramerge_cmd} --version` failed ({lm_ok[1]})"
    warm_cache(base)
    warm_cache(adapter)
    if any(t in rows for t in NEED_MERGED) and lm_ok[0]:
        ensure_merged(args, base, adapter, env)
    for tool, row in rows.items():  # untimed warm-up: first touches of fresh VM memory are slow
        if args.warmup and not row.note.startswith("skipped"):
            settle(out, args.settle)
            measure(["sh", "-c", cmds[tool]], log, env)
    for rep in range(args.repeat):
        for tool, row in rows.items():
            if row.note.startswith("skipped"):
                continue
            settle(out, args.settle)
            with open(log, "a") as f:
                f.write(f"\n=== {tool} L{layers} repeat {rep + 1}\n")
            run = measure(["sh", "-c", cmds[tool]], log, env)
            row.runs.append(run)
            if run.returncode != 0:
                row.note = f"failed: exit {run.returncode} (see {log})"
            elif out.exists():
                row.out_bytes = tree_bytes(out)
            print(
                f"  L{layers} {tool:<9} repeat {rep + 1}: {run.seconds:7.2f} s "
                f"{run.rss_kib / 1024:8.1f} MiB rc={run.returncode}",
                flush=True,
            )
    settle(out, 0)
    for row in rows.values():
        ok = [r for r in row.runs if r.returncode == 0]
        if ok:
            row.seconds = statistics.median(r.seconds for r in ok)
            row.rss_mib = statistics.median(r.rss_kib for r in ok) / 1024
    return list(rows.values())


# --- fixtures (orchestrator side)


def ensure_fixture(args: argparse.Namespace, layers: int) -> dict[str, Any]:
    """Build (in a child) and verify the fixture for one size unless a matching one exists."""
    root = args.workdir / f"L{layers}"
    stamp = root / "fixture.json"
    want = {
        "version": BUILD_VERSION,
        "layers": layers,
        "shards": args.shards,
        "adapter_dtype": args.adapter_dtype,
        "seed": args.seed,
    }
    if stamp.exists() and not args.rebuild:
        info = json.loads(stamp.read_text())
        if info.get("params") == want:
            print(f"reusing fixture {root}")
            return info
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = [
        "--layers",
        str(layers),
        "--workdir",
        str(args.workdir),
        "--shards",
        str(args.shards),
        "--adapter-dtype",
        args.adapter_dtype,
        "--seed",
        str(args.seed),
    ]
    log = root / "build.log"
    print(f"building fixture {root} ...", flush=True)
    build = measure(me + ["--child", "build"] + common, log)
    if build.returncode:
        sys.exit(f"fixture build failed, see {log}")
    verify = measure(me + ["--child", "verify"] + common, log)
    if verify.returncode:
        sys.exit(f"fixture verification failed, see {log}")
    info = {
        "params": want,
        "build_seconds": round(build.seconds, 2),
        "build_peak_rss_mib": round(build.rss_kib / 1024, 1),
        "verify_seconds": round(verify.seconds, 2),
        "base_bytes": tree_bytes(root / "base"),
        "adapter_bytes": tree_bytes(root / "adapter"),
    }
    write_json(stamp, info)
    print(
        f"  built in {build.seconds:.1f} s (peak RSS {build.rss_kib / 1024:.0f} MiB), "
        f"verified in {verify.seconds:.1f} s; base {info['base_bytes'] / 2**30:.2f} GiB, "
        f"adapter {info['adapter_bytes'] / 2**20:.1f} MiB",
        flush=True,
    )
    return info


def prepared_fixture(workdir: Path, layers: int) -> tuple[argparse.Namespace, Path, Path]:
    """This script's arguments for one size, its fixture built once under `workdir`; with the
    base and adapter folders (for the other bench scripts)."""
    args = parse_args(["--workdir", str(workdir), "--layers", str(layers)])
    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_fixture(args, layers)
    root = args.workdir / f"L{layers}"
    return args, root / "base", root / "adapter"


def run_child(args: argparse.Namespace) -> None:
    """Entry point of the build/verify child processes."""
    layers = args.layers[0]
    root = args.workdir / f"L{layers}"
    base, adapter = root / "base", root / "adapter"
    if args.child == "build":
        build_base(base, layers, args.shards, args.seed)
        build_adapter(adapter, base, layers, args.adapter_dtype, args.seed)
    else:
        verify_fixture(base, adapter, layers)


# --- reporting


VERSIONS_SCRIPT = """
import json
from importlib import metadata
out = {}
for pkg in ("torch", "transformers", "peft", "safetensors"):
    try:
        out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
        out[pkg] = "not installed"
print(json.dumps(out))
"""


def machine_facts() -> dict[str, Any]:
    """Cores, RAM, OS and library versions (versions read in a child to keep this process small)."""
    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    versions = subprocess.run(
        [sys.executable, "-c", VERSIONS_SCRIPT], capture_output=True, text=True, check=True
    )
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kib / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **json.loads(versions.stdout),
        "page_cache": "warm (inputs read once before timing; caches are not dropped)",
    }


def ratio(a: float | None, b: float | None) -> str:
    """a/b formatted, or '-' when either is missing."""
    return f"{a / b:.2f}x" if a is not None and b else "-"


def print_table(rows: list[Row]) -> None:
    """Print the results table and the headline ratios."""
    copy = {r.layers: r for r in rows if r.tool == "copy"}
    head = (
        f"{'tool':<12} {'size':<16} {'seconds':>8} {'peak RSS MiB':>13} "
        f"{'time/copy':>10} {'RSS/copy':>9}  note"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        c = copy.get(r.layers)
        size = f"L{r.layers} {r.base_bytes / 2**30:.2f} GiB"
        secs = f"{r.seconds:8.2f}" if r.seconds is not None else f"{'-':>8}"
        rss = f"{r.rss_mib:13.1f}" if r.rss_mib is not None else f"{'-':>13}"
        print(
            f"{r.tool:<12} {size:<16} {secs} {rss} "
            f"{ratio(r.seconds, c and c.seconds):>10} "
            f"{ratio(r.rss_mib, c and c.rss_mib):>9}  {r.note}"
        )
    print()
    by = {(r.tool, r.layers): r for r in rows}
    for layers in sorted({r.layers for r in rows}):
        for num, den in (
            ("loramerge", "copy"),
            ("loramerge", "copy+sha256"),
            ("verify", "loramerge"),
            ("merge-verify", "loramerge"),
            ("unmerge", "loramerge"),
            ("rebase-base", "loramerge"),
            ("peft", "loramerge"),
            ("bnb-nf4", "quantize-nf4"),
            ("merge-nf4", "quantize-nf4"),
        ):
            a, b = by.get((num, layers)), by.get((den, layers))
            if a and b and a.seconds is not None and b.seconds is not None:
                print(
                    f"L{layers} {num}/{den}: time {ratio(a.seconds, b.seconds)}, "
                    f"peak RSS {ratio(a.rss_mib, b.rss_mib)}"
                )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"where fixtures and outputs live; fixtures are reused (default {DEFAULT_WORKDIR})",
    )
    p.add_argument(
        "--outdir",
        type=Path,
        help="where outputs, logs and the check rows' merged candidate go (default: --workdir)",
    )
    p.add_argument(
        "--layers", type=int, nargs="+", default=[11, 22], help="model sizes (default: 11 22)"
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per tool and size; the median is reported"
    )
    p.add_argument(
        "--tools",
        nargs="+",
        default=["copy", "copy+sha256", "loramerge", "peft", "verify"],
        choices=[
            "copy",
            "copy+sha256",
            "loramerge",
            "peft",
            "verify",
            "merge-verify",
            "unmerge",
            "rebase-base",
            "bnb-nf4",
            "quantize-nf4",
            "merge-nf4",
        ],
    )
    p.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to wait after removing the previous output, before each run, so every "
        "run starts from memory the VM has reclaimed (see settle(); 0: none)",
    )
    p.add_argument("--json", type=Path, help="write results as JSON here")
    p.add_argument(
        "--warmup", type=int, default=1, choices=[0, 1], help="one untimed run per tool first"
    )
    p.add_argument("--shards", type=int, default=2, help="base checkpoint shards (default 2)")
    p.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--loramerge-cmd",
        default=f"{shlex.quote(sys.executable)} -m loramerge",
        help="command prefix that runs the loramerge CLI",
    )
    p.add_argument(
        "--sync-all",
        action="store_true",
        help="append `&& sync` to loramerge and PEFT too (timed), so all rows are durable",
    )
    p.add_argument("--build-only", action="store_true", help="build and verify fixtures, then stop")
    p.add_argument("--rebuild", action="store_true", help="rebuild fixtures even if present")
    p.add_argument("--child", choices=["build", "verify"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.outdir = (args.outdir or args.workdir).resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    """Build fixtures, measure each tool at each size, print and save the results."""
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.outdir.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    fixtures = {layers: ensure_fixture(args, layers) for layers in args.layers}
    if args.build_only:
        return
    lm_ok = loramerge_available(shlex.split(args.loramerge_cmd), child_env())
    print(f"loramerge: {'ok, ' if lm_ok[0] else 'NOT AVAILABLE, '}{lm_ok[1]}")
    rows: list[Row] = []
    for layers in args.layers:
        rows += bench_size(args, layers, lm_ok)
    spawn_floor = measure(["true"], args.outdir / "logs" / "floor.log").rss_kib / 1024
    for row in rows:
        if row.rss_mib is not None and row.rss_mib <= spawn_floor + 1:
            row.note = (
                row.note + "; " if row.note else ""
            ) + "RSS at runner floor (tool's own is lower)"
    print_table(rows)
    print(
        f"\nwait after each cleanup: {args.settle} s. "
        f"page cache warm (not dropped). ru_maxrss of a child includes this runner's own RSS at "
        f"spawn: floor {spawn_floor:.1f} MiB (measured with `true`)."
    )
    if args.json:
        result = {
            "machine": facts,
            "settings": {k: str(v) for k, v in vars(args).items() if k != "child"},
            "spawn_floor_mib": round(spawn_floor, 1),
            "fixtures": fixtures,
            "rows": [asdict(r) for r in rows],
        }
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
