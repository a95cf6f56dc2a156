"""Property tests: hostile bytes and JSON reach the readers and come back as LoramergeError.

The readers under test are `SafetensorsFile` (one file), `open_weights` (a folder with an index)
and `load_adapter` (adapter_config.json plus weights). For any input they either succeed (and
then every tensor they list can be read) or raise `LoramergeError`; any other exception fails
the test. Memory is watched too: no test may grow the peak resident set by more than 200 MB,
so a header cannot make a reader allocate what it claims instead of what the file holds.

Each fuzzer (`@fuzzer`, tests/fuzzing.py) runs 200 examples in `make test` (the whole file takes
a few seconds) and 10,000 in `make fuzz`, every example bounded in memory and time.
`pytest --hypothesis-show-statistics` shows how many generated inputs each reader accepted and
refused.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS
from fuzzing import EXAMPLE_MEMORY, fuzzer
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from loramerge import dtypes
from loramerge.adapter import load_adapter
from loramerge.errors import LoramergeError
from loramerge.source.checkpoint import open_weights
from loramerge.source.safetensors_file import SafetensorsFile

MAX_RSS_GROWTH = 200 * 2**20
DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"]
DTYPES += ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"]
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2}
ITEMSIZE.update({"F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8})
HUGE = [2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, 10**30, 10**400]


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@settings(max_examples=1, database=None)
@given(st.text(max_size=1))
def _warm_hypothesis(_: str) -> None:
    """Let Hypothesis do its one-time work before memory is measured.

    The first text draw in a fresh checkout builds Hypothesis's unicode tables (about 200 MiB,
    transient, then cached under .hypothesis/unicode_data): the test generator's memory, not
    the readers'.
    """


@pytest.fixture(autouse=True)
def bounded_memory():
    """The peak resident set may not grow by more than MAX_RSS_GROWTH during a test."""
    _warm_hypothesis()
    before = _peak_rss()
    yield
    grown = _peak_rss() - before
    print(f"\npeak RSS grew by {grown / 2**20:.0f} MiB")
    assert grown < MAX_RSS_GROWTH, f"peak RSS grew by {grown / 2**20:.0f} MiB"


# -- what "succeed or LoramergeError" means for each reader -----------------------------------


def outcome(what: str) -> None:
    """Count accepted vs refused inputs (see `pytest --hypothesis-show-statistics`)."""
    if currently_in_test_context():
        event(what)


def read_file(path: Path) -> None:
    """Open one safetensors file and read every tensor it lists."""
    try:
        with SafetensorsFile(path) as fh:
            for name, info in fh.tensors.items():
                tensor = fh.read(name)
                assert tuple(tensor.shape) == info.shape
        outcome("accepted")
    except LoramergeError:
        outcome("refused")


def read_folder(folder: Path, stem: str = "model") -> None:
    """Open a checkpoint folder and read every tensor it lists."""
    try:
        with open_weights(folder, stem=stem, allow_pickle=False) as checkpoint:
            for name in checkpoint.tensors:
                checkpoint.read(name)
        outcome("accepted")
    except LoramergeError:
        outcome("refused")


def read_adapter(folder: Path) -> None:
    """Parse an adapter; what it accepts must have usable ranks and scales."""
    try:
        adapter = load_adapter(folder)
    except LoramergeError:
        outcome("refused")
        return
    try:
        for module in adapter.modules:
            assert module.rank > 0 and math.isfinite(module.scale), module
        outcome("accepted")
    finally:
        adapter.close()


def write_safetensors(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


# -- strategies ---------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(HUGE + [-1, 0, 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def rarely(draw, one_in: int) -> bool:
    """True about once in `one_in` draws (shrinks towards False, the well-formed path)."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1


@st.composite
def dims(draw) -> object:
    """Mostly small sizes (zero included), sometimes huge, negative or not an integer."""
    branch = draw(st.integers(0, 9))
    if branch < 7:
        return draw(st.integers(0, 4))
    if branch < 9:
        return draw(st.sampled_from(HUGE))
    return draw(st.one_of(st.integers(-3, -1), json_scalars))


@st.composite
def shapes(draw) -> object:
    if rarely(draw, 8):
        return draw(st.one_of(st.lists(st.integers(0, 1), min_size=15, max_size=18), json_values))
    return draw(st.lists(dims(), max_size=4))


