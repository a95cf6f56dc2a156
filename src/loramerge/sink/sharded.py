"""A checkpoint's tensors split over shards named the Hugging Face way, with their index."""

from __future__ import annotations

import json
from pathlib import Path

from loramerge.sink.safetensors_writer import Entry, SafetensorsWriter, aligned_order, split_shards

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class ShardedWriter:
    """Writes entries across shards; `order` is the order tensors must be given in."""

    def __init__(self, folder: Path, entries: list[Entry], max_shard_bytes: int, metadata: dict):
        self.folder = Path(folder)
        self._shards = [aligned_order(s) for s in split_shards(entries, max_shard_bytes)]
        count = len(self._shards)
        self.files = (
            [SINGLE]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self.order = [entry for shard in self._shards for entry in shard]
        self._metadata = metadata
        self._shard = -1
        self._left = 0
        self._writer: SafetensorsWriter | None = None

    def write(self, name: str, data) -> None:
        """Append the next tensor's bytes."""
        self._advance().write(name, data)

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Append the next tensor by copying bytes from an open file."""
        self._advance().copy(name, src_fd, src_offset, nbytes)

    def finish(self) -> None:
        """Close the last shard and write the index when there are several."""
        if self._writer is not None:
            self._writer.finish()
            self._writer = None
        if len(self.files) > 1:
            weight_map = {
                e.name: self.files[i] for i, shard in enumerate(self._shards) for e in shard
            }
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in self.order)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close the open shard without checks."""
        if self._writer is not None:
            self._writer.close()

    def _advance(self) -> SafetensorsWriter:
        """The writer for the next tensor, opening the next shard when one is full."""
        if self._left == 0:
            if self._writer is not None:
                self._writer.finish()
            self._shard += 1
            entries = self._shards[self._shard]
            self._writer = SafetensorsWriter(
                self.folder / self.files[self._shard], entries, self._metadata
            )
            self._left = len(entries)
        self._left -= 1
        return self._writer
