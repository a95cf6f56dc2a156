"""Independent float64 reference merges for the tests.

Written from PEFT's formulas (see fixtures/README.md), not from loramerge's code: it reads the
files with the `safetensors` library, matches scales with PEFT's own `get_pattern_key`, and works
in float64 throughout. Besides the expected value it returns, per element, the magnitude M of
everything summed into it, which bounds float32 arithmetic error (|err| <= c * 2^-24 * M).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

PREFIX = "base_model.model."


@dataclass
class Expected:
    """Expected float64 value of one merged tensor and the magnitude bound of its terms."""

    value: torch.Tensor
    magnitude: torch.Tensor
    inner: int  # longest dot product / norm inside (for the gamma_n error bound)


def load_base(folder: Path) -> dict[str, torch.Tensor]:
    """All base tensors, sharded or not."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("model*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def reference_merge(
    base_dir: Path, adapters: list[Path], weights: list[float]
) -> dict[str, Expected]:
    """Expected tensors (only those the adapters change) of merging adapters into the base."""
    base = load_base(base_dir)
    config = json.loads((Path(base_dir) / "config.json").read_text())
    out: dict[str, Expected] = {}

    def target(name: str) -> str:
        if name in base or name == "lm_head.weight":
            return name
        hits = [n for n in base if n.endswith("." + name)]
        assert len(hits) == 1, name
        return hits[0]

    def start(name: str) -> Expected:
        if name not in out:
            source = base[name] if name in base else base[target(_tied_source(config, name))]
            w0 = source.double()
            out[name] = Expected(w0.clone(), w0.abs().clone(), 1)
        return out[name]

    for adapter_dir, weight in zip(adapters, weights, strict=True):
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        state = {
            k.removeprefix(PREFIX): v.double()
            for k, v in load_file(Path(adapter_dir) / "adapter_model.safetensors").items()
        }
        # Whole tensors first: a base layer resized in training is where its LoRA starts.
        for key, tensor in state.items():
            if ".lora_" in key or "token_adapter" in key or "original_module" in key:
                continue
            name = key.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
            name = target(name.replace(".base_layer", ""))
            if ".base_layer" in key and tensor.shape == start(name).value.shape:
                assert torch.equal(tensor, start(name).value)  # PEFT's copy of the base
                continue
            out[name] = Expected(tensor.clone(), tensor.abs(), 1)
        modules = {k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k}
        for module in sorted(modules):
            _apply_lora(out, start, target, base, state, cfg, module, weight)
        for key, rows in state.items():
            if "token_adapter" in key:
                name = target(key.split(".token_adapter")[0] + ".weight")
                indices = next(iter(cfg["trainable_token_indices"].values()))
                exp = start(name)
                exp.value[indices] = rows
                exp.magnitude[indices] = rows.abs()
    return out


def _apply_lora(out, start, target, base, state, cfg, module, weight) -> None:
    """Add one module's LoRA (or DoRA) term, with its bias, to the expected tensors."""
    embedding = f"{module}.lora_embedding_A" in state
    a = state[f"{module}.lora_embedding_A" if embedding else f"{module}.lora_A.weight"]
    b = state[f"{module}.lora_embedding_B" if embedding else f"{module}.lora_B.weight"]
    r_key = get_pattern_key(list((cfg.get("rank_pattern") or {}).keys()), module)
    a_key = get_pattern_key(list((cfg.get("alpha_pattern") or {}).keys()), module)
    r = (cfg.get("rank_pattern") or {}).get(r_key, cfg["r"])
    alpha = (cfg.get("alpha_pattern") or {}).get(a_key, cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    transpose = embedding or cfg.get("fan_in_fan_out", False)
    delta = (b @ a).T if transpose else b @ a
    delta_abs = (b.abs() @ a.abs()).T if transpose else b.abs() @ a.abs()
    name = target(f"{module}.weight")
    exp = start(name)
    w0 = (base.get(name, exp.value)).double()
    magnitude = state.get(f"{module}.lora_magnitude_vector")
    if magnitude is None:
        exp.value += weight * scale * delta
        exp.magnitude += abs(weight * scale) * delta_abs
        exp.inner = max(exp.inner, a.shape[0] + 2)
    else:
        adapted = w0 + scale * delta
        dim = 0 if transpose else 1
        norm = torch.linalg.norm(adapted, dim=dim, keepdim=True)
        factor = magnitude.reshape(norm.shape) / norm
        exp.value += weight * (factor * adapted - w0)
        exp.magnitude += abs(weight) * (factor.abs() * (w0.abs() + scale * delta_abs) + w0.abs())
        exp.inner = max(exp.inner, w0.shape[dim] + a.shape[0] + 4)
    bias_key = f"{module}.lora_B.bias"
    if bias_key in state:
        bias_name = target(f"{module}.bias")
        bias = start(bias_name)
        bias.value += weight * scale * state[bias_key]
        bias.magnitude += abs(weight * scale) * state[bias_key].abs()


def _tied_source(config: dict, name: str) -> str:
    """The parameter transformers ties `name` to, from the model class itself."""
    import transformers

    assert config.get("tie_word_embeddings", True), f"{name} is not stored and not tied"
    return getattr(transformers, config["architectures"][0])._tied_weights_keys[name]


MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at each reference value (float64), subnormals included."""
    tiny = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(reference.abs().clamp(min=tiny)))
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def ulp_error(candidate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|candidate - reference| in ulps of the candidate's dtype at the reference."""
    return (candidate.double() - reference).abs() / ulp(reference, candidate.dtype)


def float32_bound(expected: Expected, dtype: torch.dtype) -> torch.Tensor:
    """Per-element error allowed after float32 arithmetic, in ulps of `dtype`: the correctly
    rounded half ulp plus the textbook gamma_n bound 2^-24 (n + 8) M of the sums inside."""
    return _bound(expected, dtype, 2.0**-24)


def float64_bound(expected: Expected, dtype: torch.dtype) -> torch.Tensor:
    """The same for float64 arithmetic (2^-53 (n + 8) M), before the single rounding."""
    return _bound(expected, dtype, 2.0**-53)


def _bound(expected: Expected, dtype: torch.dtype, unit: float) -> torch.Tensor:
    return 0.5 + unit * (expected.inner + 8) * expected.magnitude / ulp(expected.value, dtype)
