"""Pickled bases and adapters, end to end: merge, unmerge, rebase, inspect and verify.

The `.bin` files are made here from the safetensors fixtures with `torch.save` of the state dict,
the way transformers (`pytorch_model.bin`) and older PEFT releases (`adapter_model.bin`) saved
them. Every job run on them must write what the same job writes from the safetensors fixtures,
byte for byte; only the names of the inputs (paths, sha256, weights file) differ, and the record
must name each adapter's `.bin` with that file's sha256. Without `--allow-pickle` each command
refuses with one `Error:` line and exit status 2.

A merge writes tensors in the order it reads them: for the sharded llama fixture, shard by shard
as the index first names them, by offset within each shard. The `.bin` bases list their tensors
in that order, so whole files can be compared; a `.bin` in another order is checked tensor by
tensor.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA, tree_hashes
from safetensors import safe_open
from safetensors.torch import load_file

from loramerge.sink.hf_folder import NORMS_FILE

# (base, adapter merged first, adapter a rebase puts in its place)
CASES = {
    "llama-lora": (LLAMA, "llama-lora", "llama-lora-b"),
    "llama-dora": (LLAMA, "llama-dora", "llama-lora"),
    "gpt2-lora": (GPT2, "gpt2-lora", "gpt2-embed"),
}


def _stored_order(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors base, in the order a merge reads it (see the docstring)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        with open(folder / shard, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        with safe_open(folder / shard, "pt") as reader:
            for name in sorted(header, key=lambda n: header[n]["data_offsets"]):
                state[name] = reader.get_tensor(name)
    return state


def pickle_base(source: Path, dest: Path, *, reverse: bool = False) -> Path:
    """`source` as `pytorch_model.bin` beside copies of its config and tokenizer files."""
    dest.mkdir(parents=True)
    state = _stored_order(source)
    if reverse:
        state = dict(reversed(state.items()))
    torch.save(state, dest / "pytorch_model.bin")
    for side in source.iterdir():
        if not side.name.endswith((".safetensors", ".index.json")):
            shutil.copyfile(side, dest / side.name)
    return dest


def pickle_adapter(source: Path, dest: Path) -> Path:
    """A PEFT adapter folder as older PEFT saved it: adapter_config.json + adapter_model.bin."""
    dest.mkdir(parents=True)
    torch.save(load_file(source / "adapter_model.safetensors"), dest / "adapter_model.bin")
    for side in source.iterdir():
        if side.name != "adapter_model.safetensors":
            shutil.copyfile(side, dest / side.name)
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _renaming(pickled: dict[Path, Path]) -> list[tuple[str, str]]:
    """Text substitutions from the pickled inputs' names to the safetensors ones."""
    subs = []
    for binary, original in pickled.items():
        subs.append((str(binary), str(original)))
        if (binary / "adapter_model.bin").is_file():
            got = sha256(binary / "adapter_model.bin")
            want = sha256(original / "adapter_model.safetensors")
            subs += [(got, want), (got[:16], want[:16]), (got[:12], want[:12])]
    return [
        *sorted(subs, key=lambda s: -len(s[0])),
        ("adapter_model.bin", "adapter_model.safetensors"),
    ]


def _rename(text: str, subs: list[tuple[str, str]]) -> str:
    for old, new in subs:
        text = text.replace(old, new)
    return text