@st.composite
def dtype_names(draw) -> object:
    if rarely(draw, 6):
        weird = ["", "f32", "BF17", "F8_E4M3FNUZ", "I128", "complex64", "F32 ", "__proto__"]
        return draw(st.one_of(st.sampled_from(weird), json_values))
    return draw(st.sampled_from(DTYPES))


@st.composite
def headers(draw) -> tuple[bytes, bytes]:
    """(header JSON bytes, data bytes): mostly well tiled, sometimes bent in a place or two."""
    if rarely(draw, 10):  # a header that is not even shaped like one
        return json.dumps(draw(json_values)).encode(), draw(st.binary(max_size=32))
    header: dict[str, object] = {}
    cursor = 0
    for index in range(draw(st.integers(0, 3))):
        dtype, shape = draw(dtype_names()), draw(shapes())
        nbytes = None
        if dtype in DTYPES and isinstance(shape, list) and all(type(d) is int for d in shape):
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if nbytes is not None and 0 <= nbytes <= 4096 and not rarely(draw, 8):
            offsets: object = [cursor, cursor + nbytes]
            cursor += nbytes
            if rarely(draw, 8):  # nudge one end: overlap, gap, past the end, reversed
                which, delta = draw(st.integers(0, 1)), draw(st.sampled_from([-8, -1, 1, 8]))
                offsets[which] += delta
        else:
            numbers = st.one_of(st.integers(-3, 5000), st.sampled_from(HUGE))
            offsets = draw(st.one_of(st.lists(numbers, max_size=3), json_values))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if rarely(draw, 12):
            del entry[draw(st.sampled_from(sorted(entry)))]
        name = draw(st.text(max_size=6)) if rarely(draw, 4) else f"t{index}"
        header[name] = draw(json_values) if rarely(draw, 20) else entry
    metadata = draw(st.integers(0, 5))
    if metadata == 4:
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    elif metadata == 5:
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    extra = draw(st.sampled_from([-8, -1, 1, 8])) if rarely(draw, 8) else 0
    return raw, bytes(max(0, cursor + extra))


_VALID_TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.ones(5, dtype=torch.bfloat16),
    "c": torch.tensor([[1, 2], [3, 4]], dtype=torch.int64),
    "empty": torch.zeros(0, 3, dtype=torch.float16),
    "d": torch.arange(7, dtype=torch.uint8),
}
# A small, valid safetensors file: several dtypes, an empty tensor, metadata.
VALID = save(_VALID_TENSORS, metadata={"format": "pt"})


# -- safetensors files -------------------------------------------------------------------------


def test_valid_file_reads(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(VALID)
    with SafetensorsFile(path) as fh:
        assert fh.tensors.keys() == _VALID_TENSORS.keys()
        for name, tensor in _VALID_TENSORS.items():
            assert torch.equal(dtypes.as_torch(fh.read(name)), tensor)


def test_every_truncation_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    for cut in range(len(VALID)):
        path.write_bytes(VALID[:cut])
        with pytest.raises(LoramergeError):
            SafetensorsFile(path).close()


@fuzzer(data=st.data())
def test_mutated_bytes(tmp_path, data):
    """Flip, overwrite, insert or delete bytes in the length field and header; cut or extend."""
    header_end = 8 + int.from_bytes(VALID[:8], "little")
    path = tmp_path / "f.safetensors"
    path.write_bytes(_mutated(VALID, header_end, data, b'{}[]",:0123456789-.eE \x00\xff'))
    read_file(path)


def _mutated(valid: bytes, header_end: int, data, alphabet: bytes, words: bool = False) -> bytes:
    """Up to six flips, overwrites (from `alphabet`), insertions or deletions in the header, and,
    with `words`, u64 fields set to huge values; then maybe cut or extended."""
    raw = bytearray(valid)
    actions = ["flip", "set", "insert", "delete"] + (["huge"] if words else [])
    for _ in range(data.draw(st.integers(1, 6))):
        if not raw:
            break
        where = data.draw(st.integers(0, min(header_end, len(raw)) - 1))
        action = data.draw(st.sampled_from(actions))
        if action == "flip":
            raw[where] ^= data.draw(st.integers(1, 255))
        elif action == "set":
            raw[where] = data.draw(st.sampled_from(alphabet))
        elif action == "insert":
            raw[where:where] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "huge":
            value = data.draw(st.sampled_from([h for h in HUGE if h < 2**64] + [0]))
            raw[where : where + 8] = value.to_bytes(8, "little")
        else:
            del raw[where : where + data.draw(st.integers(1, 8))]
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))] + data.draw(st.binary(max_size=16))
    return bytes(raw)


