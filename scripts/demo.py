"""`make demo`: merge the bundled fixture adapter into the bundled fixture model and check it.

Runs the real CLI, then checks every merged tensor against a float64 recomputation made here
with plain torch, and finally loads the result with transformers and generates a few tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "fixtures" / "llama-base"
ADAPTER = ROOT / "fixtures" / "adapters" / "llama-lora"
OUT = ROOT / "demo-output" / "llama-merged"
PREFIX = "base_model.model."


def main() -> None:
    """Merge, check, load, generate; print where the output is."""
    OUT.parent.mkdir(exist_ok=True)
    loramerge = [sys.executable, "-m", "loramerge"]
    subprocess.run([*loramerge, "merge", BASE, ADAPTER, "-o", OUT, "--overwrite"], check=True)
    subprocess.run([*loramerge, "inspect", OUT], check=True)
    print(f"check against float64: {check_against_float64()}; the rest within float32 error")
    generate()
    print(f"\nDone. The merged model is in {OUT}")


def check_against_float64() -> str:
    """Compare every merged weight with W0 + (alpha/r) B @ A computed in float64.

    Each element must be the correctly rounded bf16 value (0.5 ulp) up to the float32 arithmetic
    bound 2^-24 (r + 8) (|W0| + s |B| @ |A|), the textbook error of the dot products inside.
    """
    base = {}
    for shard in BASE.glob("*.safetensors"):
        base.update(load_file(shard))
    merged = load_file(OUT / "model.safetensors")
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    rank, scale = config["r"], config["lora_alpha"] / config["r"]
    lora = load_file(ADAPTER / "adapter_model.safetensors")
    worst, exact, total = 0.0, 0, 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")].double()
        name = key.removeprefix(PREFIX).replace(".lora_A.weight", ".weight")
        w0, a = base[name].double(), a.double()
        expected = w0 + scale * (b @ a)
        ulp = torch.exp2(torch.floor(torch.log2(expected.abs().clamp(min=1e-30))) - 7)
        error = (merged[name].double() - expected).abs() / ulp
        bound = 0.5 + 2.0**-24 * (rank + 8) * (w0.abs() + scale * (b.abs() @ a.abs())) / ulp
        if (error > bound).any():
            raise SystemExit(f"demo check failed: {name} is {float(error.max()):.2f} ulp off")
        worst = max(worst, float(error.max()))
        exact += int((error <= 0.5).sum())
        total += error.numel()
    return f"max {worst:.3f} ulp, {exact / total:.4%} of {total} elements correctly rounded"


def generate() -> None:
    """Load the merged folder with transformers and generate a few tokens from a prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(OUT)
    model = AutoModelForCausalLM.from_pretrained(OUT)
    prompt = "The quick brown fox"
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    print(f"generate: {prompt!r} -> {tokenizer.decode(out[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