def comparable(folder: Path, subs: list[tuple[str, str]]) -> dict:
    """An output folder with the inputs' names mapped by `subs` and timestamps left out."""
    found: dict[str, object] = dict(tree_hashes(folder))
    record = json.loads(_rename((folder / "loramerge.json").read_text(), subs))
    record.pop("created")
    for step in record["history"]:
        step.pop("at")
    for renamed in ("README.md", NORMS_FILE):  # their text holds the inputs' names
        record["files"].pop(renamed, None)
    if "dora_norms" in record:
        record["dora_norms"].pop("sha256")
    found["loramerge.json"] = record
    found["README.md"] = _rename((folder / "README.md").read_text(), subs)
    if (folder / NORMS_FILE).is_file():
        norms = load_file(folder / NORMS_FILE)
        found[NORMS_FILE] = {_rename(k, subs): v.numpy().tobytes() for k, v in norms.items()}
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_pickled_inputs_give_the_bytes_safetensors_give(cli, tmp_path, case):
    base, first, second = CASES[case]
    pickled = {
        pickle_base(base, tmp_path / "bin" / "base"): base,
        pickle_adapter(ADAPTERS / first, tmp_path / "bin" / first): ADAPTERS / first,
        pickle_adapter(ADAPTERS / second, tmp_path / "bin" / second): ADAPTERS / second,
    }
    inputs = {p: tree_hashes(p) for p in pickled}
    subs = _renaming(pickled)
    b_base, b_first, b_second = pickled
    jobs = {
        "merged": (["merge", "{base}", "{first}"], []),
        "unmerged": (["unmerge", "{out}/merged", "{first}"], []),
        "rebased": (["rebase", "{out}/merged", "--remove", "{first}", "--add", "{second}"], []),
        "rebuilt": (
            ["rebase", "{out}/merged", "--remove", "{first}", "--add", "{second}"],
            ["--base", "{base}"],
        ),
    }
    for kind, (b, a1, a2), extra in (
        ("bin", (b_base, b_first, b_second), ["--allow-pickle"]),
        ("st", (base, ADAPTERS / first, ADAPTERS / second), []),
    ):
        out = tmp_path / f"out-{kind}"
        names = {"base": b, "first": a1, "second": a2, "out": out}
        for job, (args, options) in jobs.items():
            argv = [a.format(**names) for a in [*args, *options]]
            result = cli(*argv, "-o", out / job, "--quiet", *extra)
            assert result.code == 0, f"{kind} {job}: {result.err}"

    # outputs also name the models they were computed from (`computed_from`)
    subs.append((str(tmp_path / "out-bin"), str(tmp_path / "out-st")))
    for job in jobs:
        got = comparable(tmp_path / "out-bin" / job, subs)
        want = comparable(tmp_path / "out-st" / job, [])
        assert got == want, job
    print(f"\n{case}: merge, unmerge, rebase, rebase --base from .bin = from .safetensors")

    merged = json.loads((tmp_path / "out-bin" / "merged" / "loramerge.json").read_text())
    rebased = json.loads((tmp_path / "out-bin" / "rebased" / "loramerge.json").read_text())
    for record, adapter in ((merged, b_first), (rebased, b_second)):
        (entry,) = record["adapters"]
        assert entry["source"] == str(adapter) and entry["weights_file"] == "adapter_model.bin"
        assert entry["sha256"] == sha256(adapter / "adapter_model.bin")
    assert {p: tree_hashes(p) for p in pickled} == inputs


def test_verify_and_inspect_read_pickles(cli, tmp_path):
    b_base = pickle_base(LLAMA, tmp_path / "base")
    b_lora = pickle_adapter(ADAPTERS / "llama-dora", tmp_path / "adapter")
    out = tmp_path / "merged"
    assert cli("merge", b_base, b_lora, "-o", out, "--allow-pickle", "--quiet").code == 0
    check = cli("verify", out, "--base", b_base, "--adapter", b_lora, "--allow-pickle", "--json")
    assert check.code == 0, check.err
    assert json.loads(check.out)["passed"]
    files = cli("verify", out, "--files", "--json")
    assert files.code == 0 and json.loads(files.out)["files"]["checked"] == 8
    wrong = cli("verify", out, "--base", b_base, "--allow-pickle")  # the adapter left out
    assert wrong.code == 1

    adapter = json.loads(cli("inspect", b_lora, "--allow-pickle", "--json").out)
    assert adapter["files"] == ["adapter_model.bin"] and adapter["use_dora"]
    want = json.loads(cli("inspect", ADAPTERS / "llama-dora", "--json").out)
    assert {k: v for k, v in adapter.items() if k not in ("path", "files")} == {
        k: v for k, v in want.items() if k not in ("path", "files")
    }
    base = json.loads(cli("inspect", b_base, "--allow-pickle", "--json").out)
    assert base["files"] == ["pytorch_model.bin"] and base["tensors"] == len(_stored_order(LLAMA))
    report = json.loads(cli("inspect", out, "--json").out)
    assert report["provenance"]["adapters"][0]["sha256"] == sha256(b_lora / "adapter_model.bin")


