"""Bad input is refused cleanly: exit 2, one `Error: ...` line, no output, inputs untouched.

Every case builds its inputs in tmp_path (copies of the fixtures, then broken on purpose), runs
the real `loramerge merge` entry point in process, and checks the whole contract:

- exit status 2;
- stderr is exactly one line starting with `Error: ` (no traceback, no usage text), except the
  adapter-for-another-base case, whose one error lists every mismatch on following lines;
- the message says what is wrong (a regular expression, searched case-insensitively);
- no output is left behind: neither OUT nor a `.OUT.loramerge-tmp-*` sibling, and nothing else
  new anywhere under tmp_path;
- every input file is byte-identical afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA, tree_hashes
from safetensors.torch import load_file, save_file

SHARD1 = "model-00001-of-00003.safetensors"
SHARD2 = "model-00002-of-00003.safetensors"
SHARD3 = "model-00003-of-00003.safetensors"
INDEX = "model.safetensors.index.json"
P = "base_model.model."
TEMP_MARK = ".loramerge-tmp-"


@dataclass
class Case:
    """One bad invocation: `merge BASE ADAPTERS... -o OUT OPTIONS...`."""

    base: Path
    adapters: list[Path]
    expect: str  # regex the error message must contain (case-insensitive)
    options: list[str] = field(default_factory=list)
    out: Path | None = None  # default: tmp_path / "out"
    multiline: bool = False  # the one error may continue on lines after `Error: ...`


# -- building inputs --------------------------------------------------------------------------


def copy_base(tmp: Path, source: Path = LLAMA, name: str = "base") -> Path:
    return Path(shutil.copytree(source, tmp / name))


def copy_adapter(tmp: Path, name: str = "llama-lora", dest: str = "adapter") -> Path:
    return Path(shutil.copytree(ADAPTERS / name, tmp / dest))


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def last_two(header: dict) -> tuple[str, str]:
    """Names of the last two tensors in storage order."""
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    return names[-2], names[-1]


def edit_shard(fn: Callable[[dict, bytes], tuple[dict | bytes, bytes]], shard: str = SHARD1):
    """A case builder whose llama-base copy has `shard` rewritten by fn(header, data)."""

    def build(tmp: Path) -> tuple[Path, Path]:
        base = copy_base(tmp)
        header, data = read_safetensors(base / shard)
        write_safetensors(base / shard, *fn(header, data))
        return base, copy_adapter(tmp)

    return build


def _overlap(header: dict, data: bytes):
    before, last = last_two(header)
    size = header[last]["data_offsets"][1] - header[last]["data_offsets"][0]
    begin = header[before]["data_offsets"][1] - 2  # 2 bytes into the tensor before it
    header[last]["data_offsets"] = [begin, begin + size]
    return header, data


def _out_of_range(header: dict, data: bytes):
    _, last = last_two(header)
    entry = header[last]
    begin, end = entry["data_offsets"]
    entry["shape"][0] *= 2  # still consistent with the offsets, but runs past the data
    entry["data_offsets"] = [begin, begin + 2 * (end - begin)]
    return header, data


def _end_before_begin(header: dict, data: bytes):
    _, last = last_two(header)
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [end, begin]
    return header, data


def _gap(header: dict, data: bytes):
    _, last = last_two(header)
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 2, end + 2]
    return header, data + b"\0\0"  # the shifted tensor still ends inside the file


def _set(key: str, value):
    def fn(header: dict, data: bytes):
        header[last_two(header)[1]][key] = value
        return header, data

    return fn


def truncated(tmp: Path) -> Case:
    base = copy_base(tmp)
    raw = (base / SHARD2).read_bytes()
    (base / SHARD2).write_bytes(raw[:-100])
    return Case(base, [copy_adapter(tmp)], rf"{SHARD2}.*truncated")


def header_len(value: Callable[[int], int], expect: str) -> Callable[[Path], Case]:
    def build(tmp: Path) -> Case:
        base = copy_base(tmp)
        raw = (base / SHARD1).read_bytes()
        (base / SHARD1).write_bytes(value(len(raw)).to_bytes(8, "little") + raw[8:])
        return Case(base, [copy_adapter(tmp)], expect)

    return build


def broken_shard(fn, expect: str, shard: str = SHARD1) -> Callable[[Path], Case]:
    def build(tmp: Path) -> Case:
        base, adapter = edit_shard(fn, shard)(tmp)
        return Case(base, [adapter], rf"{re.escape(shard)}.*(?:{expect})")

    return build


def index_case(
    edit: Callable[[Path, dict], None], expect: str, tensors: list[str] | None = None
) -> Callable[[Path], Case]:
    """llama-base copy whose index.json weight_map is changed by edit(base, weight_map)."""

    def build(tmp: Path) -> Case:
        base = copy_base(tmp)
        index = json.loads((base / INDEX).read_text())
        edit(base, index["weight_map"])
        (base / INDEX).write_text(json.dumps(index, indent=2))
        return Case(base, [copy_adapter(tmp)], expect)

    return build


def _outside_copy(base: Path) -> Path:
    """A real safetensors file next to (not inside) the base folder."""
    outside = base.parent / "x.safetensors"
    shutil.copyfile(base / SHARD1, outside)
    return outside


def _remap(weight_map: dict, old: str, new: str) -> None:
    for name, shard in weight_map.items():
        if shard == old:
            weight_map[name] = new


def _parent_relative(base: Path, weight_map: dict) -> None:
    _outside_copy(base)
    _remap(weight_map, SHARD1, "../x.safetensors")


def _absolute(base: Path, weight_map: dict) -> None:
    _remap(weight_map, SHARD1, str(_outside_copy(base).resolve()))


def _symlink_out(base: Path, weight_map: dict) -> None:
    (base / "link.safetensors").symlink_to(_outside_copy(base).resolve())
    _remap(weight_map, SHARD1, "link.safetensors")


def _missing_shard(base: Path, weight_map: dict) -> None:
    (base / SHARD3).unlink()


def _extra_name(base: Path, weight_map: dict) -> None:
    weight_map["model.layers.9.mlp.up_proj.weight"] = SHARD1


def _wrong_shard(base: Path, weight_map: dict) -> None:
    weight_map["model.embed_tokens.weight"] = SHARD2


def adapter_config(edit: Callable[[dict], dict | str | None], expect: str) -> Callable:
    """llama-lora copy whose adapter_config.json is changed by edit(config)."""

    def build(tmp: Path) -> Case:
        adapter = copy_adapter(tmp)
        path = adapter / "adapter_config.json"
        config = json.loads(path.read_text())
        new = edit(config)
        path.write_text(new if isinstance(new, str) else json.dumps(config, indent=2))
        return Case(copy_base(tmp), [adapter], expect)

    return build


def adapter_tensors(edit: Callable[[dict], None], expect: str) -> Callable:
    """llama-lora copy whose adapter_model.safetensors is rewritten after edit(tensors)."""

    def build(tmp: Path) -> Case:
        adapter = copy_adapter(tmp)
        path = adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
        return Case(copy_base(tmp), [adapter], expect)

    return build


def _rank_disagrees(tensors: dict) -> None:
    tensors[f"{P}model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(64, 7)


def _foreign_tuner(tensors: dict) -> None:
    tensors[f"{P}model.layers.0.self_attn.q_proj.hada_w1_a"] = torch.zeros(8, 64)


def _uninterpretable(tensors: dict) -> None:
    tensors[f"{P}model.layers.0.self_attn.q_proj.lora_C"] = torch.zeros(8, 64)


def missing_config(tmp: Path) -> Case:
    adapter = copy_adapter(tmp)
    (adapter / "adapter_config.json").unlink()
    return Case(copy_base(tmp), [adapter], r"adapter_config\.json")


def other_base(tmp: Path) -> Case:
    return Case(copy_base(tmp, GPT2), [copy_adapter(tmp)], r"model\.layers\.\d\.", multiline=True)


def pickle_base(tmp: Path) -> Path:
    """llama-base as a pytorch_model.bin with the same config and tokenizer files."""
    base = tmp / "pickled"
    base.mkdir()
    state = {}
    for shard in (SHARD1, SHARD2, SHARD3):
        state.update(load_file(LLAMA / shard))
    torch.save(state, base / "pytorch_model.bin")
    for side in LLAMA.iterdir():
        if not side.name.endswith((".safetensors", ".index.json")):
            shutil.copyfile(side, base / side.name)
    return base


def pickle_without_flag(tmp: Path) -> Case:
    return Case(pickle_base(tmp), [copy_adapter(tmp)], "--allow-pickle")


def out_exists(tmp: Path) -> Case:
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return Case(copy_base(tmp), [copy_adapter(tmp)], "already exists", out=out)


def out_is_base(tmp: Path) -> Case:
    base = copy_base(tmp)
    return Case(base, [copy_adapter(tmp)], r"\binput\b", out=base, options=["--overwrite"])


def out_is_adapter(tmp: Path) -> Case:
    adapter = copy_adapter(tmp)
    return Case(copy_base(tmp), [adapter], r"\binput\b", out=adapter, options=["--overwrite"])


def weight_count(tmp: Path) -> Case:
    return Case(
        copy_base(tmp),
        [copy_adapter(tmp)],
        r"weights?\b.*\badapters?",
        options=["-w", "1", "-w", "0.5"],
    )


def weight(value: str) -> Callable[[Path], Case]:
    def build(tmp: Path) -> Case:
        expect = rf"weight {re.escape(value)}.*finite"
        return Case(copy_base(tmp), [copy_adapter(tmp)], expect, options=["-w", value])

    return build


def out_inside_base(tmp: Path) -> Case:
    base = copy_base(tmp)
    return Case(base, [copy_adapter(tmp)], r"inside input", out=base / "merged")


def out_inside_adapter(tmp: Path) -> Case:
    adapter = copy_adapter(tmp)
    return Case(copy_base(tmp), [adapter], r"inside input", out=adapter / "merged")


def no_cuda(tmp: Path) -> Case:
    return Case(
        copy_base(tmp),
        [copy_adapter(tmp)],
        r"no cuda|cuda.*not available",
        options=["--device", "cuda"],
    )


def no_base(tmp: Path) -> Case:
    return Case(tmp / "no-such-base", [copy_adapter(tmp)], "no-such-base")


def no_adapter(tmp: Path) -> Case:
    return Case(copy_base(tmp), [tmp / "no-such-adapter"], "no-such-adapter")


def bad_shard_size(tmp: Path) -> Case:
    return Case(copy_base(tmp), [copy_adapter(tmp)], "5XB", options=["--max-shard-size", "5XB"])


# JSON that Python's parser rejects with something other than JSONDecodeError: the message
# must still say which file is bad.
DEEP = b"[" * 100_000 + b"]" * 100_000
LONG_INT = b"1" * 5000  # over CPython's 4300-digit limit for int parsing


def base_config(raw: bytes) -> Callable[[Path], Case]:
    def build(tmp: Path) -> Case:
        base = copy_base(tmp)
        (base / "config.json").write_bytes(raw)
        return Case(base, [copy_adapter(tmp)], r"config\.json")

    return build


def index_bytes(raw: bytes) -> Callable[[Path], Case]:
    def build(tmp: Path) -> Case:
        base = copy_base(tmp)
        (base / INDEX).write_bytes(raw)
        return Case(base, [copy_adapter(tmp)], re.escape(INDEX))

    return build


def adapter_config_bytes(raw: bytes) -> Callable[[Path], Case]:
    def build(tmp: Path) -> Case:
        adapter = copy_adapter(tmp)
        (adapter / "adapter_config.json").write_bytes(raw)
        return Case(copy_base(tmp), [adapter], r"adapter_config\.json")

    return build


CASES: dict[str, Callable[[Path], Case]] = {
    # base safetensors files
    "truncated-shard": truncated,
    "header-len-past-eof": header_len(lambda size: size, rf"{SHARD1}.*header"),
    "header-len-over-100MB": header_len(lambda size: 200_000_000, rf"{SHARD1}.*header"),
    "overlapping-offsets": broken_shard(_overlap, "overlap"),
    "offsets-out-of-range": broken_shard(_out_of_range, r"data region|past|beyond|truncated"),
    "offsets-end-before-begin": broken_shard(_end_before_begin, "before|offsets"),
    "gap-between-tensors": broken_shard(_gap, "gap"),
    "dtype-disagrees-with-bytes": broken_shard(_set("dtype", "F32"), r"needs|bytes"),
    "shape-disagrees-with-bytes": broken_shard(_set("shape", [32, 65]), r"needs|bytes"),
    "header-not-json": broken_shard(lambda h, d: (b"{not json at all", d), "json"),
    "header-not-object": broken_shard(lambda h, d: (b"[1, 2, 3]", d), "object"),
    "unknown-dtype": broken_shard(_set("dtype", "BF17"), r"dtype.*BF17"),
    # model.safetensors.index.json
    "index-parent-path": index_case(_parent_relative, r"\.\./x\.safetensors.*outside"),
    "index-absolute-path": index_case(_absolute, r"x\.safetensors.*outside"),
    "index-symlink-outside": index_case(_symlink_out, r"link\.safetensors.*outside"),
    "index-missing-shard": index_case(_missing_shard, rf"{SHARD3}.*(not exist|missing|not found)"),
    "index-names-absent-tensor": index_case(_extra_name, r"model\.layers\.9\.mlp\.up_proj"),
    "index-names-wrong-shard": index_case(_wrong_shard, r"model\.embed_tokens\.weight"),
    # adapters
    "adapter-no-config": missing_config,
    "adapter-config-not-json": adapter_config(lambda c: "{r: 8,", r"adapter_config\.json.*json"),
    "adapter-peft-type-loha": adapter_config(lambda c: c.update(peft_type="LOHA"), "LOHA"),
    "adapter-no-peft-type": adapter_config(lambda c: c.pop("peft_type") and None, r"no peft_type"),
    "adapter-use-qalora": adapter_config(lambda c: c.update(use_qalora=True), "qalora"),
    "adapter-init-pissa": adapter_config(lambda c: c.update(init_lora_weights="pissa"), "pissa"),
    "adapter-r-string": adapter_config(lambda c: c.update(r="8"), r"\br\b.*(integer|'8')"),
    "adapter-r-zero": adapter_config(lambda c: c.update(r=0), r"\br\b.*(positive|0)"),
    "adapter-bad-rank-pattern": adapter_config(
        lambda c: c.update(rank_pattern={"q_proj[": 4}),
        r"(?=.*q_proj\[)(?=.*(regular expression|regex))",
    ),
    "adapter-ranks-disagree": adapter_tensors(_rank_disagrees, r"layers\.0\.self_attn\.q_proj"),
    "adapter-foreign-tuner": adapter_tensors(_foreign_tuner, r"hada_w1_a"),
    "adapter-uninterpretable-key": adapter_tensors(_uninterpretable, r"q_proj\.lora_C"),
    "adapter-for-another-base": other_base,
    "pickle-without-allow-pickle": pickle_without_flag,
    # command line
    "out-exists": out_exists,
    "out-is-base": out_is_base,
    "out-is-adapter": out_is_adapter,
    "weight-count": weight_count,
    "weight-nan": weight("nan"),
    "weight-inf": weight("-inf"),
    "weight-beyond-float32": weight("1e+39"),
    "out-inside-base": out_inside_base,
    "out-inside-adapter": out_inside_adapter,
    "device-cuda-absent": no_cuda,
    "base-missing": no_base,
    "adapter-missing": no_adapter,
    "max-shard-size-garbage": bad_shard_size,
    # hostile JSON
    "header-deeply-nested": broken_shard(lambda h, d: (DEEP, d), "json|nest|deep"),
    "header-huge-int-literal": broken_shard(lambda h, d: (b'{"x": ' + LONG_INT + b"}", d), ""),
    "index-deeply-nested": index_bytes(DEEP),
    "index-nul-in-shard-name": index_case(
        lambda base, wm: wm.update({"lm_head.weight": "x\x00.safetensors"}), re.escape(INDEX)
    ),
    "base-config-deeply-nested": base_config(DEEP),
    "adapter-config-deeply-nested": adapter_config_bytes(DEEP),
    "adapter-config-huge-int-literal": adapter_config_bytes(b'{"r": ' + LONG_INT + b"}"),
    "adapter-lora-alpha-10**400": adapter_config(
        lambda c: c.update(lora_alpha=10**400), r"(?=.*adapter_config\.json)(?=.*lora_alpha)"
    ),
}

NEEDS_NO_CUDA = {"device-cuda-absent"}


def snapshot(root: Path) -> tuple[dict[str, str], set[str]]:
    """(sha256 of every file, every path including folders and links) under root."""
    return tree_hashes(root), {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                name in NEEDS_NO_CUDA and torch.cuda.is_available(), reason="CUDA is available"
            ),
        )
        for name in CASES
    ],
)
def test_bad_input_is_refused_cleanly(cli, tmp_path, name):
    case = CASES[name](tmp_path)
    out = case.out or tmp_path / "out"
    out_existed = out.exists()
    before = snapshot(tmp_path)

    result = cli("merge", case.base, *case.adapters, "-o", out, *case.options)

    assert result.code == 2, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err}"
    assert "Traceback" not in result.err, result.err
    lines = result.err.splitlines()
    assert lines and lines[0].startswith("Error: "), result.err
    if not case.multiline:
        assert len(lines) == 1, f"expected one stderr line, got:\n{result.err}"
    assert re.search(case.expect, result.err, re.IGNORECASE), (
        f"{case.expect!r} not in error:\n{result.err}"
    )
    assert out.exists() == out_existed, f"{out} left behind"
    assert not list(out.parent.glob(f".{out.name}{TEMP_MARK}*")), "temporary folder left behind"
    assert snapshot(tmp_path) == before, "inputs or the folder around them changed"


def test_adapter_for_another_base_lists_the_unmatched_modules(cli, tmp_path):
    """One error naming the modules that match nothing, several of them, not just the first."""
    base, adapter = copy_base(tmp_path, GPT2), copy_adapter(tmp_path)
    result = cli("merge", base, adapter, "-o", tmp_path / "out")
    assert result.code == 2, result.err
    assert result.err.startswith("Error: ")
    modules = {
        f"model.layers.{layer}.{module}"
        for layer in (0, 1)
        for module in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    named = {m for m in modules if m in result.err}
    assert len(named) >= 2, f"expected at least two unmatched modules named in:\n{result.err}"


def test_pickle_base_merges_with_allow_pickle(cli, tmp_path):
    """The same .bin merges with --allow-pickle, into exactly what the safetensors base gives."""
    base = pickle_base(tmp_path)
    adapter = copy_adapter(tmp_path)
    before = tree_hashes(base)
    out = tmp_path / "from-pickle"
    result = cli("merge", base, adapter, "-o", out, "--allow-pickle", "--quiet")
    assert result.code == 0, result.err
    assert tree_hashes(base) == before
    reference = tmp_path / "from-safetensors"
    assert cli("merge", copy_base(tmp_path), adapter, "-o", reference, "--quiet").code == 0
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.parametrize("value", ["nan", "inf", "-3.5e+38"])
def test_every_command_refuses_a_weight_that_is_not_a_finite_float32(cli, tmp_path, value):
    """A NaN or infinite weight would make every weight it touches NaN, and a check against it
    would expect just that: unmerge, rebase, verify, combine and export-adapter refuse it too."""
    merged = tmp_path / "merged"
    assert cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", merged, "-q").code == 0
    lora, other = ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora"
    out = tmp_path / "out"
    for args in (
        ["unmerge", merged, lora, "-o", out, "-w", value],
        ["rebase", merged, "--remove", lora, "--add", other, "-o", out, "-w", value],
        ["rebase", merged, "--remove", lora, "--add", other, "-o", out, "--base", LLAMA,
         "-w", value],
        ["verify", merged, "--base", LLAMA, "--adapter", lora, "-w", value],
        ["combine", lora, other, "-o", out, "-w", "1", "-w", value],
        ["export-adapter", lora, "--base", LLAMA, "-o", tmp_path / "a.gguf", "-w", value],
    ):  # fmt: skip
        result = cli(*args)
        assert result.code == 2, (args[0], result.err)
        assert result.err.startswith("Error: ") and "finite" in result.err, result.err
        assert not out.exists() and not (tmp_path / "a.gguf").exists()


def test_a_rebuild_cannot_write_over_the_merged_model_it_checks(cli, tmp_path):
    merged = tmp_path / "merged"
    assert cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", merged, "-q").code == 0
    before = tree_hashes(merged)
    args = ["rebase", merged, "--remove", ADAPTERS / "llama-lora", "--add"]
    result = cli(*args, ADAPTERS / "llama-rslora", "-o", merged, "--base", LLAMA, "--overwrite")
    assert result.code == 2 and "would overwrite input" in result.err, result.err
    assert tree_hashes(merged) == before


Q = ["quantize", LLAMA]


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ([*Q, "--gguf-type", "q8_0"], r"Missing option '--to'\. Choose from: nf4, gguf"),
        ([*Q, "--to", "nf4", "--gguf-type", "q8_0"], r"--gguf-type applies to --to gguf"),
        ([*Q, "--to", "gguf", "--blocksize", "128"], r"--blocksize applies to --to nf4"),
        ([*Q, "--to", "gguf", "--skip-modules", "x"], r"--skip-modules applies to --to nf4"),
        (["merge", LLAMA, ADAPTERS / "llama-lora", "--gguf-type", "q8_0"], r"--gguf-type q8_0"),
    ],
)
def test_an_option_for_another_format_is_refused_in_one_line(cli, tmp_path, args, expect):
    """An option the chosen output format would ignore is refused, as is a missing --to (whose
    choices click lists on lines of their own: joined into one)."""
    out = tmp_path / "out"
    result = cli(*args, "-o", out)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert re.search(expect, result.err), result.err
    assert not out.exists()


def test_quantizing_an_infinite_weight_to_nf4_names_it(cli, tmp_path):
    base = copy_base(tmp_path)
    tensors = load_file(base / SHARD1)
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, base / SHARD1, metadata={"format": "pt"})
    out = tmp_path / "nf4"
    result = cli("quantize", base, "-o", out, "--to", "nf4")
    assert result.code == 2 and result.err.strip() == f"Error: {name}: " + (
        "NaN or Inf among the values: NF4 cannot hold them"
    )
    assert not out.exists()
