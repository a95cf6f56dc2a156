"""Quantized candidates, dequantized and held to their format's own error bound per block.

A GGUF file (llama.cpp) or an NF4 checkpoint (bitsandbytes layout) cannot hold the merged
weights exactly. Each element is checked against

    |dequantized - expected| <= format bound + tolerance * ulp_source(max(|W0|, |expected|))

where the second term allows for the rounding of the 16-bit merge the file was quantized from.
The format bounds (stated in docs/verify.md):

- F32, F16, BF16 storage: half an ulp of the stored type at |expected|;
- GGUF Q8_0 (blocks of 32, scale d = absmax/127 stored as float16): 0.5625 |d| (half a step,
  plus the scale's own float16 rounding times the largest code, 127);
- GGUF Q4_0 (blocks of 32, d = signed absmax / -8): 1.0625 |d| (a full step where the positive
  end is clipped to 7, plus the float16 scale);
- NF4 (bitsandbytes): half the widest gap of the code table times the block's absmax, plus the
  difference between the true absmax and the stored (double-quantized) one, plus half an ulp of
  the dequantized dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from loramerge import dtypes, nf4_layout
from loramerge.compare import ulp
from loramerge.errors import LoramergeError
from loramerge.jsonfile import parse_json
from loramerge.source.checkpoint import Checkpoint

# (dequantized float64 values in the Hugging Face layout, bound(expected) -> per-element bound)
Dequantized = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], str]
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_BLOCK_BOUND = {"Q8_0": (34, 0.5625), "Q4_0": (18, 1.0625)}  # bytes per 32-block, bound / |d|


def ulp_of(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`compare.ulp` for a float64 CPU torch tensor and a torch dtype."""
    spacing = ulp(magnitude.numpy(), dtypes.to_numpy(dtypes.from_torch(dtype)))
    return torch.from_numpy(spacing)


