"""The writer's I/O paths, judged by the safetensors library and the blake3 package.

Writes bypass the page cache (`O_DIRECT`) for block-aligned middles, from the caller's memory when
it is aligned like the file offset and through a staging buffer when not, with buffered writes
for the ends; filesystems without `O_DIRECT` and refused direct writes fall back to buffered.
Every path must give the same bytes, in any write order, from any number of threads, and the
hash recorded while writing must be the file's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import blake3
import numpy as np
import pytest
import torch
from conftest import ADAPTERS, LLAMA
from safetensors.torch import load_file, save_file

from loramerge import dtypes
from loramerge.errors import LoramergeError
from loramerge.merge import MergeOptions, merge
from loramerge.sink import direct_io
from loramerge.sink.safetensors_writer import Entry, SafetensorsWriter
from loramerge.sink.sharded import ShardedWriter
from loramerge.source.checkpoint import open_weights, read_buffer

# Sizes that put tensor boundaries everywhere relative to 4 KiB blocks: inside one block, across
# one, a block-aligned run with ragged ends, several MiB (more than one staging piece).
TENSORS = {
    "a": torch.randn(750),  # 3000 bytes
    "b": torch.randn(10_000).to(torch.bfloat16),
    "c": torch.arange(1_048_582, dtype=torch.int64).to(torch.uint8),
    "d": torch.randn(1000, 5000),  # 20 MB: two staging pieces
    "e": torch.randn(3).to(torch.float16),
    "f": torch.randn(4096, 8),
}
COPIED = {"g": torch.randn(300_001), "h": torch.randn(7)}


def _source(tmp_path):
    path = tmp_path / "src.safetensors"
    if not path.exists():
        save_file(COPIED, path)
    return path


def _write_all(folder, tmp_path, order: str) -> ShardedWriter:
    entries = [Entry(n, dtypes.from_torch(t.dtype), tuple(t.shape)) for n, t in TENSORS.items()]
    with open_weights(_source(tmp_path), stem="model", allow_pickle=False) as source:
        entries += [Entry(n, i.dtype, i.shape) for n, i in source.tensors.items()]
        writer = ShardedWriter(folder, entries, 10**9, {"format": "pt"})
        # "d" is written and "g" copied in three parts each, which may come in any order
        jobs = [(e.name, part) for e in entries for part in (range(3) if e.name in PARTS else [0])]

        def put(job: tuple[str, int]) -> None:
            name, part = job
            if name in COPIED:
                raw = source.raw(name)
                at, size = _part(raw.nbytes, part) if name in PARTS else (0, raw.nbytes)
                writer.copy(name, raw.fd, raw.offset + at, size, at)
                return
            data = TENSORS[name].reshape(-1).view(torch.uint8).numpy()
            if name in ("b", "d"):  # aligned like its file offset: written with no staging copy
                buffer = read_buffer(len(data), writer.position(name) % direct_io.ALIGN)
                buffer[:] = data
                data = buffer
            at, size = _part(len(data), part) if name in PARTS else (0, len(data))
            writer.write(name, data[at : at + size], at)

        if order == "threads":
            with ThreadPoolExecutor(3) as pool:
                list(pool.map(put, jobs))
        else:
            for job in reversed(jobs) if order == "reverse" else jobs:
                put(job)
        writer.finish()
    return writer


PARTS = ("d", "g")


def _part(nbytes: int, part: int) -> tuple[int, int]:
    """(offset, size) of one of three parts of a tensor's bytes, cut off any block boundary."""
    cuts = [0, nbytes // 3 + 5, 2 * nbytes // 3 + 11, nbytes]
    return cuts[part], cuts[part + 1] - cuts[part]


def test_a_part_written_twice_is_refused(tmp_path):
    writer = SafetensorsWriter(tmp_path / "x.safetensors", [Entry("t", "U8", (100,))], {})
    try:
        writer.write("t", np.zeros(60, np.uint8), 40)
        with pytest.raises(RuntimeError, match="written twice"):
            writer.write("t", np.zeros(10, np.uint8), 50)  # overlaps the first part
        writer.write("t", np.zeros(40, np.uint8), 0)
        with pytest.raises(RuntimeError, match="written twice"):
            writer.write("t", np.zeros(1, np.uint8), 0)  # every byte is in
    finally:
        writer.close()


def _check(folder, writer):
    loaded = load_file(folder / "model.safetensors")
    for name, tensor in {**TENSORS, **COPIED}.items():
        assert torch.equal(loaded[name], tensor), name
    digest = blake3.blake3((folder / "model.safetensors").read_bytes()).hexdigest()
    assert writer.hashes == {"model.safetensors": digest}


def _no_direct(monkeypatch):
    monkeypatch.setattr(direct_io, "_open_direct", lambda path: -1)


@pytest.mark.parametrize("block", [4096, 65536])  # a filesystem block larger than a page
@pytest.mark.parametrize("order", ["file", "reverse", "threads"])
def test_direct_and_buffered_writes_give_the_same_file(tmp_path, monkeypatch, order, block):
    monkeypatch.setattr(direct_io, "_block_size", lambda fd: block)
    probe = direct_io.PositionalFile(tmp_path / "probe", 0)
    supported = probe.direct
    probe.close()
    if not supported:
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    direct, buffered = tmp_path / "direct", tmp_path / "buffered"
    direct.mkdir()
    buffered.mkdir()
    _check(direct, _write_all(direct, tmp_path, order))
    _no_direct(monkeypatch)
    _check(buffered, _write_all(buffered, tmp_path, order))
    assert (direct / "model.safetensors").read_bytes() == (
        buffered / "model.safetensors"
    ).read_bytes()


def test_refused_direct_writes_fall_back_to_buffered(tmp_path, monkeypatch):
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    out = tmp_path / "out"
    out.mkdir()
    _check(out, _write_all(out, tmp_path, "threads"))
    if getattr(os, "O_DIRECT", 0) and direct_io._open_direct(tmp_path / "src.safetensors") >= 0:
        assert refused  # the direct path was tried, refused, and the bytes still all arrived


def test_other_write_errors_are_not_hidden_by_the_fallback(tmp_path, monkeypatch):
    def pwrite(fd, data, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    with pytest.raises(LoramergeError, match="Input/output error"):  # by the end at the latest
        writer = SafetensorsWriter(tmp_path / "x.safetensors", [Entry("a", "F32", (4,))], {})
        writer.write("a", np.zeros(4, np.float32))
        writer.finish()


def test_pieces_for_the_page_cache_wait_for_flush_beside_direct_writes(tmp_path):
    file = direct_io.PositionalFile(tmp_path / "f", 3 * direct_io.ALIGN)
    try:
        if not file.direct:
            pytest.skip(f"{tmp_path} has no O_DIRECT")
        data = np.arange(2 * direct_io.ALIGN + 10, dtype=np.uint8)
        file.write(memoryview(data)[:10], 0)  # shorter than a block: held
        file.write(memoryview(data)[10:], 10)  # an aligned middle, written now; a held end
        on_disk = (tmp_path / "f").read_bytes()
        assert on_disk[10 : direct_io.ALIGN] == bytes(direct_io.ALIGN - 10)  # not yet
        block = slice(direct_io.ALIGN, 2 * direct_io.ALIGN)
        assert on_disk[block] == data[block].tobytes()
        file.fsync()  # flushes
        assert (tmp_path / "f").read_bytes()[: data.size] == data.tobytes()
    finally:
        file.close()


def test_cancel_wakes_a_writer_waiting_for_the_hash(tmp_path):
    writer = SafetensorsWriter(tmp_path / "x.safetensors", [Entry("a", "F32", (1 << 20,))], {})
    hasher = writer._hasher
    failures = []

    def wait():
        try:
            hasher.wait_past(8 + (4 << 20) + 100)  # bytes never written
        except LoramergeError as exc:
            failures.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    writer.cancel()
    waiter.join(timeout=120)  # a guard against hanging, not a timing
    assert not waiter.is_alive() and failures
    writer.close()


def test_merge_output_is_the_same_with_and_without_direct_writes(tmp_path, monkeypatch):
    adapter = ADAPTERS / "llama-lora"
    merge(LLAMA, [adapter], tmp_path / "direct", MergeOptions(max_shard_size=60_000))
    _no_direct(monkeypatch)
    merge(LLAMA, [adapter], tmp_path / "buffered", MergeOptions(max_shard_size=60_000))
    shards = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:
        assert (tmp_path / "direct" / name).read_bytes() == (
            tmp_path / "buffered" / name
        ).read_bytes()


def test_read_buffer_is_placed_at_the_asked_phase():
    for phase in (0, 8, 4000, 4095):
        buffer = read_buffer(10_000, phase)
        assert buffer.size == 10_000 and buffer.ctypes.data % 4096 == phase
        assert np.shares_memory(buffer, read_buffer(100, phase))  # one buffer, reused


def test_outputs_read_back_at_once_are_written_through_the_cache(tmp_path, monkeypatch):
    """What a check reads back right after the write goes through the page cache, so the check
    does not read the disk: the whole file for `--verify` of a float32 output; nothing for a
    plain merge, nor for `--verify` of a bfloat16 merge or an unmerge's drift report, whose
    copies are read and written through memory and checked in the pass too (the drift report
    reading the base beside them)."""
    from loramerge.sink import safetensors_writer
    from loramerge.swap import unmerge

    opened, copied = [], []
    real = direct_io.PositionalFile.__init__
    in_kernel = safetensors_writer.copy_range

    def spy(self, path, size, **kwargs):
        opened.append(kwargs.get("cached", False))
        real(self, path, size, **kwargs)

    def copy_spy(*args):
        copied.append(args[-1])
        in_kernel(*args)

    monkeypatch.setattr(direct_io.PositionalFile, "__init__", spy)
    monkeypatch.setattr(safetensors_writer, "copy_range", copy_spy)
    adapter = ADAPTERS / "llama-lora"
    probe = direct_io.PositionalFile(tmp_path / "probe", 4096)
    direct = probe.direct  # whether O_DIRECT works here (else every copy is in the kernel)
    probe.close()
    merge(LLAMA, [adapter], tmp_path / "plain", MergeOptions())
    assert opened[1:] == [False] and bool(copied) != direct
    copied.clear()
    merge(LLAMA, [adapter], tmp_path / "verified", MergeOptions(verify=True))
    assert opened[2:] == [False] and not copied  # the untouched tensors too: from memory
    merge(LLAMA, [adapter], tmp_path / "f32", MergeOptions(verify=True, dtype="float32"))
    assert opened[3:] == [True]
    wide = MergeOptions(verify=True, compute_dtype="float64")  # torch's route: read back
    merge(LLAMA, [adapter], tmp_path / "f64", wide)
    assert opened[4:] == [True]
    copied.clear()
    result = unmerge(tmp_path / "plain", [adapter], tmp_path / "unmerged")
    assert result.drift["measured"] and opened[5:] == [False] and not copied
