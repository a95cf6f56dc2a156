#!/usr/bin/env python
"""Peak memory on a checkpoint whose embedding alone is 4 GiB: merge, its checks and unmerge.

The base is Llama-shaped with a 262,144 x 8,192 bf16 `embed_tokens` (the size class of the
largest released vocabularies), tied to the output head (`tie_word_embeddings`, so the file
holds it once), beside one decoder layer (hidden 8,192, MLP 1,024). The adapter is PEFT LoRA
r=16 on `embed_tokens` (lora_embedding_A/B) and on all seven projections. Each command (merge,
merge --verify, verify, unmerge with and without its drift report, rebase --base) runs as its
own process after a durable copy of the base, measured the same way (wall, ru_maxrss) in one
run; `verify`'s verdict is the float64 check of the merge. Built under --workdir (about
4.5 GiB for the base, the same again per output; everything is deleted with --clean).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import child_env, measure, settle, tree_bytes, warm_cache, write_json  # noqa: E402

VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 262_144, 8_192, 1_024, 64, 8
RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWS_PER_WRITE = 8_192  # the builder holds this many embedding rows at a time


def base_tensors() -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, scale) of every base tensor; scale 0 means ones (norms)."""
    kv = KV_HEADS * (HIDDEN // HEADS)
    p = "model.layers.0."
    return [
        ("model.embed_tokens.weight", (VOCAB, HIDDEN), 0.02),
        (p + "input_layernorm.weight", (HIDDEN,), 0.0),
        (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), 0.02),
        (p + "self_attn.k_proj.weight", (kv, HIDDEN), 0.02),
        (p + "self_attn.v_proj.weight", (kv, HIDDEN), 0.02),
        (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN), 0.02),
        (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), 0.02),
        (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), 0.02),
        (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), 0.02),
        (p + "post_attention_layernorm.weight", (HIDDEN,), 0.0),
        ("model.norm.weight", (HIDDEN,), 0.0),
    ]


def adapter_tensors() -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, scale) of the LoRA tensors in PEFT's naming (B non-zero)."""
    out = [
        ("base_model.model.model.embed_tokens.lora_embedding_A", (RANK, VOCAB), 1.0),
        ("base_model.model.model.embed_tokens.lora_embedding_B", (HIDDEN, RANK), 0.01),
    ]
    for name, shape, _ in base_tensors():
        if any(f".{t}." in name for t in TARGETS):
            module = "base_model.model." + name.removesuffix(".weight")
            out.append((module + ".lora_A.weight", (RANK, shape[1]), shape[1] ** -0.5))
            out.append((module + ".lora_B.weight", (shape[0], RANK), 0.01))
    return out


def write_safetensors(path: Path, tensors, dtype: str, seed: int) -> None:
    """Header first, then each tensor a few thousand rows at a time (memory stays small)."""
    import ml_dtypes
    import numpy as np

    np_dtype = {"BF16": ml_dtypes.bfloat16, "F32": np.float32}[dtype]
    size = np.dtype(np_dtype).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        nbytes = int(np.prod(shape)) * size
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape, scale in tensors:
            rows, cols = (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, shape[0])
            for r0 in range(0, rows, ROWS_PER_WRITE):
                n = min(ROWS_PER_WRITE, rows - r0)
                if scale:
                    block = rng.standard_normal((n, cols), dtype=np.float32) * np.float32(scale)
                else:
                    block = np.ones((n, cols), np.float32)
                f.write(block.astype(np_dtype).tobytes())


def build(root: Path) -> None:
    """The base (config + one safetensors file) and the adapter (PEFT layout)."""
    from peft import LoraConfig

    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    write_safetensors(base / "model.safetensors", base_tensors(), "BF16", 0)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    write_json(base / "config.json", config)
    write_safetensors(adapter / "adapter_model.safetensors", adapter_tensors(), "F32", 1)
    LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=[*TARGETS, "embed_tokens"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    ).save_pretrained(str(adapter))


def check(root: Path, rows: int, seed: int) -> dict[str, Any]:
    """The merge held against float64 on `rows` random rows of every modified tensor (all of the
    small ones): max distance in bf16 ulps at max(|W0|, |exact|), and the share equal to the
    correctly rounded exact value. Reads only those rows, so it runs in little memory."""
    import numpy as np

    from loramerge.source.checkpoint import open_weights

    rng = np.random.default_rng(seed)
    scale = ALPHA / RANK
    with (
        open_weights(root / "base", stem="model", allow_pickle=False) as base,
        open_weights(root / "merged", stem="model", allow_pickle=False) as merged,
        open_weights(root / "adapter", stem="adapter_model", allow_pickle=False) as adapter,
    ):
        factors = {n: adapter.read(n).astype(np.float64) for n in adapter.tensors}
        worst, exact, total = 0.0, 0, 0
        for name, (out_features, cols) in {
            n: s for n, s, _ in base_tensors() if len(s) == 2
        }.items():
            module = "base_model.model." + name.removesuffix(".weight")
            if name.endswith("embed_tokens.weight"):  # delta rows from A's columns: (B @ A)^T
                a, b = factors[module + ".lora_embedding_A"], factors[module + ".lora_embedding_B"]
                a, b = b.T, a.T  # row i of the delta is A[:, i]^T @ B^T
            else:
                a, b = factors[module + ".lora_A.weight"], factors[module + ".lora_B.weight"]
            picked = np.sort(rng.choice(out_features, min(rows, out_features), replace=False))
            buffer = np.empty(cols * 4, np.uint8)
            for i in picked:
                w0 = base.read_part(name, i * cols, (i + 1) * cols, buffer).astype(np.float64)
                ours = merged.read_part(name, i * cols, (i + 1) * cols, buffer).astype(np.float64)
                want = w0 + scale * (b[i] @ a)
                rounded = _to_bf16(want).astype(np.float64)
                magnitude = np.maximum(np.abs(w0), np.abs(want))
                ulp = np.exp2(np.floor(np.log2(np.maximum(magnitude, 2.0**-126))) - 7)
                worst = max(worst, float((np.abs(ours - want) / ulp).max()))
                exact += int((ours == rounded).sum())
                total += cols
    return {"max_ulp": round(worst, 4), "correctly_rounded_share": exact / total, "elements": total}


