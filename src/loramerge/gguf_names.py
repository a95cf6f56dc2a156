"""Hugging Face tensors as llama.cpp expects them: GGUF names, Q/K row order, Gemma norm offset.

What convert_hf_to_gguf.py does to each tensor of the supported architectures, as pure functions:
the name through gguf's `TensorNameMap`, the rotary row interleave of Llama-family q/k
projections (`LlamaModel.permute`), and Gemma's `norm.weight + 1` (its RMSNorm multiplies by
1 + w; llama.cpp's by w). Adding an architecture is one `ARCHITECTURES` entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import numpy as np


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face architecture as convert_hf_to_gguf.py converts it."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # LlamaModel: q/k rows reordered for llama.cpp's rotary layout
    norm_offset: bool = False  # Gemma: every *norm.weight stored as w + 1
    skip: tuple[str, ...] = ()  # tensors the converter drops

    @property
    def name(self) -> str:
        """The GGUF `general.architecture` string."""
        return gguf.MODEL_ARCH_NAMES[self.arch]


A = gguf.MODEL_ARCH
_LLAMA = Architecture(A.LLAMA, permute_qk=True)
_GEMMA_SKIP = ("lm_head.weight",)  # tied to the embedding; the converter never writes it
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": Architecture(A.QWEN2),
    "GemmaForCausalLM": Architecture(A.GEMMA, norm_offset=True, skip=_GEMMA_SKIP),
    "Gemma2ForCausalLM": Architecture(A.GEMMA2, norm_offset=True, skip=_GEMMA_SKIP),
}


class UnsupportedArchitecture(ValueError):
    """A config.json whose architecture has no GGUF conversion here."""


def architecture(config: dict) -> Architecture:
    """The conversion for a config.json; UnsupportedArchitecture names the supported ones."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    shown = ", ".join(names) or "none given"
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedArchitecture(
        f"architecture {shown} cannot be written as GGUF (supported: {supported})"
    )


def hf_architecture(gguf_arch: str) -> tuple[str, Architecture]:
    """The first Hugging Face class converted to this GGUF architecture, and its conversion."""
    for name, arch in ARCHITECTURES.items():
        if arch.name == gguf_arch:
            return name, arch
    supported = ", ".join(sorted({a.name for a in ARCHITECTURES.values()}))
    raise UnsupportedArchitecture(
        f"GGUF architecture {gguf_arch!r} cannot be read back (supported: {supported})"
    )


# The reverse map picks, among the names gguf's table lists for a GGUF tensor, the first that
# matches the first of these: the Hugging Face layout every supported architecture shares
# (transformers' decoder layers with `self_attn` and `mlp`, `model.norm`, `lm_head`).
_HF_PATTERNS = tuple(
    re.compile(p)
    for p in (r"model\.layers\.\d+\.(self_attn|mlp)\.", r"model\.layers\.", r"lm_head$", r"model\.")
)


class TensorNames:
    """HF tensor name <-> GGUF tensor name for one model (gguf's TensorNameMap)."""

    def __init__(self, arch: Architecture, n_layer: int) -> None:
        self.arch = arch
        self._map = gguf.get_tensor_name_map(arch.arch, n_layer)
        candidates: dict[str, list[str]] = {}
        for hf_base, (_, gguf_base) in self._map.mapping.items():
            candidates.setdefault(gguf_base, []).append(hf_base)
        self._reverse: dict[str, str] = {}
        for gguf_base, names in candidates.items():
            for pattern in _HF_PATTERNS:
                chosen = next((n for n in names if pattern.match(n)), None)
                if chosen is not None:
                    self._reverse[gguf_base] = chosen
                    break

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a GGUF tensor, or None when the map has none."""
        base, dot, suffix = gguf_name.rpartition(".")
        if suffix not in ("weight", "bias") or base not in self._reverse:
            return None
        return f"{self._reverse[base]}{dot}{suffix}"

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for a tensor the converter drops; KeyError if it has none."""
        if hf_name in self.arch.skip:
            return None
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"tensor {hf_name} has no GGUF name for {self.arch.name}")
        return name


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute: within each head, rows (pairs of rotary halves) interleaved.

    `n_head` is num_attention_heads for q_proj and num_key_value_heads for k_proj.
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_qk: llama.cpp's q/k rows back in Hugging Face order."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def qk_heads(hf_name: str, config: dict) -> int | None:
    """How many heads permute_qk splits this tensor into: q and k projections only."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return config["num_attention_heads"]
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def gemma_norm(w: np.ndarray) -> np.ndarray:
    """Gemma's norm weight as llama.cpp reads it: w + 1, in float32 (in float16 for float16 w)."""
    if w.dtype == np.float16:
        return (w + np.float16(1)).astype(np.float32)
    return w.astype(np.float32) + np.float32(1)


def row_local(arch: Architecture, hf_name: str, config: dict) -> bool:
    """Whether `to_gguf_values` leaves this tensor's rows as they are (so rows convert alone)."""
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        return False
    return not (arch.permute_qk and qk_heads(hf_name, config))


def from_gguf_values(arch: Architecture, hf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """The inverse of to_gguf_values on float32 values: q/k rows un-permuted, Gemma norms - 1."""
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        return w - np.float32(1)
    heads = qk_heads(hf_name, config) if arch.permute_qk else None
    return unpermute_qk(w, heads) if heads else w


def to_gguf_values(arch: Architecture, hf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """A tensor's values as convert_hf_to_gguf.py hands them on (before the type conversion)."""
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        return gemma_norm(w)
    heads = qk_heads(hf_name, config) if arch.permute_qk else None
    return permute_qk(w, heads) if heads else w
