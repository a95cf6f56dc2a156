"""The output formats, one table: `--to NAME` picks the sink every command writes through.

A sink receives each finished tensor by name (`write`), whole or in parts that start at flat
element offsets (each a multiple of its `granule` elements but the last; in order, unless
`parts_any_order`, when several threads may write one tensor's parts at once), or the raw
bytes of an unchanged one when it can take them (`copyable`, `copy`; an untouched NF4 weight's
stored parts: `copy_stored`), in its `order`; `finish` completes the files. The atomic folder
(or file), the record and the progress bar around it are the same for every format. A new
format is one more entry here and its own module. A single-file format (GGUF) is built as one
file instead of a folder and keeps the record inside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from loramerge.errors import LoramergeError
from loramerge.nf4_layout import StoredNF4
from loramerge.sink.direct_io import Cached
from loramerge.sink.nf4_folder import NF4Folder, NF4Options
from loramerge.sink.safetensors_writer import Entry
from loramerge.sink.sharded import ShardedWriter


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file holds besides the tensors: its type, tokenizer, name and record."""

    gguf_type: str | None  # None: f16, or for a GGUF base each tensor's own type
    tokenizer: Path | None  # the folder holding tokenizer.json / tokenizer.model
    name: str  # general.name
    record: dict  # the provenance record, stored as JSON (sink.gguf_file.PROVENANCE_KEY)
    base: object | None = None  # a GGUF base (sink.gguf_rewrite.GGUFBase): rewrite it


class Sink(Protocol):
    """What the executor and the commands need from an output format."""

    order: list[str]  # tensor names, in the order to produce them
    files: list[str]
    hashes: dict[str, str]
    config_updates: dict  # merged into config.json
    description: dict  # the record's "output" entry

    def copyable(self, name: str) -> bool: ...
    def parts_any_order(self, name: str) -> bool: ...  # else a tensor's parts come in order
    def position(self, name: str) -> int: ...
    def granule(self, name: str) -> int: ...  # a part of a tensor is a multiple of this many
    # `start`: the bytes' offset in the tensor, past 0 only where `parts_any_order`
    def copy(
        self, name: str, src_fd: int, src_offset: int, nbytes: int, start: int = 0
    ) -> None: ...
    def copy_stored(self, name: str, stored: StoredNF4) -> bool: ...
    def write(self, name: str, values: np.ndarray, start: int = 0) -> None: ...
    def finish(self) -> None: ...
    def cancel(self) -> None: ...
    def abort(self) -> None: ...


def _safetensors(folder, entries, max_shard_bytes, options, config, info, cached) -> Sink:
    return ShardedWriter(folder, entries, max_shard_bytes, {"format": "pt"}, cached=cached)


def _nf4(folder, entries, max_shard_bytes, options, config, info, cached) -> Sink:
    return NF4Folder(folder, entries, max_shard_bytes, options, config, cached != "none")


def _gguf(path, entries, max_shard_bytes, options, config, info, cached) -> Sink:
    # the gguf package loads only for a GGUF output (a tenth of a second of every start)
    from loramerge.sink.gguf_file import GGUFFile
    from loramerge.sink.gguf_rewrite import GGUFRewrite

    cached = cached != "none"
    if info.base is not None:  # a GGUF base: its file again, merged tensors replaced
        return GGUFRewrite(path, entries, config, info.base, info.gguf_type, info.record, cached)
    return GGUFFile(path, entries, config, info, cached)


Factory = Callable[[Path, list[Entry], int, NF4Options, dict | None, GGUFInfo, Cached], Sink]
FORMATS: dict[str, Factory] = {
    "safetensors": _safetensors,
    "nf4": _nf4,
    "gguf": _gguf,
}
SINGLE_FILE = frozenset({"gguf"})  # formats written as one file, which holds the record
# The GGUF types the command line offers, named here so that parsing a command imports no GGUF
# module: `--gguf-type` (the keys of `quant.ggml_types.GGUF_TYPES`, held equal by a test) and
# an exported adapter's `--outtype` (convert_lora_to_gguf.py's choices).
GGUF_TYPE_NAMES = (
    *("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"),
    *("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m"),
)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def open_sink(
    to: str,
    folder: Path,
    entries: list[Entry],
    max_shard_bytes: int,
    options: NF4Options,
    config: dict | None,
    info: GGUFInfo,
    cached: Cached = "none",
) -> Sink:
    """The sink of format `to`, writing into `folder` (the file, for a single-file format);
    `cached`: what of the output the command reads back at once, written through the page
    cache (`direct_io.Cached`)."""
    if to not in FORMATS:
        raise LoramergeError(f"unknown output format {to!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[to](folder, entries, max_shard_bytes, options, config, info, cached)