@fuzzer(header=headers(), data=st.data())
def test_random_headers(tmp_path, header, data):
    """Random dtypes, shapes (huge, negative, overflowing int64), offsets and metadata."""
    raw, tensor_bytes = header
    length = len(raw)
    if rarely(data.draw, 8):
        wrong = [max(0, length - 1), length + 1, 2**32, 10**8 + 1, 2**64 - 1]
        length = data.draw(st.sampled_from(wrong))
    path = tmp_path / "f.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + raw + tensor_bytes)
    read_file(path)


# -- model.safetensors.index.json ----------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A folder with two small shards; each example writes its own index."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.zeros(2, 2), "b": torch.ones(3)}, folder / "s1.safetensors")
    save_file({"c": torch.zeros(4, dtype=torch.bfloat16)}, folder / "s2.safetensors")
    save_file({"z": torch.zeros(1)}, tmp_path / "outside.safetensors")
    return folder


shard_names = st.one_of(
    st.sampled_from(["s1.safetensors", "s2.safetensors"]),
    st.sampled_from(
        [
            "./s1.safetensors",
            "../outside.safetensors",
            "../sharded/s1.safetensors",
            "",
            ".",
            "..",
            "/",
            "missing.safetensors",
            "s1.safetensors/",
            "sub/../s1.safetensors",
            "s1.safetensors\x00",
            "a" * 300,
            "a/" * 2100,
        ]
    ),
    st.text(max_size=20),
    json_values,
)


SHARD_OF = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}


@st.composite
def indexes(draw, outside: str) -> bytes:
    """Mostly a truthful weight_map with a lie or two; sometimes not an index at all."""
    if rarely(draw, 20):
        return draw(st.binary(max_size=64))
    if rarely(draw, 20):
        return json.dumps(draw(json_values)).encode()
    weight_map: dict[str, object] = {}
    for name, shard in SHARD_OF.items():
        if not rarely(draw, 6):
            weight_map[name] = shard
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.one_of(st.sampled_from([*SHARD_OF, "z"]), st.text(max_size=8)))
        weight_map[name] = draw(st.one_of(shard_names, st.just(outside)))
    index = {"metadata": draw(json_values), "weight_map": weight_map}
    if rarely(draw, 20):
        index["weight_map"] = draw(json_values)
    return json.dumps(index).encode()


@fuzzer(data=st.data())
def test_random_index(sharded, data):
    """weight_map values that escape the folder, do not exist, are not strings, or lie."""
    outside = str((sharded.parent / "outside.safetensors").resolve())
    (sharded / "model.safetensors.index.json").write_bytes(data.draw(indexes(outside)))
    read_folder(sharded)


# -- adapter_config.json -------------------------------------------------------------------------

FIELDS = [
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "lora_bias",
    "peft_type",
    "init_lora_weights",
    "trainable_token_indices",
    "modules_to_save",
    "use_qalora",
    "layer_replication",
]
# Regex-ish pattern keys without nested quantifiers (no catastrophic backtracking by design).
pattern_keys = st.one_of(
    st.sampled_from(["q_proj", "v_proj", "down_proj", "^model.layers.0.mlp.down_proj", "embed"]),
    st.text(alphabet="qvkdown_proj.^$[]()|?\\0123", max_size=12),
)
field_values = st.one_of(
    json_values,
    st.dictionaries(pattern_keys, json_scalars, max_size=4),
    st.dictionaries(st.sampled_from(["embed_tokens", "x"]), st.lists(json_scalars, max_size=6)),
    st.lists(st.integers(-2, 400), max_size=6),
)


ADAPTER_NAMES = ("llama-patterns", "llama-tokens", "llama-dora")
CONFIGS = {n: json.loads((ADAPTERS / n / "adapter_config.json").read_text()) for n in ADAPTER_NAMES}


@pytest.fixture
def adapters(tmp_path) -> dict[str, Path]:
    """Copies of a few fixture adapters: patterns, trainable tokens, DoRA."""
    return {n: Path(shutil.copytree(ADAPTERS / n, tmp_path / n)) for n in ADAPTER_NAMES}


