"""Quantized candidates, dequantized and held to their format's own error bound per element.

A GGUF file (llama.cpp) or an NF4 checkpoint (bitsandbytes layout) cannot hold the merged
weights exactly. Each element is checked against

    |dequantized - expected| <= format bound(expected, slack)

where `slack` is how far the values the file was quantized from may sit from the float64
expected ones: the rounding of a 16-bit merge (tolerance ulps of the source dtype; of float32
for a GGUF base, merged straight into the file's type) and the error of a float32 merge. The
format bounds (derived in docs/verify.md):

- F32, F16, BF16 storage: half an ulp of the stored type at |expected|, plus the slack;
- GGUF 32-element types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): a multiple of the block's stored scale
  (`quant.ggml.bounds.block_bound`), plus the slack;
- GGUF K-quants (Q2_K..Q6_K): the distance from expected to the nearest point of the grid the
  block's stored scales and mins define, plus twice the slack (the code was chosen nearest to
  the quantized value, not to expected) and float32 arithmetic at the grid's magnitude;
- NF4 (bitsandbytes): half the widest gap of the code table times the block's absmax, plus the
  difference between the true absmax and the stored (double-quantized) one, plus half an ulp of
  the dequantized dtype, plus the slack.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from loramerge import dtypes, nf4_layout
from loramerge.compare import ulp
from loramerge.errors import LoramergeError
from loramerge.gguf_names import permute_qk, qk_heads, unpermute_qk
from loramerge.jsonfile import parse_json
from loramerge.quant.ggml import bounds
from loramerge.source.checkpoint import Checkpoint
from loramerge.source.gguf_file import GGUFWeights

# bound(expected, slack) -> per-element allowed |dequantized - expected| (float64 tensors)
Bound = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (dequantized float64 values in the Hugging Face layout, its bound, the stored type's name)
Dequantized = tuple[torch.Tensor, Bound, str]
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
GRID_F32 = 2.0**-20  # float32 arithmetic of a K-quant's quantizer and dequantizer, relative


def ulp_of(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`compare.ulp` for a float64 CPU torch tensor and a torch dtype."""
    spacing = ulp(magnitude.numpy(), dtypes.to_numpy(dtypes.from_torch(dtype)))
    return torch.from_numpy(spacing)


def _float_bound(dtype: torch.dtype) -> Bound:
    return lambda expected, slack: 0.5 * ulp_of(expected, dtype) + slack


