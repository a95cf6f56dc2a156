"""Units judged by outside oracles: the streaming writer by the safetensors library, the single
rounding by exact rational arithmetic, pattern matching by PEFT's own get_pattern_key."""

from __future__ import annotations

import os
import struct
from fractions import Fraction

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file

from loramerge import dtypes
from loramerge.adapter import pattern_key
from loramerge.delta import round_once
from loramerge.sink.safetensors_writer import Entry
from loramerge.sink.sharded import ShardedWriter
from loramerge.source.checkpoint import open_weights

MIXED = {
    "a.f64": torch.randn(3, 5, dtype=torch.float64),
    "b.bf16": torch.randn(7, 3).to(torch.bfloat16),
    "c.f16": torch.randn(5).to(torch.float16),
    "d.i64": torch.arange(9, dtype=torch.int64).reshape(3, 3),
    "e.u8": torch.arange(13, dtype=torch.uint8),
    "f.bool": torch.tensor([True, False, True]),
    "g.f32": torch.randn(4, 4),
    "h.empty": torch.zeros(0, 4),
}


def _write(folder, tensors, max_bytes):
    entries = [Entry(n, dtypes.from_torch(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(folder, entries, max_bytes, {"format": "pt"})
    for name in reversed(list(tensors)):  # any order: every offset is fixed by the header
        writer.write(name, tensors[name].reshape(-1).view(torch.uint8).numpy())
    writer.finish()
    return writer


@pytest.mark.parametrize("max_bytes", [10**9, 64])
def test_writer_output_reads_back_with_safetensors(tmp_path, max_bytes):
    writer = _write(tmp_path, MIXED, max_bytes)
    seen = {}
    for name in writer.files:
        with safe_open(tmp_path / name, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __contains__
                seen[key] = fh.get_tensor(key)
        raw = (tmp_path / name).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        assert (8 + length) % 8 == 0  # data region starts aligned
    assert seen.keys() == MIXED.keys()
    assert all(torch.equal(seen[k], MIXED[k]) for k in MIXED)
    for name, digest in writer.hashes.items():  # hashed while written, out of order
        assert digest == blake3.blake3((tmp_path / name).read_bytes()).hexdigest()
    with open_weights(tmp_path, stem="model", allow_pickle=False) as checkpoint:
        for info in checkpoint.tensors.values():
            data_start = 8 + struct.unpack("<Q", info.path.read_bytes()[:8])[0]
            assert (info.offset - data_start) % dtypes.itemsize(info.dtype) == 0
            assert torch.equal(dtypes.as_torch(checkpoint.read(info.name)), MIXED[info.name])


def test_raw_copy_falls_back_when_copy_file_range_fails(tmp_path, monkeypatch):
    src = tmp_path / "src.safetensors"
    save_file({"x": torch.randn(1000), "y": torch.randn(10)}, src)
    with open_weights(src, stem="model", allow_pickle=False) as checkpoint:
        for broken in (False, True):
            if broken:
                monkeypatch.setattr(os, "copy_file_range", _raise_exdev)
            out = tmp_path / f"out{int(broken)}"
            out.mkdir()
            entries = [Entry(n, i.dtype, i.shape) for n, i in checkpoint.tensors.items()]
            writer = ShardedWriter(out, entries, 10**9, {})
            for entry in entries:
                raw = checkpoint.raw(entry.name)
                writer.copy(entry.name, raw.fd, raw.offset, raw.nbytes)
            writer.finish()
            with safe_open(out / "model.safetensors", "pt") as fh:
                assert torch.equal(fh.get_tensor("x"), dtypes.as_torch(checkpoint.read("x")))


def _raise_exdev(*args):
    raise OSError(18, "Invalid cross-device link")


def _correct_rounding(x: float, dtype: torch.dtype) -> torch.Tensor:
    """Nearest `dtype` value to x, ties to even, decided with exact rationals."""
    guess = torch.tensor(x, dtype=torch.float64).to(dtype)
    candidates = [
        torch.nextafter(guess, torch.tensor(float("-inf"), dtype=dtype)),
        guess,
        torch.nextafter(guess, torch.tensor(float("inf"), dtype=dtype)),
    ]
    exact = Fraction(x)

    def key(c: torch.Tensor):
        bits = int(c.view(torch.int16))
        return (abs(Fraction(float(c)) - exact), bits & 1)

    return min(candidates, key=key)


def _near_midpoints(dtype: torch.dtype):
    """float64 values within a hair of a midpoint between two `dtype` neighbours."""
    info = torch.finfo(dtype)
    finite = st.floats(min_value=-info.max / 2, max_value=info.max / 2, allow_nan=False)

    def build(value, nudge):
        low = torch.tensor(value, dtype=torch.float64).to(dtype)
        high = torch.nextafter(low, torch.tensor(float("inf"), dtype=dtype))
        mid = (float(low) + float(high)) / 2  # exact in float64
        return mid + nudge * abs(mid) * 2.0**-40

    return st.builds(build, finite, st.integers(-3, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_round_once_is_a_single_correct_rounding(dtype, data):
    info = torch.finfo(dtype)
    x = data.draw(
        st.one_of(
            _near_midpoints(dtype),
            st.floats(min_value=-info.max / 2, max_value=info.max / 2, allow_nan=False),
        )
    )
    ours = round_once(torch.tensor([x], dtype=torch.float64), dtype)[0]
    assert torch.equal(ours, _correct_rounding(x, dtype)), x


NAMES = st.sampled_from(
    [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.10.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "transformer.h.0.attn.c_attn",
        "lm_head",
    ]
)
PATTERNS = st.sampled_from(
    [
        "q_proj",
        "down_proj",
        "^model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "layers.1.mlp.down_proj",
        r"layers\.\d+\.self_attn\.q_proj",
        "proj",
        "c_attn",
        ".*",
    ]
)


@settings(max_examples=300, deadline=None)
@given(patterns=st.lists(PATTERNS, max_size=4, unique=True), module=NAMES)
def test_pattern_key_matches_peft(patterns, module):
    peft_choice = get_pattern_key(patterns, module)
    ours = pattern_key(patterns, module)
    assert (ours if ours is not None else module) == peft_choice
