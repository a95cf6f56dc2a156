"""A checkpoint on disk: one or more tensor files seen as one name -> tensor mapping.

Handles a folder with sharded safetensors and `model.safetensors.index.json`, a folder with a
single `model.safetensors`, a bare `.safetensors` file, and (only when the user allows pickle)
`pytorch_model.bin` / `adapter_model.bin`, loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loramerge.errors import LoramergeError
from loramerge.jsonfile import read_json_object
from loramerge.source.pickle_file import PickleFile
from loramerge.source.safetensors_file import SafetensorsFile, TensorInfo

if TYPE_CHECKING:
    from loramerge.source.gguf_file import GGUFWeights

_scratch = threading.local()
_PAGE = 4096


def read_buffer(nbytes: int, phase: int = 0) -> np.ndarray:
    """This thread's reusable read buffer (uint8), grown as needed: no fresh pages per tensor.

    Its address is `phase` modulo the 4 KiB page, so a writer can pass it to the disk directly
    when that is where the bytes go in the output file.
    """
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < nbytes + _PAGE:
        buffer = _scratch.buffer = np.empty(nbytes + _PAGE, dtype=np.uint8)
    skip = (phase - buffer.ctypes.data) % _PAGE
    return buffer[skip : skip + nbytes]


@dataclass(frozen=True)
class RawRange:
    """Bytes of one stored tensor: copy them without decoding."""

    fd: int
    offset: int
    nbytes: int


class Checkpoint:
    """Tensors of one checkpoint, readable one at a time; use as a context manager."""

    def __init__(self, path: Path, files: list[SafetensorsFile | PickleFile | GGUFWeights]):
        self.path = path
        self._files = files
        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, SafetensorsFile | PickleFile | GGUFWeights] = {}
        for file in files:
            for name, info in file.tensors.items():
                if name in self.tensors:
                    raise LoramergeError(
                        f"{path}: tensor {name!r} is stored in both "
                        f"{self.tensors[name].path.name} and {info.path.name}"
                    )
                self.tensors[name] = info
                self._owner[name] = file

    @property
    def files(self) -> list[Path]:
        """The weight files this checkpoint reads."""
        return [f.path for f in self._files]

    @property
    def gguf(self) -> GGUFWeights | None:
        """The GGUF file this checkpoint is, if it is one."""
        only = self._files[0] if len(self._files) == 1 else None
        return only if _is_gguf(only) else None

    def read(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """Read one tensor into CPU memory (into a view of the uint8 buffer `into`, if given)."""
        return self._owner[name].read(name, into)

    def read_part(self, name: str, start: int, stop: int, into: np.ndarray) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor, in a view of the uint8 buffer `into`."""
        return self._owner[name].read_part(name, start, stop, into)

    def raw(self, name: str) -> RawRange | None:
        """Byte range of a tensor stored as raw bytes in a file, or None (pickle).

        For a GGUF file, the range of its stored blocks (not of the float32 values it reads as).
        """
        owner = self._owner[name]
        if _is_gguf(owner):
            return RawRange(owner.fd, *owner.raw(name))
        if not isinstance(owner, SafetensorsFile):
            return None
        info = self.tensors[name]
        return RawRange(owner.fd, info.offset, info.nbytes)

    def close(self) -> None:
        """Close every open file."""
        for file in self._files:
            file.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_gguf(path: Path) -> bool:
    """Whether PATH is a file named .gguf."""
    path = Path(path)
    return path.suffix == ".gguf" and path.is_file()


def _is_gguf(reader: object) -> bool:
    """Whether a checkpoint's reader is a GGUF file's (whose module, and the gguf package, load
    only once one is opened: without them, no reader can be one)."""
    module = sys.modules.get("loramerge.source.gguf_file")
    return module is not None and isinstance(reader, module.GGUFWeights)


def open_weights(
    path: Path, *, stem: str, allow_pickle: bool, dequantize: bool = True
) -> Checkpoint:
    """Open the weights of a folder (named `{stem}.safetensors` and friends) or a single file.

    An NF4 checkpoint (bitsandbytes layout) reads as its dequantized float weights unless
    `dequantize` is False.
    """
    checkpoint = _open(Path(path), stem, allow_pickle)
    if not dequantize:
        return checkpoint
    from loramerge.source import nf4  # (it builds on this module)
    from loramerge.source.model_folder import read_config

    if not nf4.is_nf4(checkpoint):
        return checkpoint
    return nf4.dequantized(checkpoint, read_config(path))


def _open(path: Path, stem: str, allow_pickle: bool) -> Checkpoint:
    if not path.exists():
        raise LoramergeError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _open_files(path, [path])
        if path.suffix == ".gguf":
            from loramerge.source.gguf_file import GGUFWeights  # the gguf package, only now

            return Checkpoint(path, [GGUFWeights(path)])
        if path.suffix in (".bin", ".pt", ".pth"):
            return Checkpoint(path, [PickleFile(path, allow_pickle=allow_pickle)])
        raise LoramergeError(f"{path}: not a .safetensors or .gguf file or a checkpoint folder")
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = _read_index(path, index)
        checkpoint = _open_files(path, list(dict.fromkeys(path / s for s in weight_map.values())))
        for name, shard in weight_map.items():
            info = checkpoint.tensors.get(name)
            if info is None or info.path != path / shard:
                checkpoint.close()
                raise LoramergeError(f"{index}: tensor {name!r} is not in {shard}")
        return checkpoint
    single = path / f"{stem}.safetensors"
    if single.is_file():
        return _open_files(path, [single])
    pickled = path / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin")
    if pickled.is_file():
        return Checkpoint(path, [PickleFile(pickled, allow_pickle=allow_pickle)])
    if (path / "pytorch_model.bin.index.json").is_file():
        raise LoramergeError(f"{path}: sharded pickle checkpoints are not supported; convert them")
    raise LoramergeError(f"{path}: no {stem}.safetensors or {stem}.safetensors.index.json found")


def _open_files(root: Path, paths: list[Path]) -> Checkpoint:
    files: list[SafetensorsFile] = []
    try:
        for p in paths:
            files.append(SafetensorsFile(p))
        return Checkpoint(root, files)
    except BaseException:
        for f in files:
            f.close()
        raise


def _read_index(folder: Path, index: Path) -> dict[str, str]:
    """The index's weight_map, every shard checked to exist inside the folder."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoramergeError(f"{index}: no weight_map")
    real_folder = folder.resolve()
    # A Hugging Face cache snapshot links each file to its repo's blob store.
    blobs = real_folder.parent.parent / "blobs" if real_folder.parent.name == "snapshots" else None
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "\x00" in shard:
            raise LoramergeError(f"{index}: tensor {name!r} maps to {shard!r}, not a file name")
        candidate = folder / shard
        try:
            target = candidate.resolve()
            inside = not Path(shard).is_absolute() and (
                real_folder in target.parents
                or (blobs is not None and target.parent == blobs and ".." not in Path(shard).parts)
            )
            exists = candidate.is_file()
        except (OSError, RuntimeError) as exc:  # name too long, symlink loop, ...
            raise LoramergeError(
                f"{index}: shard {shard[:80]!r} cannot be opened ({exc})"
            ) from None
        if not inside:
            raise LoramergeError(f"{index}: shard {shard!r} lies outside {folder}")
        if not exists:
            raise LoramergeError(f"{index}: shard {shard!r} does not exist")
    return weight_map