def _to_bf16(x):
    """float64 -> bfloat16 rounded once: to float32 "to odd" first (as `delta.round_once`)."""
    import ml_dtypes
    import numpy as np

    single = x.astype(np.float32)
    back = single.astype(np.float64)
    bits = single.view(np.uint32) - (np.abs(back) > np.abs(x)).astype(np.uint32)
    bits |= (back != x).astype(np.uint32)
    return bits.view(np.float32).astype(ml_dtypes.bfloat16)


def main(argv: list[str] | None = None) -> None:
    """Build (once), then measure the copy and each command, one process each."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--loramerge-cmd", default=f"{shlex.quote(sys.executable)} -m loramerge")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--clean", action="store_true", help="delete everything built at the end")
    p.add_argument(
        "--limit-gib",
        type=float,
        default=8.0,
        help="address-space limit per command (ulimit -v), so a command that would hold the "
        "whole embedding in float64 fails instead of crowding the machine (default 8)",
    )
    p.add_argument(
        "--check-rows", type=int, default=2048, help="rows per tensor held against float64"
    )
    p.add_argument("--child-build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    root = args.workdir / "bigvocab"
    if args.child_build:
        build(root)
        return
    if args.child_check:
        print(json.dumps(check(root, args.check_rows, 0)))
        return
    if not (root / "adapter" / "adapter_config.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        args.workdir.mkdir(parents=True, exist_ok=True)
        run = measure(
            [sys.executable, __file__, "--workdir", str(args.workdir), "--child-build"],
            args.workdir / "bigvocab-build.log",
        )
        if run.returncode:
            sys.exit(f"build failed, see {args.workdir / 'bigvocab-build.log'}")
        print(f"built in {run.seconds:.0f} s, base {tree_bytes(root / 'base') / 2**30:.2f} GiB")
    q = lambda path: shlex.quote(str(path))  # noqa: E731
    base, adapter, copy, hidden = root / "base", root / "adapter", root / "copy", root / "hidden"
    merged, undone = root / "merged", root / "undone"  # undone: each later step's own output
    lm = args.loramerge_cmd
    steps = {
        "copy": f"cp -r {q(base)} {q(copy)} && sync",
        "merge": f"{lm} merge {q(base)} {q(adapter)} -o {q(merged)} --quiet",
        "merge --verify": f"{lm} merge {q(base)} {q(adapter)} -o {q(undone)} --verify --quiet",
        "verify": f"{lm} verify {q(merged)} --base {q(base)} --adapter {q(adapter)} --json",
        "unmerge": f"{lm} unmerge {q(merged)} {q(adapter)} -o {q(undone)} --quiet",
        # the subtraction alone: with the recorded base out of reach there is no drift report
        "unmerge, no drift report": f"mv {q(base)} {q(hidden)} && {lm} unmerge {q(merged)} "
        f"{q(adapter)} -o {q(undone)} --quiet; rc=$?; mv {q(hidden)} {q(base)}; exit $rc",
        "rebase --base": f"{lm} rebase {q(merged)} --remove {q(adapter)} --add {q(adapter)} "
        f"--base {q(base)} -o {q(undone)} --quiet",
    }
    # every command starts with its inputs in the page cache, as in bench/merge.py (the merge
    # writes past the cache, so the commands that read its output would otherwise read the disk)
    reads_merged = {"verify", "unmerge", "unmerge, no drift report", "rebase --base"}
    env = child_env()
    log = args.workdir / "bigvocab.log"
    log.write_text("")
    shutil.rmtree(merged, ignore_errors=True)
    results = {}
    for name, command in steps.items():
        shutil.rmtree(undone, ignore_errors=True)
        settle(copy, 2.0)
        warm_cache(base)
        if name in reads_merged:
            warm_cache(merged)
        with open(log, "a") as f:
            f.write(f"\n=== {name}: {command}\n")
        limit = "" if name == "copy" else f"ulimit -v {int(args.limit_gib * 2**20)} && "
        run = measure(["sh", "-c", limit + command], log, env)
        results[name] = {
            "seconds": round(run.seconds, 2),
            "peak_rss_mib": round(run.rss_kib / 1024),
            "exit": run.returncode,
        }
        print(
            f"{name:24} {run.seconds:8.1f} s {run.rss_kib / 1024:8.0f} MiB exit {run.returncode}",
            flush=True,
        )
    checked = subprocess.run(
        [
            sys.executable,
            __file__,
            "--workdir",
            str(args.workdir),
            "--child-check",
            "--check-rows",
            str(args.check_rows),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    results["merge_vs_float64"] = json.loads(checked.stdout)
    print("merge vs float64 on sampled rows:", results["merge_vs_float64"], flush=True)
    results["load"] = os.getloadavg()
    if args.json:
        write_json(args.json, results)
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
