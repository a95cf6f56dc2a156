"""Which ggml type each tensor of a GGUF file gets: llama.cpp's rules as a pure function.

`tensor_types` is `llama_tensor_get_type` of llama.cpp's src/llama-quant.cpp (with its helpers
`tensor_allows_quantization`, `tensor_get_category`, `tensor_type_fallback` and the counters of
`init_quantize_state_counters`) for the file types whose tensor types loramerge can write, without
an importance matrix or per-tensor overrides: the mixtures Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M,
Q6_K and the plain Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16, F32 (`pure=True` is llama-quantize's
`--pure`: one type for every quantizable tensor, shapes a block does not divide falling back).
Tensors llama-quantize leaves alone keep the type convert_hf_to_gguf.py gives them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

T = GGMLQuantizationType
F = LlamaFileType

DEFAULT_TYPE: dict[LlamaFileType, GGMLQuantizationType] = {
    F.ALL_F32: T.F32,
    F.MOSTLY_F16: T.F16,
    F.MOSTLY_BF16: T.BF16,
    F.MOSTLY_Q8_0: T.Q8_0,
    F.MOSTLY_Q4_0: T.Q4_0,
    F.MOSTLY_Q4_1: T.Q4_1,
    F.MOSTLY_Q5_0: T.Q5_0,
    F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q2_K: T.Q2_K,
    F.MOSTLY_Q3_K_S: T.Q3_K,
    F.MOSTLY_Q3_K_M: T.Q3_K,
    F.MOSTLY_Q3_K_L: T.Q3_K,
    F.MOSTLY_Q4_K_S: T.Q4_K,
    F.MOSTLY_Q4_K_M: T.Q4_K,
    F.MOSTLY_Q5_K_S: T.Q5_K,
    F.MOSTLY_Q5_K_M: T.Q5_K,
    F.MOSTLY_Q6_K: T.Q6_K,
}

# `--gguf-type` names -> (llama.cpp file type, pure). The plain K types are llama-quantize --pure
# (labelled with the file type whose mixture changes least); q4_k_m, q5_k_m, q6_k and the 32-block
# types follow llama-quantize's own rules for that file type (Q4_0 puts output.weight in Q6_K);
# f32, f16, bf16 and q8_0 also equal convert_hf_to_gguf.py --outtype.
GGUF_TYPES: dict[str, tuple[LlamaFileType, bool]] = {
    "f32": (F.ALL_F32, False),
    "f16": (F.MOSTLY_F16, False),
    "bf16": (F.MOSTLY_BF16, False),
    "q8_0": (F.MOSTLY_Q8_0, False),
    "q4_0": (F.MOSTLY_Q4_0, False),
    "q4_1": (F.MOSTLY_Q4_1, False),
    "q5_0": (F.MOSTLY_Q5_0, False),
    "q5_1": (F.MOSTLY_Q5_1, False),
    "q2_k": (F.MOSTLY_Q2_K, True),
    "q3_k": (F.MOSTLY_Q3_K_S, True),
    "q4_k": (F.MOSTLY_Q4_K_S, True),
    "q5_k": (F.MOSTLY_Q5_K_S, True),
    "q6_k": (F.MOSTLY_Q6_K, False),
    "q4_k_m": (F.MOSTLY_Q4_K_M, False),
    "q5_k_m": (F.MOSTLY_Q5_K_M, False),
}

# tensor_type_fallback: a type whose block does not divide the row -> a smaller block.
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

# tensor_allows_quantization: names that are never quantized (matched as substrings).
_KEEP = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip
_KEEP_EXACT = ("position_embd.weight", "token_types.weight")

# tensor_get_category, in its order of tests.
_CATEGORIES = (
    ("attn_qkv.weight", "attn_qkv"),
    ("attn_kv_b.weight", "attn_kv_b"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)
_ATTN_V = ("attn_v", "attn_qkv", "attn_kv_b")
_SEVENTY_B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelInfo:
    """The hyperparameters llama.cpp's rules read: architecture (GGUF name), layers, heads."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        """hparams.n_gqa(): query heads per KV head."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp sizes the model LLM_TYPE_70B (src/models/*.cpp: by layer count and heads)."""
        if self.arch == "llama" and self.n_head == self.n_head_kv:
            return False
        return _SEVENTY_B_LAYERS.get(self.arch) == self.n_layer


def category(name: str) -> str:
    """tensor_get_category: output, token_embd, attn_v, ffn_down, ... or other."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for key, cat in _CATEGORIES if key in name), "other")


def converter_type(name: str, shape: Sequence[int], outtype: GGMLQuantizationType):
    """convert_hf_to_gguf.py's (and convert_lora_to_gguf.py's) type for a tensor at --outtype
    f32/f16/bf16/q8_0."""
    matrix = name.endswith((".weight", ".lora_a", ".lora_b"))
    if len(shape) <= 1 or name.endswith("_norm.weight") or not matrix:
        return T.F32
    if shape[-1] % GGML_QUANT_SIZES[outtype][0]:
        return T.F16
    return outtype


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization with llama-quantize's defaults (output.weight quantized)."""
    return (
        _n_dims(shape) >= 2
        and name.endswith("weight")
        and not any(key in name for key in _KEEP)
        and name not in _KEEP_EXACT
    )


