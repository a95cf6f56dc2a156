"""A checkpoint's tensors split over shards named the Hugging Face way, with their index."""

from __future__ import annotations

import json
from pathlib import Path

from loramerge.sink.safetensors_writer import Entry, SafetensorsWriter, aligned_order, split_shards

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class ShardedWriter:
    """All shards of one checkpoint, headers written up front; tensors go in by name (any order,
    though `order`, the order in the files, lets each shard's sha256 keep pace)."""

    def __init__(self, folder: Path, entries: list[Entry], max_shard_bytes: int, metadata: dict):
        self.folder = Path(folder)
        shards = [aligned_order(s) for s in split_shards(entries, max_shard_bytes)]
        count = len(shards)
        self.files = (
            [SINGLE]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self.order = [entry.name for shard in shards for entry in shard]  # file order
        self.hashes: dict[str, str] = {}
        self._writers: list[SafetensorsWriter] = []
        self._owner: dict[str, SafetensorsWriter] = {}
        self._weight_map: dict[str, str] = {}
        self._total = sum(e.nbytes for e in entries)
        try:
            for name, shard in zip(self.files, shards, strict=True):
                writer = SafetensorsWriter(self.folder / name, shard, metadata)
                self._writers.append(writer)
                for entry in shard:
                    self._owner[entry.name] = writer
                    self._weight_map[entry.name] = name
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, data) -> None:
        """Write one tensor's bytes (thread-safe, any order)."""
        self._owner[name].write(name, data)

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Write one tensor by copying bytes from an open file (thread-safe, any order)."""
        self._owner[name].copy(name, src_fd, src_offset, nbytes)

    def finish(self) -> None:
        """Flush and close every shard; write the index when there are several."""
        for name, writer in zip(self.files, self._writers, strict=True):
            writer.finish()
            self.hashes[name] = writer.sha256
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self._total},
                "weight_map": dict(sorted(self._weight_map.items())),
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close every shard without checks."""
        for writer in self._writers:
            writer.close()
