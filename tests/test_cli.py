"""The command line contract: outputs, --json, --dry-run, --quiet, shards, inspect, provenance."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA
from reference import load_base
from safetensors import safe_open

from loramerge import __version__


def test_version(cli):
    result = cli("--version")
    assert result.code == 0
    assert __version__ in result.out


def test_merge_writes_a_loadable_folder(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", out)
    assert result.code == 0, result.err
    assert f"-> {out}" in result.out
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "loramerge.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert "chat_template.jinja" in names
    assert not list(tmp_path.glob(".*loramerge-tmp*"))
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_json_summary_is_one_object(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", out, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["tensors_total"] == 21
    assert summary["tensors_modified"] == 14
    assert summary["bytes_written"] == sum(t.numel() * 2 for t in load_base(out).values())
    assert summary["seconds"] >= 0
    assert summary["output"] == str(out)


def test_quiet_prints_nothing(cli, tmp_path):
    result = cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", tmp_path / "o", "--quiet")
    assert result.code == 0
    assert result.out == "" and result.err == ""


def test_dry_run_prints_plan_and_writes_nothing(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", LLAMA, ADAPTERS / "llama-patterns", "-o", out, "--dry-run", "--json")
    assert result.code == 0, result.err
    assert not out.exists() and not list(tmp_path.iterdir())
    plan = {row["tensor"]: row for row in json.loads(result.out)["plan"]}
    q = plan["model.layers.0.self_attn.q_proj.weight"]["adapters"][0]
    assert (q["rank"], q["scale"]) == (2, 4.0)
    down1 = plan["model.layers.1.mlp.down_proj.weight"]["adapters"][0]
    assert (down1["rank"], down1["scale"]) == (6, 8 / 6)
    table = cli("merge", LLAMA, ADAPTERS / "llama-patterns", "-o", out, "--dry-run")
    assert "dry run" in table.out and "q_proj" in table.out
    assert not out.exists()


def test_sharding_and_index(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", out, "--max-shard-size", "100KB")
    assert result.code == 0, result.err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __contains__
                assert index["weight_map"][key] == shard
                total += fh.get_tensor(key).numel() * 2
        assert (out / shard).stat().st_size <= 100_000 + 2_000  # data plus header
    assert index["metadata"]["total_size"] == total
    single = tmp_path / "single"
    cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", single)
    merged, sharded = load_base(single), load_base(out)
    assert merged.keys() == sharded.keys()
    assert all(torch.equal(merged[k], sharded[k]) for k in merged)


def test_dtype_option_updates_config(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", out, "--dtype", "float16").code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert {t.dtype for t in load_base(out).values()} == {torch.float16}


def test_untouched_tensors_are_copied_bytewise(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("merge", LLAMA, ADAPTERS / "llama-rslora", "-o", out).code == 0
    base, merged = load_base(LLAMA), load_base(out)
    untouched = [k for k in base if "q_proj" not in k and "v_proj" not in k]
    assert untouched and all(torch.equal(base[k], merged[k]) for k in untouched)


def test_overwrite_replaces_existing_output(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("merge", LLAMA, ADAPTERS / "llama-lora", "-o", out).code == 0
    (out / "stale.txt").write_text("old")
    assert cli("merge", LLAMA, ADAPTERS / "llama-rslora", "-o", out, "--overwrite").code == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "loramerge.json").read_text())["adapters"][0]["rank"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_provenance_and_model_card(cli, tmp_path):
    out = tmp_path / "out"
    args = ["merge", LLAMA, ADAPTERS / "llama-lora", ADAPTERS / "llama-lora-b", "-o", out]
    assert cli(*args, "-w", "1", "-w", "-0.5").code == 0
    record = json.loads((out / "loramerge.json").read_text())
    first, second = record["adapters"]
    assert (first["weight"], first["rank"], first["scale"]) == (1.0, 8, 2.0)
    assert (second["weight"], second["rank"], second["scale"]) == (-0.5, 4, 1.0)
    assert len(first["sha256"]) == 64 and first["sha256"] != second["sha256"]
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model:" in front
    assert all(f"- {tag}" in front for tag in ("lora", "merge", "loramerge"))


def test_inspect_kinds(cli, tmp_path):
    base = json.loads(cli("inspect", LLAMA, "--json").out)
    assert base["kind"] == "checkpoint" and base["architecture"] == "LlamaForCausalLM"
    assert base["tensors"] == 21 and base["dtype"] == "BF16" and len(base["files"]) == 3
    adapter = json.loads(cli("inspect", ADAPTERS / "llama-rslora", "--json").out)
    assert adapter["kind"] == "adapter" and adapter["use_rslora"] is True
    assert adapter["scale"] == 4.0 and adapter["rank"] == 4
    dora = json.loads(cli("inspect", ADAPTERS / "llama-dora", "--json").out)
    assert dora["use_dora"] is True
    out = tmp_path / "out"
    cli("merge", GPT2, ADAPTERS / "gpt2-lora", "-o", out)
    merged = json.loads(cli("inspect", out, "--json").out)
    assert merged["kind"] == "merged"
    assert merged["provenance"]["adapters"][0]["source"].endswith("gpt2-lora")
    human = cli("inspect", out)
    assert human.code == 0 and "gpt2-lora" in human.out


def test_single_safetensors_file_as_base(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", GPT2 / "model.safetensors", ADAPTERS / "gpt2-lora", "-o", out)
    assert result.code == 0, result.err
    folder = tmp_path / "folder"
    cli("merge", GPT2, ADAPTERS / "gpt2-lora", "-o", folder)
    assert (out / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def _on_terminal(args) -> str:
    """Run the CLI with a pseudo-terminal as stdout and stderr; return what it showed."""
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "loramerge", *map(str, args)],
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    child.wait(timeout=120)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_quiet(tmp_path):
    shown = _on_terminal(["merge", LLAMA, ADAPTERS / "llama-lora", "-o", tmp_path / "a"])
    assert "merging" in shown and "kB" in shown and "Merged 1 adapter(s)" in shown
    quiet = _on_terminal(["merge", LLAMA, ADAPTERS / "llama-lora", "-o", tmp_path / "b", "-q"])
    assert quiet.strip() == ""


# Each command, failing on a missing input (one LoramergeError) before anything is written.
FAILING = {
    "merge": ["merge", "MISSING", ADAPTERS / "llama-lora", "-o", "OUT"],
    "unmerge": ["unmerge", "MISSING", ADAPTERS / "llama-lora", "-o", "OUT"],
    "rebase": [
        "rebase",
        "MISSING",
        "--remove",
        ADAPTERS / "llama-lora",
        "--add",
        LLAMA,
        "-o",
        "OUT",
    ],
    "verify": ["verify", "MISSING", "--base", LLAMA],
    "inspect": ["inspect", "MISSING"],
}


@pytest.mark.parametrize("where", ["before", "after", "nowhere"])
@pytest.mark.parametrize("command", sorted(FAILING))
def test_debug_before_or_after_the_command_shows_the_traceback(cli, tmp_path, command, where):
    args = [tmp_path / a if a in ("MISSING", "OUT") else a for a in FAILING[command]]
    args = {"before": ["--debug", *args], "after": [*args, "--debug"], "nowhere": args}[where]
    result = cli(*args)
    assert result.code == 2
    assert result.err.splitlines()[-1] == f"Error: {tmp_path / 'MISSING'} does not exist"
    traced = "Traceback (most recent call last)" in result.err
    assert traced == (where != "nowhere"), result.err
    assert not (tmp_path / "OUT").exists()


def test_gguf_type_names_in_either_case(cli, tmp_path):
    """llama.cpp and the docs write Q8_0, Q4_K_M; the options take those as well as q8_0."""
    from gguf import GGUFReader

    for given in ("Q8_0", "q8_0"):
        out = tmp_path / f"{given}.gguf"
        result = cli("quantize", LLAMA, "-o", out, "--to", "gguf", "--gguf-type", given, "-q")
        assert result.code == 0, result.err
        types = {t.tensor_type.name for t in GGUFReader(out).tensors}
        assert "Q8_0" in types
