"""A GGUF file's key-value metadata, as llama.cpp's convert_hf_to_gguf.py writes it.

From config.json: the architecture's hyperparameters (`TextModel.set_gguf_parameters` and each
model class's own additions, one `HYPERPARAMETERS` entry per architecture). From the tokenizer
files: a GPT-2 style BPE vocabulary (`_set_vocab_gpt2`) or a SentencePiece one
(`_set_vocab_sentencepiece`, from tokenizer.model), then gguf's `SpecialVocab` (merges, special
token ids, add-BOS/EOS flags, chat template).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from loramerge.errors import LoramergeError

A = gguf.MODEL_ARCH
TokenType = gguf.TokenType


def _rope_parameters(config: dict) -> dict:
    """RoPE settings: `rope_parameters` of transformers 5, `rope_scaling` + `rope_theta` before."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta"))
    params.setdefault("rope_type", params.get("type"))
    return params


def _rope(w: gguf.GGUFWriter, config: dict, arch: gguf.MODEL_ARCH) -> None:
    """RoPE base and scaling keys (Llama 3's scaling is the rope_freqs tensor instead)."""
    params = _rope_parameters(config)
    rope_type, factor = params.get("rope_type"), params.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if params.get(key) is not None:
                add(params[key])
    elif rope_type not in (None, "default") and not (rope_type == "llama3" and arch == A.LLAMA):
        raise LoramergeError(
            f"RoPE scaling {rope_type!r} cannot be written as GGUF yet (linear and yarn can, and "
            "llama3 for Llama)"
        )
    if params.get("rope_theta") is not None:
        w.add_rope_freq_base(params["rope_theta"])


def _text_model(w: gguf.GGUFWriter, config: dict, arch: gguf.MODEL_ARCH = A.QWEN2) -> None:
    """TextModel.set_gguf_parameters for a decoder-only model (Qwen2 adds nothing)."""
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    if config.get("num_key_value_heads") is not None:
        w.add_head_count_kv(config["num_key_value_heads"])
    _rope(w, config, arch)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])


def _llama(w: gguf.GGUFWriter, config: dict) -> None:
    """LlamaModel: the vocabulary size and the rotary dimension on top."""
    _text_model(w, config, A.LLAMA)
    w.add_vocab_size(config["vocab_size"])
    w.add_rope_dimension_count(_head_dim(config))


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def extra_tensors(arch: gguf.MODEL_ARCH, config: dict) -> dict[str, np.ndarray]:
    """Tensors the converter makes from config.json: Llama 3's `rope_freqs.weight`
    (LlamaModel.generate_extra_tensors: per rotary frequency, the factor its period is divided
    by), computed in float64 and stored as float32."""
    params = _rope_parameters(config)
    if arch != A.LLAMA or params.get("rope_type") != "llama3":
        return {}
    dim = _head_dim(config)
    freqs = 1.0 / (params.get("rope_theta") or 10000.0) ** (np.arange(0, dim, 2) / dim)
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    with np.errstate(divide="ignore"):
        between = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(
        wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, between)
    )
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return {name: factors.astype(np.float32)}


def _gemma(w: gguf.GGUFWriter, config: dict) -> None:
    """GemmaModel writes its own short list (no RoPE keys: llama.cpp's defaults apply)."""
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])


def _gemma2(w: gguf.GGUFWriter, config: dict) -> None:
    """Gemma2Model: Gemma's keys plus logit soft-capping and the sliding window."""
    _gemma(w, config)
    w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    w.add_final_logit_softcapping(config["final_logit_softcapping"])
    w.add_sliding_window(config["sliding_window"])


HYPERPARAMETERS: dict[gguf.MODEL_ARCH, Callable[[gguf.GGUFWriter, dict], None]] = {
    A.LLAMA: _llama,
    A.QWEN2: _text_model,
    A.GEMMA: _gemma,
    A.GEMMA2: _gemma2,
}
_NO_SPACE_PREFIX = (A.GEMMA, A.GEMMA2)  # their converters set add_space_prefix = False


