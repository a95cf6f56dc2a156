"""Which parameters of a model are its vocabulary matrices and which of them share storage.

transformers names them per model class (`_tied_weights_keys`, copied into `tied_weights.py`) and
ties them when the config's `tie_word_embeddings` is true. loramerge takes the class from the
config's `architectures` and never guesses from shapes: a vocabulary-sized MLP looks exactly like
an embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from loramerge.tied_weights import TIED_WEIGHTS


@dataclass(frozen=True)
class TieGroup:
    """Parameters that are one tensor when tied: `source` is stored, `targets` follow it."""

    source: str
    targets: tuple[str, ...]

    @property
    def members(self) -> tuple[str, ...]:
        """Every name in the group, source first."""
        return (self.source, *self.targets)


def architecture(config: dict) -> str | None:
    """The model class config.json names, when it names exactly one."""
    names = config.get("architectures")
    return names[0] if isinstance(names, list) and len(names) == 1 else None


def tie_groups(config: dict) -> list[TieGroup] | None:
    """The architecture's declared ties (module names), or None for a class we do not know."""
    declared = TIED_WEIGHTS.get(architecture(config) or "")
    if declared is None:
        return None
    groups: dict[str, list[str]] = {}
    for target, source in declared.items():
        groups.setdefault(source, []).append(target)
    return [TieGroup(source, tuple(targets)) for source, targets in groups.items()]


def tie_like(name: str) -> bool:
    """Whether a parameter has the name some language model ties (`lm_head.weight`, ...)."""
    return any(name == m or name.endswith("." + m) for m in _LM_TIED)


_LM_TIED = {
    name
    for architecture, declared in TIED_WEIGHTS.items()
    if architecture.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel"))
    for pair in declared.items()
    for name in pair
}


def ties_enabled(config: dict) -> bool:
    """Whether transformers ties them: `tie_word_embeddings`, true unless the config says false.

    transformers reads the flag from the top-level config (a multimodal model's too), and its
    `save_pretrained` omits it only when it equals the default, true.
    """
    return config.get("tie_word_embeddings", True) is not False


def vocab_size(config: dict) -> int | None:
    """The vocabulary size: top-level, or in `text_config` for multimodal models."""
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return value if isinstance(value, int) else None


def vocab_update(config: dict, size: int) -> dict[str, object]:
    """The config change that records a new vocabulary size, where the config keeps it."""
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
        return {"text_config": {"vocab_size": size}}
    return {"vocab_size": size}


def untie_update(config: dict) -> dict[str, object]:
    """The config change that unties: top level, and `text_config` too when it has the flag
    (transformers reads the top level; a text model built from `text_config` alone reads its)."""
    update: dict[str, object] = {"tie_word_embeddings": False}
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        update["text_config"] = {"tie_word_embeddings": False}
    return update
