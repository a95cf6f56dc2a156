"""Read one pickled state dict (`pytorch_model.bin`, `adapter_model.bin`), only when allowed.

Loaded with `torch.load(weights_only=True, mmap=True)`: the tensors stay in the file's pages
until read. A pickle has no byte layout to copy from, so every tensor is decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loramerge import dtypes
from loramerge.errors import LoramergeError
from loramerge.source.safetensors_file import TensorInfo, copy_into


class PickleFile:
    """One pickled state dict of named tensors; the same reading face as a safetensors file."""

    def __init__(self, path: Path, *, allow_pickle: bool) -> None:
        self.path = Path(path)
        if not allow_pickle:
            raise LoramergeError(
                f"{self.path} is a pickle file, which can run code when loaded; pass "
                "--allow-pickle to load it anyway (with torch.load(weights_only=True))"
            )
        self._arrays = _load(self.path)
        # offset 0 for all: a stable sort by (file, offset) keeps the pickle's own order
        self.tensors = {
            name: TensorInfo(name, self.path, dtypes.from_numpy(a.dtype), a.shape, 0, a.nbytes)
            for name, a in self._arrays.items()
        }

    def read(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """One tensor: the loaded array, or a copy in a view of `into` (uint8, 1-D)."""
        array = self._arrays[name]
        return array if into is None else copy_into(array, into)

    def read_part(self, name: str, start: int, stop: int, into: np.ndarray) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor, copied into a view of `into`."""
        return copy_into(self._arrays[name].reshape(-1)[start:stop], into)

    def close(self) -> None:
        """Drop the tensors (and with them the file's mapping)."""
        self._arrays = {}


def _load(path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise LoramergeError(f"{path}: cannot load pickle checkpoint ({exc})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise LoramergeError(f"{path}: not a state dict of named tensors")
    return {k: dtypes.as_numpy(v) for k, v in state.items()}
