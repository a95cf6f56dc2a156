"""The PEFT adapter a set of low-rank factors becomes: tensor names, config with patterns, record.

Every module written has scale 1 (lora_alpha = r, no rsLoRA): the factors carry everything.
Ranks that differ from the default go into `rank_pattern` and `alpha_pattern`, keyed by the
escaped full module name and checked with PEFT's own matching rule (first key wins).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from loramerge import __version__
from loramerge.adapter import PREFIX, pattern_key


@dataclass
class Factors:
    """One module of the adapter being written: dW = B @ A (B: out x r, A: r x in[...])."""

    module: str
    kind: str  # "linear", "conv" or "embedding"
    b: np.ndarray
    a: np.ndarray
    bias: np.ndarray | None = None

    @property
    def rank(self) -> int:
        """Rows of A."""
        return int(self.a.shape[0])


def tensors_of(modules: list[Factors]) -> dict[str, np.ndarray]:
    """PEFT's saved key names (adapter name stripped) -> float32 arrays."""
    out = {}
    for f in modules:
        stem = PREFIX + f.module
        if f.kind == "embedding":
            out[f"{stem}.lora_embedding_A"] = f.a
            out[f"{stem}.lora_embedding_B"] = f.b
        else:
            out[f"{stem}.lora_A.weight"] = f.a
            out[f"{stem}.lora_B.weight"] = f.b
        if f.bias is not None:
            out[f"{stem}.lora_B.bias"] = f.bias
    return out


def lora_config(modules: list[Factors], *, base_model: str | None, **fields) -> dict:
    """adapter_config.json for `modules`: default r the commonest rank, patterns for the rest."""
    ranks = {f.module: f.rank for f in modules}
    default = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern: dict[str, int] = {}
    while True:  # add a pattern wherever PEFT's first-match rule would give a wrong rank
        keys = sorted(pattern, key=len, reverse=True)
        wrong = [
            m
            for m, r in ranks.items()
            if (pattern[k] if (k := pattern_key(keys, m)) else default) != r
        ]
        if not wrong:
            break
        pattern.update({re.escape(m): ranks[m] for m in wrong})
    ordered = {k: pattern[k] for k in sorted(pattern, key=len, reverse=True)}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": default,
        "lora_alpha": default,
        "rank_pattern": ordered,
        "alpha_pattern": dict(ordered),
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(ranks),
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }
    config.update(fields)
    return config


def adapter_record(op: str, base: str | None, adapters: list[dict], modules: dict) -> dict:
    """The provenance record of a written adapter folder."""
    errors = [m["relative_error"] for m in modules.values() if m.get("relative_error")]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {
        "format": "loramerge.provenance",
        "format_version": 1,
        "kind": "adapter",
        "tool": {"name": "loramerge", "version": __version__},
        "created": now,
        "base": {"source": base},
        "adapters": adapters,
        "history": [{"op": op, "adapters": [a["source"] for a in adapters], "at": now}],
        "modules": modules,
        "max_relative_error": max(errors, default=0.0),
    }