@fuzzer(data=st.data())
def test_random_adapter_config(adapters, data):
    """Wrong types and values for r, lora_alpha, patterns, switches, token indices..."""
    name = data.draw(st.sampled_from(ADAPTER_NAMES))
    if rarely(data.draw, 20):
        raw = data.draw(st.binary(max_size=64))
    elif rarely(data.draw, 20):
        raw = json.dumps(data.draw(json_values)).encode()
    else:
        changed = data.draw(st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=3))
        dropped = {data.draw(st.sampled_from(FIELDS))} if rarely(data.draw, 6) else set()
        config = {k: v for k, v in {**CONFIGS[name], **changed}.items() if k not in dropped}
        raw = json.dumps(config).encode()
    (adapters[name] / "adapter_config.json").write_bytes(raw)
    read_adapter(adapters[name])


# -- pinned hostile inputs: each once escaped as something other than LoramergeError -------------

DEEP = b"[" * 100_000 + b"]" * 100_000
LONG_INT = b"1" * 5000  # over CPython's 4300-digit int parsing limit: ValueError


def _header_file(tmp: Path, header: bytes) -> Path:
    path = tmp / "f.safetensors"
    write_safetensors(path, header)
    return path


def _index_folder(tmp: Path, index: bytes) -> Path:
    folder = tmp / "sharded"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, folder / "s1.safetensors")
    (folder / "model.safetensors.index.json").write_bytes(index)
    return folder


def _adapter_folder(tmp: Path, config: bytes) -> Path:
    folder = Path(shutil.copytree(ADAPTERS / "llama-lora", tmp / "adapter"))
    (folder / "adapter_config.json").write_bytes(config)
    return folder


def _zero_dim(*big: int) -> bytes:
    """A zero-element tensor whose other dimensions do not fit torch's int64 sizes/strides."""
    entry = {"dtype": "F32", "shape": [0, *big], "data_offsets": [0, 0]}
    return json.dumps({"x": entry}).encode()


def _index(shard: str) -> bytes:
    return json.dumps({"weight_map": {"a": shard}}).encode()


def _symlink_loop(tmp: Path) -> Path:
    folder = _index_folder(tmp, _index("loop.safetensors"))
    (folder / "loop.safetensors").symlink_to("loop.safetensors")
    return folder


def _config(**fields) -> bytes:
    config = json.loads((ADAPTERS / "llama-lora" / "adapter_config.json").read_text())
    return json.dumps({**config, **fields}).encode()


