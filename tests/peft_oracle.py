"""PEFT and transformers as judges: their merge, and logits of base + adapters unmerged."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

PROBE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging adapters should not change what the model says.",
]


def _resized_vocab(adapter: Path) -> int | None:
    """Rows of a vocabulary-resized modules_to_save tensor in the adapter, if any."""
    with safe_open(adapter / "adapter_model.safetensors", "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not iterable
            if key.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
                return fh.get_slice(key).get_shape()[0]
    return None


def peft_model(
    base: Path, adapters: list[Path], weights: list[float], dtype: torch.dtype, model_class=None
):
    """transformers base + PEFT adapters (unmerged), each adapter scaled by its weight; the
    model is loaded with `model_class` (default AutoModelForCausalLM)."""
    model = (model_class or AutoModelForCausalLM).from_pretrained(base, dtype=dtype)
    for adapter in adapters:
        rows = _resized_vocab(Path(adapter))
        if rows and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(adapter, adapter_name=name)
    model.base_model.set_adapter(names)
    if dtype == torch.float64:
        model.double()  # adapter weights too, so the whole merge runs in float64
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name, weight in zip(names, weights, strict=True):
                if name in scaling:
                    scaling[name] *= weight
    model.eval()
    return model, names


def peft_merged_state(base, adapters, weights, dtype, model_class=None) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload() of the adapters, as a state dict."""
    model, names = peft_model(base, adapters, weights, dtype, model_class)
    merged = model.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def probe_ids(folder: Path) -> torch.Tensor:
    """Token ids of the fixed probe prompts under the base's tokenizer (same length rows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [tokenizer(text)["input_ids"] for text in PROBE_TEXT]
    length = min(len(r) for r in rows)
    return torch.tensor([r[:length] for r in rows])


@torch.no_grad()
def logits_unmerged(base, adapters, weights, ids, model_class=None) -> torch.Tensor:
    """float32 logits of base + adapters, as PEFT runs them without merging."""
    model, _ = peft_model(base, adapters, weights, torch.float32, model_class)
    return model(input_ids=ids).logits


@torch.no_grad()
def logits_of(folder: Path, ids: torch.Tensor, model_class=None) -> torch.Tensor:
    """float32 logits of a checkpoint folder loaded with transformers (`model_class`)."""
    model = (model_class or AutoModelForCausalLM).from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model(input_ids=ids).logits


def config_of(folder: Path) -> dict:
    """config.json of a folder."""
    return json.loads((Path(folder) / "config.json").read_text())
