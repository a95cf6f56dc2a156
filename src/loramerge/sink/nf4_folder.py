"""NF4 output: a safetensors folder in the layout transformers writes for a bitsandbytes 4-bit
model (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` + `save_pretrained`).

Each quantized weight `X.weight` becomes the packed codes `X.weight` (uint8, (n/2, 1)) plus
`X.weight.absmax`, `X.weight.quant_map` and, with double quantization, `X.weight.nested_absmax`
and `X.weight.nested_quant_map`, and `X.weight.quant_state.bitsandbytes__nf4` (the JSON of the
quantization state as bytes). That last one's length depends on the computed offset, so those
vectors go into one extra last shard, written when everything else is. config.json gets
`quantization_config`.

A Conv1D weight (GPT-2 and its kin, stored (in, out)) is quantized as its transpose, as
transformers does: its NF4 blocks run down the stored columns, so it comes whole (granule) and is
transposed here, one weight at a time.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramerge import dtypes
from loramerge.errors import LoramergeError
from loramerge.nf4_layout import (
    STATE,
    StoredNF4,
    check_model_type,
    parse_state,
    quantizable,
    quantized_shape,
    state_json,
    transposed,
)
from loramerge.quant import nf4
from loramerge.sink.safetensors_writer import Entry
from loramerge.sink.sharded import ShardedWriter


@dataclass(frozen=True)
class NF4Options:
    """How weights are quantized, as `quantize` and `--to nf4` name it."""

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"  # bnb_4bit_compute_dtype: what the 4-bit matmuls run in
    skip_modules: tuple[str, ...] | None = None  # None: transformers' default (the output head)
    device: str = "cpu"  # where weights are quantized: numpy on "cpu", torch on "cuda[:N]"


def quantization_config(options: NF4Options) -> dict:
    """config.json's `quantization_config`, as BitsAndBytesConfig.to_dict writes it."""
    skip = list(options.skip_modules) if options.skip_modules is not None else None
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": options.compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": options.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _parts(entry: Entry, options: NF4Options) -> list[Entry]:
    """The stored tensors of one quantized weight, except its quantization state."""
    numel = math.prod(entry.shape)
    blocks = -(-numel // options.blocksize)
    parts = [
        Entry(entry.name, "U8", (-(-numel // 2), 1)),
        Entry(entry.name + ".absmax", "U8" if options.double_quant else "F32", (blocks,)),
        Entry(entry.name + ".quant_map", "F32", (len(nf4.CODE),)),
    ]
    if options.double_quant:
        nested = -(-blocks // nf4.NESTED_BLOCKSIZE)
        parts.append(Entry(entry.name + ".nested_absmax", "F32", (nested,)))
        parts.append(Entry(entry.name + ".nested_quant_map", "F32", (len(nf4.DYNAMIC_MAP),)))
    return parts


def quantize_codes(flat: np.ndarray, options: NF4Options, packed, absmax) -> None:
    """NF4 codes and block absmax of flat values (whole blocks but for the last) into `packed`
    and `absmax`: numpy on the CPU, torch on a GPU (the same bytes)."""
    if options.device == "cpu":
        nf4.quantize_codes(flat, options.blocksize, packed, absmax)
        return
    from loramerge.quant import nf4_torch  # torch, only for a GPU

    on_device = dtypes.as_torch(flat).to(options.device)
    packed[:], absmax[:] = nf4_torch.quantize_codes(on_device, options.blocksize)


def _holds(where: tuple[int, int, int], table: np.ndarray) -> bool:
    """Whether the stored bytes at (fd, offset, nbytes) are this float32 table's."""
    fd, offset, nbytes = where
    return nbytes == table.nbytes and os.pread(fd, nbytes, offset) == table.tobytes()


class NF4Folder:
    """The NF4 sink: Linear weights quantized as they arrive, everything else as it is."""

    def __init__(
        self,
        folder: Path,
        entries: list[Entry],
        max_shard_bytes: int,
        options: NF4Options,
        config: dict | None,
        cached: bool = False,
    ) -> None:
        if options.blocksize not in nf4.BLOCKSIZES:
            raise LoramergeError(f"--blocksize must be one of {nf4.BLOCKSIZES}")
        self.options = options
        skip = options.skip_modules
        self._quantized = {e.name for e in entries if quantizable(e.name, e.shape, e.dtype, skip)}
        check_model_type(sorted(self._quantized), config, "--to nf4")
        self._parts = {e.name: _parts(e, options) for e in entries if e.name in self._quantized}
        stored = [p for e in entries for p in self._parts.get(e.name, [e])]
        late = tuple(name + STATE for name in sorted(self._quantized))
        # A weight's parts lie in several regions (the file is ordered by item size), so the
        # shards are hashed from the file, not from copies held until the order catches up.
        self._writer = ShardedWriter(
            folder,
            stored,
            max_shard_bytes,
            {"format": "pt"},
            late,
            True,
            "all" if cached else "none",
        )
        owner = {p.name: e.name for e in entries for p in _parts(e, options)}
        # the shape of the matrix quantized: (out, in) for a Conv1D weight stored (in, out)
        self._shapes = {
            e.name: quantized_shape(e.name, e.shape, config)
            for e in entries
            if e.name in self._quantized
        }
        self._transposed = {name for name in self._quantized if transposed(name, config)}
        self._numel = {name: math.prod(shape) for name, shape in self._shapes.items()}
        self._absmax: dict[str, np.ndarray] = {}  # block scales of weights still arriving
        self._lock = threading.Lock()
        self.order = list(dict.fromkeys(owner.get(n, n) for n in self._writer.order))
        self.config_updates = {"quantization_config": quantization_config(options)}
        self.description = {
            "format": "nf4",
            "blocksize": options.blocksize,
            "double_quant": options.double_quant,
            "compute_dtype": options.compute_dtype,
            "skip_modules": list(options.skip_modules) if options.skip_modules else None,
            "quantized_tensors": len(self._quantized),
        }

    @property
    def files(self) -> list[str]:
        """Shard file names."""
        return self._writer.files

    @property
    def hashes(self) -> dict[str, str]:
        """Each shard's hash (`hashing.FILES_HASH`), once finished."""
        return self._writer.hashes

    def copyable(self, name: str) -> bool:
        """Unchanged tensors are copied as bytes unless they are to be quantized."""
        return name not in self._quantized

    def parts_any_order(self, name: str) -> bool:
        """A tensor's parts come in order (a quantized one is gathered whole)."""
        return False

    def position(self, name: str) -> int:
        """Where a tensor stored as it is goes (0 for quantized ones: any buffer will do)."""
        return 0 if name in self._quantized else self._writer.position(name)

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy an unquantized tensor's bytes."""
        self._writer.copy(name, src_fd, src_offset, nbytes)

    def copy_stored(self, name: str, stored: StoredNF4) -> bool:
        """Copy an untouched NF4 weight's stored bytes (codes, absmax, maps, nested statistics,
        state) when they are exactly what this sink would write; False: quantize it anew."""
        if name not in self._quantized or not self._same_layout(name, stored):
            return False
        for suffix, (_, _, (fd, offset, nbytes)) in stored.parts.items():
            self._writer.copy(name + suffix, fd, offset, nbytes)
        self._writer.write(name + STATE, np.frombuffer(stored.state, np.uint8))
        return True

    def _same_layout(self, name: str, stored: StoredNF4) -> bool:
        """Stored with this blocksize and double quantization, bitsandbytes' code tables, the
        parts' dtypes and shapes the ones written here."""
        state = parse_state(stored.state, name)
        entries = {e.name.removeprefix(name): e for e in self._parts[name]}
        return (
            state["blocksize"] == self.options.blocksize
            and tuple(state["shape"]) == self._shapes[name]
            and set(stored.parts) == set(entries)
            and all(
                (dtype, shape) == (entries[s].dtype, entries[s].shape)
                for s, (dtype, shape, _) in stored.parts.items()
            )
            and _holds(stored.parts[".quant_map"][2], nf4.CODE)
            and (
                not self.options.double_quant
                or _holds(stored.parts[".nested_quant_map"][2], nf4.DYNAMIC_MAP)
            )
        )

    def granule(self, name: str) -> int:
        """A quantized weight comes in whole blocks (a transposed one whole); any other tensor
        in any parts."""
        if name in self._transposed:
            return self._numel[name]
        return self.options.blocksize if name in self._quantized else 1

    def write(self, name: str, values: np.ndarray, start: int = 0) -> None:
        """Store a tensor or its part from flat element `start` on: NF4 codes for a Linear
        weight as they arrive, its block scales once its last part is in."""
        if name not in self._quantized:
            self._writer.write(name, values, start)
            return
        if name in self._transposed:  # whole: (in, out) as stored, quantized as (out, in)
            values = values.reshape(self._shapes[name][::-1]).T
        flat = np.ascontiguousarray(values).reshape(-1)
        blocksize = self.options.blocksize
        with self._lock:
            if name not in self._absmax:
                self._absmax[name] = np.empty(-(-self._numel[name] // blocksize), np.float32)
            absmax = self._absmax[name]
        packed = np.empty(-(-flat.size // 2), np.uint8)
        first, blocks = start // blocksize, -(-flat.size // blocksize)
        try:
            quantize_codes(flat, self.options, packed, absmax[first : first + blocks])
        except ValueError as exc:  # NaN or inf: NF4 has no code for them
            raise LoramergeError(f"{name}: {exc}") from None
        self._writer.write(name, packed, start // 2)
        if start + flat.size < self._numel[name]:
            return
        with self._lock:
            del self._absmax[name]
        shape, double_quant = self._shapes[name], self.options.double_quant
        # (the codes are written already: only the state's scales and header are used)
        state = nf4.assemble(packed, absmax, shape, values.dtype.name, blocksize, double_quant)
        self._writer.write(name + ".absmax", state.absmax)
        self._writer.write(name + ".quant_map", nf4.CODE)
        if state.double_quant:
            self._writer.write(name + ".nested_absmax", state.nested_absmax)
            self._writer.write(name + ".nested_quant_map", nf4.DYNAMIC_MAP)
        self._writer.write(name + STATE, np.frombuffer(state_json(state), np.uint8))

    def finish(self) -> None:
        """Write the quantization states and the index; flush and close."""
        self._writer.finish()

    def cancel(self) -> None:
        """Wake any thread waiting on a shard."""
        self._writer.cancel()

    def abort(self) -> None:
        """Close every shard without checks."""
        self._writer.abort()