HOSTILE = {
    "header-deeply-nested": (read_file, lambda t: _header_file(t, DEEP)),
    "header-4301-digit-int": (read_file, lambda t: _header_file(t, b'{"x": ' + LONG_INT + b"}")),
    "header-zero-dim-times-2**64": (read_file, lambda t: _header_file(t, _zero_dim(2**64))),
    "header-zero-dim-times-2**63": (read_file, lambda t: _header_file(t, _zero_dim(2**63))),
    "header-zero-dim-stride-overflow": (
        read_file,
        lambda t: _header_file(t, _zero_dim(2**40, 2**40)),
    ),
    "index-deeply-nested": (read_folder, lambda t: _index_folder(t, DEEP)),
    "index-4301-digit-int": (read_folder, lambda t: _index_folder(t, LONG_INT)),
    "index-nul-in-shard": (read_folder, lambda t: _index_folder(t, _index("s1\x00.safetensors"))),
    "index-shard-name-too-long": (read_folder, lambda t: _index_folder(t, _index("a" * 300))),
    "index-symlink-loop": (read_folder, _symlink_loop),
    "config-deeply-nested": (read_adapter, lambda t: _adapter_folder(t, DEEP)),
    "config-4301-digit-int": (read_adapter, lambda t: _adapter_folder(t, LONG_INT)),
    "config-alpha-10**400": (
        read_adapter,
        lambda t: _adapter_folder(t, _config(lora_alpha=10**400)),
    ),
    "config-alpha-pattern-10**400": (
        read_adapter,
        lambda t: _adapter_folder(t, _config(alpha_pattern={"q_proj": 10**400})),
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input(tmp_path, name):
    reader, build = HOSTILE[name]
    reader(build(tmp_path))


# -- GGUF files -------------------------------------------------------------------------------


def _valid_gguf() -> bytes:
    """A small llama GGUF written by gguf-py: scalars, strings, arrays, F32/BF16/Q8_0/Q4_K
    tensors (a BF16 k projection, read as its bits with its rows un-permuted)."""
    import tempfile

    import gguf
    import numpy as np

    from loramerge.quant import ggml

    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_block_count(1)
        writer.add_head_count(2)
        writer.add_head_count_kv(2)
        writer.add_embedding_length(32)
        writer.add_token_list(["a", "b", "c"])
        writer.add_token_scores([0.0, -1.0, -2.0])
        writer.add_string("loramerge.provenance", json.dumps({"adapters": []}))
        for name, shape, qtype in [
            ("token_embd.weight", (3, 32), T.Q8_0),
            ("blk.0.attn_q.weight", (32, 32), T.F32),
            ("blk.0.attn_k.weight", (32, 32), T.BF16),
            ("blk.0.ffn_up.weight", (4, 32), T.BF16),
            ("blk.0.ffn_down.weight", (2, 256), T.Q4_K),
            ("output_norm.weight", (32,), T.F32),
        ]:
            values = rng.normal(size=shape).astype(np.float32)
            writer.add_tensor(name, ggml.quantize(values, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


VALID_GGUF = _valid_gguf()


def read_gguf(path: Path) -> None:
    """Open a GGUF file as itself and as a checkpoint; read (dequantize) every tensor."""
    from loramerge.inspect import inspect_path
    from loramerge.source.gguf_file import GGUFModel

    try:
        with GGUFModel(path) as model:
            for name, record in model.tensors.items():
                assert model.read_blocks(name).nbytes == record.nbytes
            model.provenance()
        inspect_path(path)
        with open_weights(path, stem="model", allow_pickle=False) as checkpoint:
            for name, info in checkpoint.tensors.items():
                assert checkpoint.read(name).shape == info.shape
        outcome("accepted")
    except LoramergeError:
        outcome("refused")


def test_valid_gguf_reads(tmp_path):
    path = tmp_path / "v.gguf"
    path.write_bytes(VALID_GGUF)
    with open_weights(path, stem="model", allow_pickle=False) as checkpoint:
        assert len(checkpoint.tensors) == 6
        bf16 = {n for n, t in checkpoint.tensors.items() if t.dtype == "BF16"}
        assert bf16 == {
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
        }
    read_gguf(path)


def test_every_gguf_truncation_is_refused(tmp_path):
    path = tmp_path / "v.gguf"
    from loramerge.source.gguf_file import GGUFModel

    for cut in range(0, len(VALID_GGUF), 7):
        path.write_bytes(VALID_GGUF[:cut])
        with pytest.raises(LoramergeError):
            GGUFModel(path).close()


@fuzzer(data=st.data())
def test_gguf_mutated_bytes(tmp_path, data):
    """Flip, overwrite, insert or delete bytes of the header (counts, lengths, types, dims,
    offsets), set u64 fields to huge values; cut or extend the file."""
    header_end = len(VALID_GGUF) - 3 * 34 - 32 * 32 * 4 - 2 * 144 - 32 * 4
    path = tmp_path / "f.gguf"
    alphabet = b"\x00\x01\x02\x03\x04\x08\x09\x0c\x7f\xff"
    path.write_bytes(_mutated(VALID_GGUF, header_end, data, alphabet, words=True))
    read_gguf(path)


# -- the per-example bounds `make fuzz` relies on ------------------------------------------------

HANGS = """
import threading
import fuzzing
from hypothesis import strategies as st

fuzzing.EXAMPLE_SECONDS = 1

@fuzzing.fuzzer(n=st.integers())
def hang(n):
    threading.Event().wait()  # never set: a reader stuck for good

hang()
"""


def test_an_example_past_its_memory_bound_fails():
    @fuzzer(n=st.integers(0, 3))
    def allocate(n):
        bytearray(2 * EXAMPLE_MEMORY + (n << 20))

    with pytest.raises(MemoryError):
        allocate()


def test_a_hanging_example_ends_the_run_with_its_stack():
    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-c", HANGS], capture_output=True, text=True, cwd=tests, timeout=300
    )
    assert result.returncode != 0
    assert "Timeout" in result.stderr and "in hang" in result.stderr