class GGUFCandidate:
    """A llama.cpp GGUF file, read back in the Hugging Face names and layout (source.gguf_file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.weights = GGUFWeights(path)
        self.tensors = self.weights.tensors

    def locate(self, hf_name: str) -> str | None:
        """The name is the Hugging Face one; present or not."""
        return hf_name if hf_name in self.tensors else None

    def blocks(self, hf_name: str) -> tuple[str, bytes]:
        """(type name, stored bytes) of a tensor: untouched ones are compared byte for byte."""
        gname = self.weights.gguf_names[hf_name]
        return self.weights.model.tensors[gname].qtype.name, self.weights.model.read_blocks(gname)

    def read(self, hf_name: str, shape: tuple[int, ...]) -> Dequantized:
        """Dequantized values in the HF layout, with the bound of their storage type."""
        model, gname = self.weights.model, self.weights.gguf_names[hf_name]
        qtype = model.tensors[gname].qtype
        kind = qtype.name
        values = torch.from_numpy(self.weights.read(hf_name).astype(np.float64))
        if values.numel() != int(np.prod(shape)):
            raise LoramergeError(f"{self.path}: {gname} has {values.numel()} elements")
        values = values.reshape(shape)
        heads = qk_heads(hf_name, self.weights.config) if self.weights.arch.permute_qk else None
        offset = 1.0 if self.weights.arch.norm_offset and hf_name.endswith("norm.weight") else 0.0

        def to_file(t: torch.Tensor) -> np.ndarray:  # HF layout -> the file's rows
            array = t.numpy()
            return permute_qk(array, heads) if heads else array

        def to_hf(array: np.ndarray) -> torch.Tensor:
            array = array.reshape(shape)
            return torch.from_numpy(
                np.ascontiguousarray(unpermute_qk(array, heads) if heads else array)
            )

        if kind in FLOAT_TYPES:
            bound = _float_bound(FLOAT_TYPES[kind])
        elif qtype in bounds.LEGACY:
            per_element = to_hf(bounds.block_bound(model.read_blocks(gname), qtype))
            bound = lambda expected, slack, b=per_element: b + slack  # noqa: E731
        elif qtype in bounds.GRIDS:
            low, step, levels = bounds.grid(model.read_blocks(gname), qtype)

            def bound(expected: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
                e = to_file(expected).reshape(-1) + offset
                distance = bounds.nearest_distance(e, low, step, levels)
                magnitude = np.maximum(
                    np.abs(e), np.maximum(np.abs(low), np.abs(low + step * (levels - 1)))
                )
                return to_hf(distance + GRID_F32 * magnitude) + 2 * slack
        else:
            raise LoramergeError(f"{self.path}: {gname} is {kind}, which loramerge cannot bound")
        if offset:  # Gemma norms read back as stored - 1: one more float32 rounding
            inner = bound
            bound = lambda e, s: inner(e, s) + ulp_of(e.abs() + 1, torch.float32)  # noqa: E731
        return values, bound, kind

    def extra(self, located: set[str]) -> list[str]:
        """GGUF tensors no planned tensor maps to."""
        return sorted(set(self.tensors) - located)

    def close(self) -> None:
        """Close the file."""
        self.weights.close()


class NF4Candidate:
    """A checkpoint whose Linear weights bitsandbytes stored as NF4 (the transformers layout;
    `config` says which weights are Conv1D ones, quantized as their transpose)."""

    def __init__(self, checkpoint: Checkpoint, config: dict | None) -> None:
        self.path = checkpoint.path
        self.checkpoint = checkpoint  # the tensors it did not quantize are read as they are
        self.tensors = checkpoint.tensors
        self.config = config
        nf4_layout.check_model_type(nf4_layout.stored_weights(self.tensors), config, str(self.path))

    def locate(self, hf_name: str) -> str | None:
        """The name is the same; present or not."""
        return hf_name if hf_name in self.tensors else None

    def quantized(self, hf_name: str) -> bool:
        """Whether this tensor is stored as NF4."""
        return hf_name + nf4_layout.STATE in self.tensors

    def read(self, hf_name: str, shape: tuple[int, ...]) -> Dequantized:
        """Dequantize as bitsandbytes does: code table[nibble] * block absmax, high nibble first
        (a Conv1D weight's (out, in) blocks transposed back to its (in, out) `shape`)."""
        flip = nf4_layout.transposed(hf_name, self.config)
        matrix = nf4_layout.quantized_shape(hf_name, shape, self.config)

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

        def bound(expected: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
            flat = (expected.T if flip else expected).reshape(-1).abs()
            blocks = -(-numel // blocksize)
            padded = torch.zeros(blocks * blocksize, dtype=torch.float64)
            padded[:numel] = flat
            true_absmax = padded.reshape(blocks, blocksize).amax(1).repeat_interleave(blocksize)
            true_absmax = true_absmax[:numel]
            format_bound = half_gap * true_absmax + (true_absmax - stored).abs()
            within = (format_bound + 0.5 * ulp_of(flat, dtype)).reshape(matrix)
            return (within.T if flip else within) + slack

        values = values.reshape(matrix)
        return (values.T if flip else values), bound, "nf4"

    def extra(self, located: set[str]) -> list[str]:
        """Stored tensors that are neither planned nor NF4 bookkeeping."""
        parts = tuple(nf4_layout.PARTS)
        return sorted(n for n in self.tensors if n not in located and not n.endswith(parts))

    def close(self) -> None:
        """Close the checkpoint."""
        self.checkpoint.close()
