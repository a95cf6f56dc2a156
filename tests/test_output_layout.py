"""The top-level `*.safetensors` files of an output are the model's weights and nothing else.

Loaders that take every `*.safetensors` at the top of a folder (vLLM and TGI without an index,
many scripts) must find exactly the model's tensors there: loramerge's DoRA norms live in
`loramerge/dora_norms.safetensors`, named by the record and hashed with the other files. Folders
written before that (norms in a top-level `loramerge_dora_norms.safetensors`) still unmerge and
rebase.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import blake3
import pytest
from conftest import ADAPTERS, LLAMA
from safetensors import safe_open

from loramerge.sink.hf_folder import NORMS_FILE

OLD_NORMS_FILE = "loramerge_dora_norms.safetensors"  # where loramerge 0.1 wrote the norms
INDEX = "model.safetensors.index.json"
LORA, DORA = ADAPTERS / "llama-lora", ADAPTERS / "llama-dora"


@functools.cache
def model_names() -> frozenset[str]:
    """The base's tensor names as transformers loads them (its state dict)."""
    from transformers import AutoModelForCausalLM

    return frozenset(AutoModelForCausalLM.from_pretrained(LLAMA).state_dict())


def _write(cli, how: str, out, shard: list[str]) -> None:
    """One output with or without DoRA norms: merged, or unmerged and carrying norms over."""
    if how == "unmerge-carrying-dora":
        both = out.parent / "both"
        assert cli("merge", LLAMA, LORA, DORA, "-o", both, "--quiet").code == 0
        result = cli("unmerge", both, LORA, "-o", out, "--quiet", *shard)
    else:
        adapter = DORA if how == "merge-dora" else LORA
        result = cli("merge", LLAMA, adapter, "-o", out, "--quiet", *shard)
    assert result.code == 0, result.err


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize("how", ["merge-lora", "merge-dora", "unmerge-carrying-dora"])
def test_top_level_safetensors_hold_exactly_the_model(cli, tmp_path, how, sharded):
    out = tmp_path / "out"
    _write(cli, how, out, ["--max-shard-size", "40KB"] if sharded else [])
    top = sorted(p.name for p in out.glob("*.safetensors"))
    stored: dict[str, str] = {}
    for name in top:
        with safe_open(out / name, "pt") as reader:
            for key in reader.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert key not in stored, f"{key} in {stored.get(key)} and {name}"
                stored[key] = name
    assert set(stored) == model_names()
    if sharded:
        weight_map = json.loads((out / INDEX).read_text())["weight_map"]
        assert len(top) > 1 and set(top) == set(weight_map.values())
        assert weight_map == stored
    else:
        assert top == ["model.safetensors"] and not (out / INDEX).exists()

    record = json.loads((out / "loramerge.json").read_text())
    if how == "merge-lora":
        assert "dora_norms" not in record and not (out / "loramerge").exists()
    else:
        assert record["dora_norms"]["file"] == NORMS_FILE
        norms = (out / NORMS_FILE).read_bytes()
        assert record["files"][NORMS_FILE] == blake3.blake3(norms).hexdigest()
    check = cli("verify", out, "--files", "--json")
    assert check.code == 0 and json.loads(check.out)["files"]["extra"] == []
    print(f"\n{how}, {len(top)} file(s): {len(stored)} tensors, all the model's")


@pytest.mark.parametrize("how", ["merge-lora", "merge-dora", "unmerge-carrying-dora"])
def test_output_loads_without_unexpected_keys(cli, tmp_path, how):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    _write(cli, how, out, ["--max-shard-size", "40KB"])
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors


def old_layout(folder) -> None:
    """Rewrite a DoRA output the way loramerge 0.1 wrote it: the norms beside the weights."""
    os.rename(folder / NORMS_FILE, folder / OLD_NORMS_FILE)
    (folder / "loramerge").rmdir()
    record = json.loads((folder / "loramerge.json").read_text())
    record["dora_norms"]["file"] = OLD_NORMS_FILE
    record["files"][OLD_NORMS_FILE] = record["files"].pop(NORMS_FILE)
    record["files"] = dict(sorted(record["files"].items()))
    (folder / "loramerge.json").write_text(json.dumps(record, indent=2) + "\n")


def _weights(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model*"))}


def test_folders_in_the_old_layout_still_unmerge_and_rebase(cli, tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    assert cli("merge", LLAMA, DORA, "-o", new, "--quiet").code == 0
    shutil.copytree(new, old)
    old_layout(old)
    assert cli("verify", old, "--files").code == 0
    jobs = {
        "unmerged": ["unmerge", "{m}", DORA],
        "rebased": ["rebase", "{m}", "--remove", DORA, "--add", LORA],
    }
    for job, argv in jobs.items():
        for merged in (new, old):
            args = [str(a).format(m=merged) for a in argv]
            result = cli(*args, "-o", tmp_path / f"{job}-{merged.name}", "--quiet")
            assert result.code == 0, f"{job} from {merged.name}: {result.err}"
        assert _weights(tmp_path / f"{job}-old") == _weights(tmp_path / f"{job}-new"), job
    # and without the norms the old folder cannot undo DoRA, so they really were read
    (old / OLD_NORMS_FILE).unlink()
    result = cli("unmerge", old, DORA, "-o", tmp_path / "no-norms")
    assert result.code == 2 and "pass --base" in result.err


def test_norms_carried_out_of_an_old_folder_land_in_the_new_place(cli, tmp_path):
    both = tmp_path / "both"
    assert cli("merge", LLAMA, LORA, DORA, "-o", both, "--quiet").code == 0
    old_layout(both)
    out = tmp_path / "out"
    assert cli("unmerge", both, LORA, "-o", out, "--quiet").code == 0
    record = json.loads((out / "loramerge.json").read_text())
    assert record["dora_norms"]["file"] == NORMS_FILE
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert cli("verify", out, "--files").code == 0
    with safe_open(both / OLD_NORMS_FILE, "np") as was, safe_open(out / NORMS_FILE, "np") as now:
        assert set(now.keys()) == set(was.keys()) and len(was.keys()) == 6
        for key in was.keys():  # noqa: SIM118 (safe_open is not a mapping)
            assert now.get_tensor(key).tobytes() == was.get_tensor(key).tobytes(), key
    result = cli("unmerge", out, DORA, "-o", tmp_path / "base-again", "--quiet")
    assert result.code == 0, result.err


def test_a_record_naming_another_norms_file_is_refused(cli, tmp_path):
    merged, out = tmp_path / "merged", tmp_path / "out"
    assert cli("merge", LLAMA, DORA, "-o", merged, "--quiet").code == 0
    (tmp_path / "elsewhere.safetensors").write_bytes((merged / NORMS_FILE).read_bytes())
    record = json.loads((merged / "loramerge.json").read_text())
    record["dora_norms"]["file"] = "../elsewhere.safetensors"
    (merged / "loramerge.json").write_text(json.dumps(record))
    result = cli("unmerge", merged, DORA, "-o", out)
    assert result.code == 2 and not out.exists()
    assert result.err.startswith("Error: ") and len(result.err.splitlines()) == 1
    assert "'../elsewhere.safetensors'" in result.err
