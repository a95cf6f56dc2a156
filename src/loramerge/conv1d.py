"""Which weights are transformers' `Conv1D` (GPT-2 and its kin): stored (in, out), the transpose
of a Linear's. Known by the config's `model_type` and the layer's name; never by a shape."""

from __future__ import annotations

MODELS = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
LAYERS = ("c_attn", "q_attn", "c_proj", "c_fc")


def named(name: str) -> bool:
    """Whether a weight's layer has a Conv1D layer's name (a Linear elsewhere may share it)."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1] in LAYERS


def is_conv1d(name: str, config: dict | None) -> bool:
    """Whether this weight of a model with this config is a Conv1D one, stored (in, out)."""
    return (config or {}).get("model_type") in MODELS and named(name)