def _float_bound(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda expected: 0.5 * ulp_of(expected, dtype)


class GGUFCandidate:
    """A llama.cpp GGUF file read with the gguf package (names mapped back to the HF ones)."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as exc:  # the reader raises many types on a broken file
            raise LoramergeError(f"{path}: not a readable GGUF file ({exc})") from None
        self.arch = self._field("general.architecture")
        arch_ids = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
        if self.arch not in arch_ids:
            raise LoramergeError(f"{path}: unknown GGUF architecture {self.arch!r}")
        blocks = int(self._field(f"{self.arch}.block_count"))
        self.heads = int(self._field(f"{self.arch}.attention.head_count"))
        kv = self._field(f"{self.arch}.attention.head_count_kv", None)
        self.kv_heads = int(kv) if kv is not None else self.heads
        self._names = gguf.get_tensor_name_map(arch_ids[self.arch], blocks)
        self.tensors = {t.name: t for t in self._reader.tensors}
        self._quants = gguf.quants
        self._types = gguf.GGMLQuantizationType

    def locate(self, hf_name: str) -> str | None:
        """The GGUF name of a Hugging Face tensor name."""
        name = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        return name if name in self.tensors else None

    def read(self, hf_name: str, shape: tuple[int, ...]) -> Dequantized:
        """Dequantized values in the HF layout, with the bound of their storage type."""
        tensor = self.tensors[self.locate(hf_name)]
        kind = tensor.tensor_type.name
        dequantized = self._quants.dequantize(tensor.data, tensor.tensor_type)
        values = torch.from_numpy(np.array(dequantized, dtype=np.float64))
        if values.numel() != int(np.prod(shape)):
            raise LoramergeError(f"{self.path}: {tensor.name} has {values.numel()} elements")
        values = values.reshape(shape)
        if kind in _FLOAT_TYPES:
            bound = _float_bound(_FLOAT_TYPES[kind])
        elif kind in _BLOCK_BOUND:
            size, factor = _BLOCK_BOUND[kind]
            raw = np.ascontiguousarray(tensor.data).reshape(-1, size)
            scale = torch.from_numpy(raw[:, :2].copy().view(np.float16).astype(np.float64))
            per_element = (factor * scale.abs()).repeat_interleave(32).reshape(shape)
            bound = lambda expected, b=per_element: b  # noqa: E731
        else:
            raise LoramergeError(
                f"{self.path}: {tensor.name} is {kind}; loramerge states bounds for F32, F16, "
                "BF16, Q8_0 and Q4_0 only"
            )
        rotary = tensor.name.endswith(("attn_q.weight", "attn_k.weight"))
        if self.arch == "llama" and rotary:
            # llama.cpp interleaves the rotary halves of q and k (convert_hf_to_gguf.py permute)
            heads = self.heads if "attn_q" in tensor.name else self.kv_heads
            values = _unpermute(values, heads)
            bound = (lambda inner, h: lambda e: _unpermute(inner(_permute(e, h)), h))(bound, heads)
        return values, bound, kind

    def extra(self, located: set[str]) -> list[str]:
        """GGUF tensors no planned tensor maps to."""
        return sorted(set(self.tensors) - located)

    def close(self) -> None:
        """Nothing to release (the reader memory-maps the file)."""

    def _field(self, key: str, default: object = LoramergeError) -> object:
        field = self._reader.get_field(key)
        if field is None:
            if default is LoramergeError:
                raise LoramergeError(f"{self.path}: GGUF metadata has no {key}")
            return default
        return field.contents()


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class NF4Candidate:
    """A checkpoint whose Linear weights bitsandbytes stored as NF4 (the transformers layout)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.path = checkpoint.path
        self.checkpoint = checkpoint  # the tensors it did not quantize are read as they are
        self.tensors = checkpoint.tensors

    def locate(self, hf_name: str) -> str | None:
        """The name is the same; present or not."""
        return hf_name if hf_name in self.tensors else None

    def quantized(self, hf_name: str) -> bool:
        """Whether this tensor is stored as NF4."""
        return hf_name + nf4_layout.STATE in self.tensors

    def read(self, hf_name: str, shape: tuple[int, ...]) -> Dequantized:
        """Dequantize as bitsandbytes does: code table[nibble] * block absmax, high nibble first."""

        def read(name: str) -> torch.Tensor:
            return dtypes.as_torch(self.checkpoint.read(name))

        state = parse_json(
            bytes(read(hf_name + nf4_layout.STATE).numpy()), f"{self.path}: {hf_name}"
        )
        if not isinstance(state, dict) or state.get("quant_type") != "nf4":
            raise LoramergeError(f"{self.path}: {hf_name} is not NF4-quantized")
        numel, blocksize = int(np.prod(shape)), int(state["blocksize"])
        packed = read(hf_name).reshape(-1).to(torch.int64)
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel]
        table = read(hf_name + ".quant_map").to(torch.float64)
        absmax = read(hf_name + ".absmax")
        if hf_name + ".nested_absmax" in self.tensors:  # double quantization of the absmax
            nested = read(hf_name + ".nested_quant_map").to(torch.float64)
            scales = read(hf_name + ".nested_absmax").to(torch.float64)
            nested_blocks = int(state["nested_blocksize"])
            per = scales.repeat_interleave(nested_blocks)[: absmax.numel()]
            absmax = nested[absmax.to(torch.int64)] * per + float(state["nested_offset"])
        absmax = absmax.to(torch.float64)
        stored = absmax.repeat_interleave(blocksize)[:numel]
        dtype = getattr(torch, str(state.get("dtype", "float32")))
        values = (table[codes] * stored).to(torch.float32).to(dtype).to(torch.float64)
        half_gap = float((table[1:] - table[:-1]).max()) / 2

        def bound(expected: torch.Tensor) -> torch.Tensor:
            flat = expected.reshape(-1).abs()
            blocks = -(-numel // blocksize)
            padded = torch.zeros(blocks * blocksize, dtype=torch.float64)
            padded[:numel] = flat
            true_absmax = padded.reshape(blocks, blocksize).amax(1).repeat_interleave(blocksize)
            true_absmax = true_absmax[:numel]
            format_bound = half_gap * true_absmax + (true_absmax - stored).abs()
            return (format_bound + 0.5 * ulp_of(flat, dtype)).reshape(shape)

        return values.reshape(shape), bound, "nf4"

    def extra(self, located: set[str]) -> list[str]:
        """Stored tensors that are neither planned nor NF4 bookkeeping."""
        parts = tuple(nf4_layout.PARTS)
        return sorted(n for n in self.tensors if n not in located and not n.endswith(parts))

    def close(self) -> None:
        """Close the checkpoint."""
        self.checkpoint.close()