def tensor_types(
    tensors: Iterable[tuple[str, Sequence[int]]],
    ftype: LlamaFileType,
    model: ModelInfo,
    pure: bool = False,
) -> dict[str, GGMLQuantizationType]:
    """The type llama-quantize gives each (GGUF name, numpy shape) of a model, for one file type.

    Tensors it would not quantize keep convert_hf_to_gguf.py's type (at the file type's own float
    type, or F16 for quantized file types).
    """
    default = DEFAULT_TYPE[ftype]
    tensors = sorted(tensors, key=lambda t: (_layer(t[0]), t[0]))
    state = _State(model, ftype, n_attn_v=sum(category(n) in _ATTN_V for n, _ in tensors))
    state.tied = not any(category(n) == "output" for n, _ in tensors)
    unquantized = default if default in (T.F32, T.F16, T.BF16) else T.F16
    out = {}
    for name, shape in tensors:
        if not allows_quantization(name, shape):
            out[name] = converter_type(name, shape, unquantized)
        elif default in (T.F32, T.F16, T.BF16):
            out[name] = default
        else:
            chosen = default if pure else state.choose(name, shape[-1], default)
            out[name] = _fallback(chosen, shape[-1])
    return out


def _n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last one above 1 (numpy order: leading 1s do not count)."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def _layer(name: str) -> int:
    """llama_model_loader's sort key: the block number, -1 outside blocks."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1


def _fallback(qtype: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
    """tensor_type_fallback: a smaller block when the row is not whole blocks, else F16."""
    if ncols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    smaller = _FALLBACK.get(qtype, qtype)
    return smaller if ncols % GGML_QUANT_SIZES[smaller][0] == 0 else T.F16


def _more_bits(i: int, n: int) -> bool:
    """use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _State:
    """quantize_state_impl's counters and llama_tensor_get_type_impl's rules."""

    def __init__(self, model: ModelInfo, ftype: LlamaFileType, n_attn_v: int) -> None:
        self.model, self.ftype = model, ftype
        self.n_attn_v, self.i_attn_v, self.i_ffn_down = n_attn_v, 0, 0
        self.tied = True

    def choose(self, name: str, ncols: int, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
        """The mixture's type for one quantizable tensor (before the fallback)."""
        cat, m, ft = category(name), self.model, self.ftype
        falcon = m.arch == "falcon"
        if cat == "output" or (self.tied and cat == "token_embd"):
            if falcon or ncols % GGML_QUANT_SIZES[qtype][0]:
                return T.Q8_0
            return qtype if qtype == T.Q8_0 else T.Q6_K
        if cat == "token_embd":
            return qtype
        if cat in _ATTN_V:
            qtype = self._attn_v(qtype)
            self.i_attn_v += 1
            return qtype
        if cat == "attn_k" and m.n_expert == 8:
            return T.Q8_0
        if cat == "ffn_down":
            # llama.cpp counts ffn_down tensors as layers, except with experts (then: the name)
            i = _layer(name) if m.n_expert > 1 else self.i_ffn_down
            qtype = self._ffn_down(qtype, i, m.n_layer, falcon)
            self.i_ffn_down += 1
            return qtype
        if cat == "attn_output":
            if falcon:
                return T.Q4_K if ft == F.MOSTLY_Q3_K_L else qtype
            if m.n_expert == 8:
                mixtures = (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S)
                return T.Q5_K if ft in (*mixtures, F.MOSTLY_Q4_K_M) else qtype
            by_ftype = {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K}
            return by_ftype.get(ft, qtype)
        return qtype

    def _attn_v(self, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
        m, ft, i = self.model, self.ftype, self.i_attn_v
        if ft == F.MOSTLY_Q2_K:
            qtype = T.Q4_K if m.n_gqa >= 4 else T.Q3_K
        elif ft == F.MOSTLY_Q3_K_M:
            qtype = T.Q5_K if i < 2 else T.Q4_K
        elif ft == F.MOSTLY_Q3_K_L:
            qtype = T.Q5_K
        elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _more_bits(i, self.n_attn_v):
            qtype = T.Q6_K
        elif ft == F.MOSTLY_Q4_K_S and i < 4:
            qtype = T.Q5_K
        if m.is_70b and qtype in (T.Q3_K, T.Q4_K):
            qtype = T.Q5_K
        return T.Q8_0 if m.n_expert == 8 else qtype

    def _ffn_down(self, qtype, i: int, n: int, falcon: bool) -> GGMLQuantizationType:
        ft = self.ftype
        if ft == F.MOSTLY_Q2_K:
            return T.Q3_K
        if ft == F.MOSTLY_Q3_K_M:
            if i < n // 16:
                return T.Q5_K
            return T.Q4_K if not falcon or _more_bits(i, n) else T.Q3_K
        if ft == F.MOSTLY_Q3_K_L:
            return T.Q4_K if falcon else T.Q5_K
        if ft == F.MOSTLY_Q4_K_M:
            if falcon:
                return T.Q6_K if i < n // 16 else T.Q5_K if _more_bits(i, n) else T.Q4_K
            return T.Q6_K if _more_bits(i, n) else qtype
        if ft == F.MOSTLY_Q5_K_M and _more_bits(i, n):
            return T.Q6_K
        if ft == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
            return T.Q5_K
        return qtype