def test_safetensors_base_with_a_pickled_adapter(cli, tmp_path):
    """The reported case: a safetensors base, an adapter folder holding adapter_model.bin."""
    b_lora = pickle_adapter(ADAPTERS / "llama-lora", tmp_path / "adapter")
    got, want = tmp_path / "from-bin", tmp_path / "from-st"
    result = cli("merge", LLAMA, b_lora, "-o", got, "--allow-pickle", "--quiet")
    assert result.code == 0, result.err
    assert cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", want, "--quiet").code == 0
    for name in ("model.safetensors", "config.json"):
        assert (got / name).read_bytes() == (want / name).read_bytes()


def test_pickle_order_does_not_change_the_tensors(cli, tmp_path):
    """A .bin listing its tensors in another order gives the same tensors, byte for byte."""
    reversed_base = pickle_base(LLAMA, tmp_path / "reversed", reverse=True)
    got, want = tmp_path / "got", tmp_path / "want"
    args = (ADAPTERS / "llama-lora", "--allow-pickle", "--quiet")
    assert cli("merge", reversed_base, *args, "-o", got).code == 0
    assert cli("merge", LLAMA, *args, "-o", want).code == 0
    a, b = load_file(got / "model.safetensors"), load_file(want / "model.safetensors")
    assert a.keys() == b.keys()
    for name, tensor in b.items():
        assert a[name].dtype == tensor.dtype and torch.equal(a[name].view(-1), tensor.view(-1))


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "{llama}", "{bin_adapter}", "-o", "{out}"],
        ["merge", "{bin_base}", "{adapter}", "-o", "{out}"],
        ["unmerge", "{merged}", "{bin_adapter}", "-o", "{out}"],
        ["rebase", "{merged}", "--remove", "{adapter}", "--add", "{bin_adapter}", "-o", "{out}"],
        [
            "rebase",
            "{merged}",
            "--remove",
            "{adapter}",
            "--add",
            "{adapter}",
            "-o",
            "{out}",
            "--base",
            "{bin_base}",
        ],
        ["inspect", "{bin_adapter}"],
        ["inspect", "{bin_base}"],
        ["verify", "{merged}", "--base", "{bin_base}", "--adapter", "{adapter}"],
        ["verify", "{merged}", "--base", "{llama}", "--adapter", "{bin_adapter}"],
    ],
    ids=lambda argv: " ".join(a.strip("{}") for a in argv if a != "-o" and a != "{out}"),
)
def test_pickles_are_refused_without_allow_pickle(cli, tmp_path, argv):
    adapter = ADAPTERS / "llama-lora"
    merged = tmp_path / "merged"
    assert cli("merge", LLAMA, adapter, "-o", merged, "--quiet").code == 0
    names = {
        "llama": LLAMA,
        "adapter": adapter,
        "merged": merged,
        "bin_base": pickle_base(LLAMA, tmp_path / "bin-base"),
        "bin_adapter": pickle_adapter(adapter, tmp_path / "bin-adapter"),
        "out": tmp_path / "out",
    }
    before = tree_hashes(tmp_path)
    result = cli(*[a.format(**names) for a in argv])
    assert result.code == 2, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--allow-pickle" in lines[0]
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out").exists()
