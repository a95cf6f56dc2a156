"""Safetensors dtype names, their torch dtypes and sizes: the one table every part shares."""

from __future__ import annotations

import torch

# Safetensors dtype string -> (item size in bytes, torch dtype or None when torch lacks it).
_TABLE: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "I16": (2, torch.int16),
    "U16": (2, getattr(torch, "uint16", None)),
    "I32": (4, torch.int32),
    "U32": (4, getattr(torch, "uint32", None)),
    "I64": (8, torch.int64),
    "U64": (8, getattr(torch, "uint64", None)),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "F32": (4, torch.float32),
    "F64": (8, torch.float64),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# User-facing names (--dtype, config.json) <-> safetensors names.
_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


def is_known(dtype: str) -> bool:
    """True for a dtype string the safetensors format defines."""
    return dtype in _TABLE


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype."""
    return _TABLE[dtype][0]


def to_torch(dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype string."""
    torch_dtype = _TABLE[dtype][1]
    if torch_dtype is None:
        raise ValueError(f"this torch build has no dtype for {dtype}")
    return torch_dtype


def from_torch(torch_dtype: torch.dtype) -> str:
    """The safetensors dtype string for a torch dtype."""
    for name, (_, candidate) in _TABLE.items():
        if candidate == torch_dtype:
            return name
    raise ValueError(f"no safetensors dtype for {torch_dtype}")


def from_name(name: str) -> str:
    """Safetensors dtype for a user-facing name such as 'bfloat16'."""
    return _NAMES[name]


def to_name(dtype: str) -> str:
    """User-facing name ('bfloat16') for a float safetensors dtype ('BF16')."""
    return {v: k for k, v in _NAMES.items()}[dtype]
