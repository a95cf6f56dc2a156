"""NF4 of a GPT-2-shaped (Conv1D) checkpoint: loramerge vs transformers + bitsandbytes.

Builds (once, in --workdir) a GPT-2-medium-shaped bf16 checkpoint with random weights (24
layers, n_embd 1024, n_inner 4096, vocabulary 50257: 355 M parameters, 710 MB) and an r=16
fan_in_fan_out LoRA on c_attn, c_proj and c_fc, then runs, interleaved, as separate processes:

- transformers: `from_pretrained(BASE, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4"))` + `save_pretrained` (what loramerge's output equals byte for byte);
- quantize-nf4: `loramerge quantize BASE -o OUT --to nf4`;
- merge-nf4: `loramerge merge BASE ADAPTER -o OUT --to nf4`.

Wall seconds and peak RSS (os.wait4) per run; the page cache is warm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from runner import child_env, measure, settle, warm_cache

BUILD = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
root = Path(sys.argv[1])
layers, d, inner, vocab, r = 24, 1024, 4096, 50257, 16
g = torch.Generator().manual_seed(0)
def randn(*shape):
    return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
state = {"transformer.wte.weight": randn(vocab, d), "transformer.wpe.weight": randn(1024, d)}
conv = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, inner),
        "mlp.c_proj": (inner, d)}
lora = {}
for i in range(layers):
    p = f"transformer.h.{i}."
    for norm in ("ln_1", "ln_2"):
        state[p + norm + ".weight"] = torch.ones(d, dtype=torch.bfloat16)
        state[p + norm + ".bias"] = torch.zeros(d, dtype=torch.bfloat16)
    for module, (fan_in, fan_out) in conv.items():
        state[p + module + ".weight"] = randn(fan_in, fan_out)  # Conv1D: (in, out)
        state[p + module + ".bias"] = randn(fan_out)
        key = "base_model.model." + p + module
        lora[key + ".lora_A.weight"] = randn(r, fan_in)
        lora[key + ".lora_B.weight"] = randn(fan_out, r)
state["transformer.ln_f.weight"] = torch.ones(d, dtype=torch.bfloat16)
state["transformer.ln_f.bias"] = torch.zeros(d, dtype=torch.bfloat16)
base, adapter = root / "base", root / "adapter"
base.mkdir(parents=True)
adapter.mkdir()
save_file(state, base / "model.safetensors", metadata={"format": "pt"})
config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": d,
          "n_head": 16, "n_layer": layers, "n_inner": inner, "n_positions": 1024,
          "vocab_size": vocab, "dtype": "bfloat16", "tie_word_embeddings": True}
(base / "config.json").write_text(json.dumps(config))
save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
(adapter / "adapter_config.json").write_text(json.dumps({
    "peft_type": "LORA", "r": r, "lora_alpha": 32, "fan_in_fan_out": True,
    "target_modules": ["c_attn", "c_proj", "c_fc"], "task_type": "CAUSAL_LM"}))
"""

TRANSFORMERS = """
import sys, torch, transformers
base, out = sys.argv[1:3]
config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
model = transformers.AutoModelForCausalLM.from_pretrained(
    base, quantization_config=config, device_map="cpu")
model.save_pretrained(out)
"""


def main() -> None:
    """Build the checkpoint if needed, then time each tool `--repeat` times, interleaved."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/loramerge-nf4-conv1d"))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", type=Path, help="write results as JSON here")
    args = p.parse_args()
    root = args.workdir
    base, adapter, log = root / "base", root / "adapter", root / "bench.log"
    if not base.is_dir():
        subprocess.run([sys.executable, "-c", BUILD, str(root)], check=True)
    lm = [sys.executable, "-m", "loramerge"]
    tools = {
        "transformers": lambda out: [sys.executable, "-c", TRANSFORMERS, str(base), str(out)],
        "quantize-nf4": lambda out: [*lm, "quantize", str(base), "-o", str(out), "--to", "nf4"],
        "merge-nf4": lambda out: [
            *lm, "merge", str(base), str(adapter), "-o", str(out), "--to", "nf4", "--quiet"
        ],
    }  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name in tools}
    warm_cache(base)
    for _ in range(args.repeat):
        for name, argv in tools.items():
            out = root / f"out-{name}"
            settle(out, 0)
            run = measure(argv(out), log, child_env())
            assert run.returncode == 0, f"{name} failed; see {log}"
            results[name].append({"seconds": run.seconds, "rss_mib": run.rss_kib / 1024})
            print(f"{name:13s} {run.seconds:7.2f} s  {run.rss_kib / 1024:7.0f} MiB", flush=True)
            settle(out, 0)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