def write_hyperparameters(w: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, config: dict) -> None:
    """The architecture's hyperparameters from config.json."""
    try:
        HYPERPARAMETERS[arch](w, config)
    except KeyError as exc:
        raise LoramergeError(
            f"config.json lacks {exc.args[0]!r}, which GGUF export needs for "
            f"{gguf.MODEL_ARCH_NAMES[arch]}"
        ) from None


def write_tokenizer(
    w: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, folder: Path | None, vocab_size: int
) -> None:
    """The vocabulary and special tokens from the tokenizer files in `folder`."""
    if folder is None or not (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    ):
        raise LoramergeError(
            "GGUF export needs the tokenizer (tokenizer.json or tokenizer.model) next to the "
            "model's config.json"
        )
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece(folder, vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
        merges = False
    else:
        tokens, types, pre = _bpe(folder, vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        merges = True
    w.add_token_list(tokens)
    w.add_token_types(types)
    quiet = logging.getLogger("gguf")  # its notes on tokenizer.json would reach the terminal
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=len(tokens))
    finally:
        quiet.setLevel(level)
    special.add_to_gguf(w, quiet=True)
    if arch in _NO_SPACE_PREFIX:
        w.add_add_space_prefix(False)


# tokenizer.json pre-tokenizer regexes -> llama.cpp's pre-tokenizer names (llama-vocab.cpp).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_BY_REGEX = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def _pre_tokenizer(tokenizer: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization ("gpt-2": plain byte-level)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex in _PRE_BY_REGEX:
                return _PRE_BY_REGEX[regex]
            raise LoramergeError(
                "the tokenizer's pre-tokenizer regex is not one llama.cpp knows by name here "
                f"(known: GPT-2 byte-level, {', '.join(_PRE_BY_REGEX.values())})"
            )
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2"
    raise LoramergeError("the tokenizer's pre-tokenizer has no llama.cpp equivalent here")


def _bpe(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """_set_vocab_gpt2: tokens by id, added ones CONTROL (special) or USER_DEFINED, padded."""
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise LoramergeError(f"{folder / 'tokenizer.json'}: not a GPT-2 style BPE: {exc}") from None
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = [t.decode() if isinstance(t, bytes) else t for t, _, _ in vocab.all_tokens()]
    types = [int(TokenType.NORMAL)] * len(tokens)
    for added in tokenizer.get("added_tokens") or []:
        if added["id"] < len(tokens):
            content = added["content"]
            special = added.get("special") or (content.startswith("<|") and content.endswith("|>"))
            types[added["id"]] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    tokens, types = _pad(tokens, types, vocab_size)
    return tokens, types, _pre_tokenizer(tokenizer)


def _sentencepiece(folder: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """_set_vocab_sentencepiece through gguf's SentencePieceVocab (needs `sentencepiece`)."""
    try:
        vocab = gguf.vocab.SentencePieceVocab(folder)
    except (ImportError, RuntimeError):  # gguf raises RuntimeError when the module is missing
        raise LoramergeError(
            "this model's tokenizer is SentencePiece (tokenizer.model): pip install sentencepiece"
        ) from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.decode() if isinstance(text, bytes) else text)
        scores.append(score)
        types.append(int(kind))
    tokens, types = _pad(tokens, types, vocab_size)
    return tokens, scores + [-1000.0] * (len(tokens) - len(scores)), types


def _pad(tokens: list[str], types: list[int], vocab_size: int) -> tuple[list[str], list[int]]:
    """Fill a vocabulary smaller than the embedding with UNUSED "[PAD{i}]" tokens."""
    missing = range(len(tokens), vocab_size)
    return tokens + [f"[PAD{i}]" for i in missing], types + [int(TokenType.UNUSED)] * len(missing)
