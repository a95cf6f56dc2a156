"""Safetensors dtype names, their numpy dtypes and sizes: the one table every part shares.

Tensors travel as numpy arrays (bfloat16 and float8 from `ml_dtypes`), so the common CPU merge
never imports torch; `as_torch` and `as_numpy` cross over, without copying, where torch is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import torch

# Safetensors dtype string -> numpy dtype (its itemsize is the stored size).
_TABLE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
# torch attribute names, for the dtypes torch has (its unsigned and float8 types are newer).
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# User-facing names (--dtype, config.json) <-> safetensors names.
_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


def is_known(dtype: str) -> bool:
    """True for a dtype string the safetensors format defines."""
    return dtype in _TABLE


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype."""
    return _TABLE[dtype].itemsize


def to_numpy(dtype: str) -> np.dtype:
    """The numpy dtype for a safetensors dtype string."""
    return _TABLE[dtype]


def from_numpy(np_dtype: np.dtype) -> str:
    """The safetensors dtype string for a numpy dtype."""
    for name, candidate in _TABLE.items():
        if candidate == np_dtype:
            return name
    raise ValueError(f"no safetensors dtype for {np_dtype}")


def to_torch(dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype string (imports torch)."""
    import torch

    torch_dtype = getattr(torch, _TORCH_NAMES[dtype], None)
    if torch_dtype is None:
        raise ValueError(f"this torch build has no dtype for {dtype}")
    return torch_dtype


def from_torch(torch_dtype: torch.dtype) -> str:
    """The safetensors dtype string for a torch dtype."""
    import torch

    for name, attr in _TORCH_NAMES.items():
        if getattr(torch, attr, None) == torch_dtype:
            return name
    raise ValueError(f"no safetensors dtype for {torch_dtype}")


def as_torch(array: np.ndarray) -> torch.Tensor:
    """A CPU torch tensor sharing `array`'s memory (torch cannot wrap ml_dtypes arrays itself)."""
    import torch

    flat = torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return flat.view(to_torch(from_numpy(array.dtype))).view(array.shape)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array sharing a contiguous CPU tensor's memory, in the matching numpy dtype."""
    import torch

    dtype = to_numpy(from_torch(tensor.dtype))
    flat = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return flat.view(dtype).reshape(tuple(tensor.shape))


def from_name(name: str) -> str:
    """Safetensors dtype for a user-facing name such as 'bfloat16'."""
    return _NAMES[name]


def to_name(dtype: str) -> str:
    """User-facing name ('bfloat16') for a float safetensors dtype ('BF16')."""
    return {v: k for k, v in _NAMES.items()}[dtype]
