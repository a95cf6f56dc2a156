"""A checkpoint's tensors split over shards named the Hugging Face way, with their index."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from loramerge.sink.direct_io import Cached
from loramerge.sink.safetensors_writer import Entry, SafetensorsWriter, aligned_order, split_shards

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class ShardedWriter:
    """All shards of one checkpoint, headers written up front; tensors go in by name (any order,
    though `order` lets each shard's hash keep pace).

    `late` names small uint8 vectors whose length is known only once they are computed (NF4
    quantization states): they are kept in memory and written as one last shard by `finish`.
    `hash_from_file` is passed to each shard's writer.
    """

    def __init__(
        self,
        folder: Path,
        entries: list[Entry],
        max_shard_bytes: int,
        metadata: dict,
        late: tuple[str, ...] = (),
        hash_from_file: bool = False,
        cached: Cached = "none",
    ):
        self.folder = Path(folder)
        shards = [aligned_order(s) for s in split_shards(entries, max_shard_bytes)]
        count = len(shards) + (1 if late else 0)
        self.files = (
            [SINGLE]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self.order = _interleaved(shards)
        self.hashes: dict[str, str] = {}
        self._writers: list[SafetensorsWriter] = []
        self._owner: dict[str, SafetensorsWriter] = {}
        self._weight_map: dict[str, str] = {}
        self._total = sum(e.nbytes for e in entries)
        self._metadata = metadata
        self._cached = cached
        self._late: dict[str, bytes | None] = dict.fromkeys(late)
        self._late_lock = threading.Lock()
        try:
            for name, shard in zip(self.files[: len(shards)], shards, strict=True):
                writer = SafetensorsWriter(
                    self.folder / name, shard, metadata, hash_from_file, cached
                )
                self._writers.append(writer)
                for entry in shard:
                    self._owner[entry.name] = writer
                    self._weight_map[entry.name] = name
        except BaseException:
            self.abort()
            raise

    config_updates: dict = {}  # a plain safetensors folder changes nothing in config.json
    description: dict = {"format": "safetensors"}

    def copyable(self, name: str) -> bool:
        """Every unchanged tensor may be copied as raw bytes."""
        return True

    def parts_any_order(self, name: str) -> bool:
        """Whether a tensor's parts may come in any order, from several threads at once."""
        return name not in self._late

    def position(self, name: str) -> int:
        """File offset of tensor `name`'s bytes in its shard."""
        return self._owner[name].position(name)

    def granule(self, name: str) -> int:
        """Any number of elements may be written at a time."""
        return 1

    def write(self, name: str, data, start: int = 0) -> None:
        """Write one tensor (an array, or its bytes) to its place (thread-safe, any order), or
        the part of it from flat element `start` on (a tensor's parts in any order too, but for
        the few gathered whole: `parts_any_order`)."""
        offset = 0
        if isinstance(data, np.ndarray):
            offset = start * data.itemsize
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if name in self._late:
            with self._late_lock:
                self._late[name] = bytes(data)
            return
        self._owner[name].write(name, data, offset)

    def copy_stored(self, name: str, stored) -> bool:
        """Never takes stored NF4 parts (a plain safetensors folder stores weights dequantized)."""
        return False

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int, start: int = 0) -> None:
        """Write one tensor (or its bytes from `start` on) by copying bytes from an open file
        (thread-safe, any order)."""
        self._owner[name].copy(name, src_fd, src_offset, nbytes, start)

    def finish(self) -> None:
        """Flush and close every shard (the late one written now); the index when there are
        several."""
        if self._late:
            self._write_late()
        for name, writer in zip(self.files, self._writers, strict=True):
            writer.finish()
            self.hashes[name] = writer.digest
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self._total},
                "weight_map": dict(sorted(self._weight_map.items())),
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _write_late(self) -> None:
        missing = [name for name, data in self._late.items() if data is None]
        if missing:
            raise RuntimeError(f"never written: {missing[:5]}")
        entries = [Entry(name, "U8", (len(data),)) for name, data in self._late.items()]
        writer = SafetensorsWriter(
            self.folder / self.files[-1], entries, self._metadata, cached=self._cached
        )
        self._writers.append(writer)
        for name, data in self._late.items():
            writer.write(name, data)
            self._weight_map[name] = self.files[-1]
            self._total += len(data)

    def cancel(self) -> None:
        """Wake every thread waiting on a shard, so a failed write can wind down."""
        for writer in self._writers:
            writer.cancel()

    def abort(self) -> None:
        """Close every shard without checks."""
        for writer in self._writers:
            writer.close()


def _interleaved(shards: list[list[Entry]]) -> list[str]:
    """Tensor names in file order within each shard, the shards advancing at the same pace, so
    their hashes (one thread per shard) run side by side."""
    keyed = []
    for shard in shards:
        total = sum(e.nbytes for e in shard) or 1
        done = 0
        for entry in shard:
            keyed.append((done / total, len(keyed), entry.name))
            done += entry.nbytes
    return [name for _, _, name in sorted(keyed)]
