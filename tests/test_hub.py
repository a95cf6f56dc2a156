"""Hub ids end to end: the real `huggingface_hub` client (2.4) over real HTTP against the local
Hub-compatible server in `hub_server.py` (see its docstring for the endpoints it answers).

Every command runs as `python -m loramerge` in a fresh process whose environment holds
HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_DISABLE_XET=1 (the server has no Xet storage) and, for the
offline tests, HF_HUB_OFFLINE=1, exactly as a user's shell would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ADAPTERS, LLAMA, tree_hashes
from hub_server import HubServer

TOKEN = "hf_loramergeTestToken0123456789abcdef"
BAD_TOKEN = "hf_rejectedToken9876543210fedcba"
PICKLE_DECOY = b"not a pickle: a file loramerge must never fetch"
BASE_CARD = b"---\nlicense: llama3.1\n---\n\n# A base model\n"


@pytest.fixture(scope="module")
def hub():
    """The server, holding a base, two adapter revisions, a private and a gated repo."""
    server = HubServer({TOKEN: "alice"})
    state = server.state
    state.add_folder("meta/llama-base", LLAMA)
    state.commit("meta/llama-base", {"pytorch_model.bin": PICKLE_DECOY, "README.md": BASE_CARD})
    state.add_folder("someone/llama-lora", ADAPTERS / "llama-lora")
    files_b = {p.name: p.read_bytes() for p in (ADAPTERS / "llama-lora-b").iterdir()}
    server.commit_b = state.commit("someone/llama-lora", files_b, branch="b")
    state.add_folder("someone/secret-lora", ADAPTERS / "llama-lora", private=True)
    state.add_folder("meta/gated-base", LLAMA, gated=True)
    yield server
    server.close()


def _env(hub, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=os.pathsep.join(sys.path),
    )
    env.update(extra)
    return env


def _run(env: dict, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loramerge", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _weights(folder: Path) -> dict[str, str]:
    return {k: v for k, v in tree_hashes(folder).items() if k.endswith(".safetensors")}


def test_merge_by_repo_id_equals_local_merge_and_records_commits(hub, tmp_path):
    env = _env(hub, tmp_path / "hf")
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert _run(env, "merge", LLAMA, ADAPTERS / "llama-lora", "-o", local).returncode == 0
    hub.state.sent.clear()
    run = _run(env, "merge", "meta/llama-base", "someone/llama-lora", "-o", remote)
    assert run.returncode == 0, run.stderr
    assert "meta/llama-base: Hub repo meta/llama-base at commit" in run.stderr
    assert _weights(remote) == _weights(local)
    # Only what a merge needs: never the pickle, nor the adapter's README as a weight.
    assert hub.state.bytes_sent("pytorch_model.bin") == 0
    cached = {p.name for p in (tmp_path / "hf" / "hub").rglob("*") if p.is_file()}
    assert "pytorch_model.bin" not in cached
    record = json.loads((remote / "loramerge.json").read_text())
    base_commit = hub.state.repos["meta/llama-base"].branches["main"]
    lora_commit = hub.state.repos["someone/llama-lora"].branches["main"]
    assert record["base"]["source"] == f"meta/llama-base@{base_commit}"
    assert record["adapters"][0]["source"] == f"someone/llama-lora@{lora_commit}"
    # Months later the recorded ids fetch exactly the same adapter: unmerge rebuilds from them.
    back = tmp_path / "back"
    run = _run(env, "unmerge", remote, record["adapters"][0]["source"], "-o", back, "--base",
               record["base"]["source"])  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert _weights(back) == _weights(_copy_of_base(tmp_path, env))


def _copy_of_base(tmp_path: Path, env: dict) -> Path:
    """The base as loramerge writes it with nothing merged (same sharding as an output)."""
    out = tmp_path / "base-rewritten"
    run = _run(env, "merge", LLAMA, ADAPTERS / "llama-lora", "-w", "0", "-o", out)
    assert run.returncode == 0, run.stderr
    return out


def test_revision_selects_a_branch_or_commit(hub, tmp_path):
    env = _env(hub, tmp_path / "hf")
    local = tmp_path / "local"
    assert _run(env, "merge", LLAMA, ADAPTERS / "llama-lora-b", "-o", local).returncode == 0
    for revision in ("b", hub.commit_b):
        out = tmp_path / f"at-{revision}"
        run = _run(env, "merge", "meta/llama-base", f"someone/llama-lora@{revision}", "-o", out)
        assert run.returncode == 0, run.stderr
        assert _weights(out) == _weights(local)
        record = json.loads((out / "loramerge.json").read_text())
        assert record["adapters"][0]["source"] == f"someone/llama-lora@{hub.commit_b}"


def test_local_folder_of_the_same_name_wins(hub, tmp_path):
    env = _env(hub, tmp_path / "hf")
    shutil.copytree(LLAMA, tmp_path / "meta" / "llama-base")
    hub.state.sent.clear()
    run = _run(env, "inspect", "meta/llama-base", "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "using the local folder" in run.stderr
    assert hub.state.bytes_sent() == 0
    shutil.copytree(ADAPTERS / "llama-lora", tmp_path / "someone" / "lora")
    quiet = _run(env, "merge", "meta/llama-base", "someone/lora", "-o", "out", "-q", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr  # --quiet: no notes


@pytest.mark.parametrize(
    ("target", "token", "expected"),
    [
        ("nobody/nothing", TOKEN, "neither a local path nor a Hub repo"),
        ("someone/secret-lora", None, "for a private repo log in"),
        ("meta/gated-base", None, "is gated: accept its conditions"),
        ("someone/llama-lora@no-such-branch", TOKEN, "has no revision 'no-such-branch'"),
        ("someone/llama-lora", BAD_TOKEN, "answered 401"),
    ],
)
def test_unreachable_repos_give_one_clear_error(hub, tmp_path, target, token, expected):
    env = _env(hub, tmp_path / "hf", **({"HF_TOKEN": token} if token else {}))
    run = _run(env, "merge", LLAMA, target, "-o", tmp_path / "out")
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
    if token:
        _assert_token_nowhere(token, run, tmp_path)


def test_private_repo_reads_with_a_token(hub, tmp_path):
    env = _env(hub, tmp_path / "hf", HF_TOKEN=TOKEN)
    out = tmp_path / "out"
    run = _run(env, "merge", "meta/llama-base", "someone/secret-lora", "-o", out)
    assert run.returncode == 0, run.stderr
    _assert_token_nowhere(TOKEN, run, tmp_path)


def _header_bytes(folder: Path) -> int:
    """What reading only the headers of a folder's safetensors files takes: 8 + header each."""
    return sum(8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in folder.glob("*.safetensors"))


def _blob_bytes(hub, folder: Path) -> int:
    """Bytes the server's LFS storage sent of a folder's safetensors files."""
    digests = (hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.safetensors"))
    return sum(hub.state.bytes_sent(f"/lfs-blobs/{d}") for d in digests)


def test_inspect_and_dry_run_read_only_headers(hub, tmp_path):
    env = _env(hub, tmp_path / "hf")
    weights = sum(p.stat().st_size for p in LLAMA.glob("*.safetensors"))
    hub.state.sent.clear()
    run = _run(env, "inspect", "meta/llama-base", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    local = json.loads(_run(env, "inspect", LLAMA, "--json").stdout)
    assert {k: report[k] for k in ("tensors", "parameters", "bytes", "dtypes")} == {
        k: local[k] for k in ("tensors", "parameters", "bytes", "dtypes")
    }
    assert _blob_bytes(hub, LLAMA) == _header_bytes(LLAMA) < weights / 10
    hub.state.sent.clear()
    run = _run(env, "merge", "meta/llama-base", "someone/llama-lora", "-o", tmp_path / "o",
               "--dry-run", "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    local = _run(env, "merge", LLAMA, ADAPTERS / "llama-lora", "-o", tmp_path / "o",
                 "--dry-run", "--json")  # fmt: skip
    assert json.loads(run.stdout)["plan"] == json.loads(local.stdout)["plan"]
    adapter = ADAPTERS / "llama-lora"
    # The base's weights never travel, only their headers; the adapter (small) does, whole.
    assert _blob_bytes(hub, LLAMA) == _header_bytes(LLAMA)
    assert _blob_bytes(hub, adapter) == (adapter / "adapter_model.safetensors").stat().st_size
    assert hub.state.bytes_sent() < 200_000


def test_offline_merges_from_the_cache_alone(hub, tmp_path):
    home = tmp_path / "hf"
    env = _env(hub, home)
    online = tmp_path / "online"
    run = _run(env, "merge", "meta/llama-base", "someone/llama-lora", "-o", online)
    assert run.returncode == 0, run.stderr
    assert _run(env, "merge", "meta/llama-base", "someone/llama-lora@b", "-o", tmp_path / "ob")
    # No server at all: an endpoint nothing listens on, and the offline switch.
    offline = _env(hub, home, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    for revision, expected in (("", online), ("@b", tmp_path / "ob")):
        out = tmp_path / f"offline{revision}"
        run = _run(offline, "merge", "meta/llama-base", f"someone/llama-lora{revision}", "-o", out)
        assert run.returncode == 0, run.stderr
        assert _weights(out) == _weights(expected)
    run = _run(offline, "merge", "meta/llama-base", "someone/other", "-o", tmp_path / "x")
    assert run.returncode == 2 and "not in the Hugging Face cache" in run.stderr


def test_push_then_download_is_byte_identical(hub, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download

    env = _env(hub, tmp_path / "hf", HF_TOKEN=TOKEN)
    out = tmp_path / "merged"
    run = _run(env, "merge", "meta/llama-base", "someone/llama-lora", "-o", out, "--verify")
    assert run.returncode == 0, run.stderr
    before = tree_hashes(out)
    hub.state.sent.clear()
    dry = _run(env, "push", out, "alice/merged", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "model.safetensors" in dry.stdout and "base_model:" in dry.stdout
    assert "alice/merged" not in hub.state.repos
    run = _run(env, "push", out, "alice/merged", "--private", "-m", "first")
    assert run.returncode == 0, run.stderr
    assert hub.state.repos["alice/merged"].private
    assert tree_hashes(out) == before  # the folder pushed is not touched
    pulled = Path(
        snapshot_download(
            "alice/merged", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "pull"
        )
    )
    got = tree_hashes(pulled)
    assert got.pop(".gitattributes")
    # The card and the record are completed for the repo; everything else travels unchanged.
    assert {k: v for k, v in got.items() if k not in ("README.md", "loramerge.json")} == {
        k: v for k, v in before.items() if k not in ("README.md", "loramerge.json")
    }
    verify = _run(env, "verify", pulled, "--files")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    card = ModelCard((pulled / "README.md").read_text(), ignore_metadata_errors=False)
    record = json.loads((pulled / "loramerge.json").read_text())
    assert card.data.base_model == "meta/llama-base"
    assert card.data.base_model_relation == "merge"
    assert card.data.license == "llama3.1"
    assert set(card.data.tags) >= {"lora", "merge", "loramerge"}
    assert record["adapters"][0]["source"] in card.text
    assert record["verification"]["verdict"] in card.text
    assert 'from_pretrained("alice/merged")' in card.text
    _assert_token_nowhere(TOKEN, run, tmp_path)


def test_push_to_branch_and_push_to_option(hub, tmp_path):
    env = _env(hub, tmp_path / "hf", HF_TOKEN=TOKEN)
    out = tmp_path / "merged"
    run = _run(env, "merge", LLAMA, ADAPTERS / "llama-lora", "-o", out, "--push-to",
               "alice/direct")  # fmt: skip
    assert run.returncode == 0, run.stderr
    repo = hub.state.repos["alice/direct"]
    main = repo.commits[repo.branches["main"]]
    assert main["model.safetensors"] == (out / "model.safetensors").read_bytes()
    run = _run(env, "push", out, "alice/direct", "--revision", "v2")
    assert run.returncode == 0, run.stderr
    assert repo.commits[repo.branches["v2"]]["config.json"] == (out / "config.json").read_bytes()


def test_push_refuses_a_corrupted_output(hub, tmp_path):
    env = _env(hub, tmp_path / "hf", HF_TOKEN=TOKEN)
    out = tmp_path / "merged"
    assert _run(env, "merge", LLAMA, ADAPTERS / "llama-lora", "-o", out).returncode == 0
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    hub.state.sent.clear()
    run = _run(env, "push", out, "alice/corrupt")
    assert run.returncode == 2
    assert "does not match its record, not pushed" in run.stderr and "model.safetensors" in (
        run.stderr
    )
    assert "alice/corrupt" not in hub.state.repos


def test_push_without_a_token_is_refused_without_leaking(hub, tmp_path):
    env = _env(hub, tmp_path / "hf", HF_TOKEN=BAD_TOKEN)
    out = tmp_path / "merged"
    assert _run(env, "merge", LLAMA, ADAPTERS / "llama-lora", "-o", out).returncode == 0
    run = _run(env, "push", out, "alice/nope")
    assert run.returncode == 2 and run.stderr.startswith("Error:"), run.stderr
    _assert_token_nowhere(BAD_TOKEN, run, tmp_path)


def _assert_token_nowhere(token: str, run: subprocess.CompletedProcess, root: Path) -> None:
    """The token is in no output and no file under `root` (outputs, cache, logs)."""
    assert token not in run.stdout and token not in run.stderr
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert token.encode() not in path.read_bytes(), path


def test_hub_guide_commands_run(hub, tmp_path):
    """Every `loramerge` line of docs/hub.md's bash blocks runs as written against the server."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "hub.md").read_text()
    lines = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", guide, re.DOTALL)
        for line in block.splitlines()
        if line.strip().startswith("loramerge ")
    ]
    assert len(lines) >= 8
    env = _env(hub, tmp_path / "hf", HF_TOKEN=TOKEN)
    for line in lines:
        run = _run(env, *shlex.split(line)[1:], cwd=tmp_path)
        assert run.returncode == 0, f"{line}\n{run.stderr}"
    assert hub.state.repos["alice/llama-merged"].private
    assert "experiment" in hub.state.repos["alice/llama-merged"].branches
    assert "alice/llama-merged-2" in hub.state.repos


def test_card_of_a_local_merge_parses_without_a_hub_base(cli, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    assert cli("merge", LLAMA, ADAPTERS / "llama-lora", "-w", "0.5", "-o", out).code == 0
    card = ModelCard((out / "README.md").read_text(), ignore_metadata_errors=False)
    meta = card.data.to_dict()
    assert meta["base_model"] == str(LLAMA) and "base_model_relation" not in meta
    assert meta["library_name"] == "transformers"
    command = f"loramerge merge {LLAMA} {ADAPTERS / 'llama-lora'} -w 0.5 -o OUTPUT"
    assert command in card.text


def test_push_dry_run_of_a_gguf_file_shows_its_card(cli, tmp_path):
    from huggingface_hub import ModelCard

    gguf = tmp_path / "model-q8_0.gguf"
    assert cli("quantize", LLAMA, "-o", gguf, "--to", "gguf", "--gguf-type", "q8_0", "-q").code == 0
    result = cli("push", gguf, "alice/model-gguf", "--dry-run", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    size = gguf.stat().st_size
    assert summary["files"] == {"model-q8_0.gguf": size, "README.md": summary["files"]["README.md"]}
    assert any("matches the blake3 digest" in note for note in summary["notes"])  # checked
    gguf.write_bytes(b"GGUF" + bytes(60))  # not a GGUF file at all: refused
    assert cli("push", gguf, "alice/model-gguf", "--dry-run").code == 2
    assert cli("quantize", LLAMA, "-o", gguf, "--to", "gguf", "--gguf-type", "q8_0", "-q",
               "--overwrite").code == 0  # fmt: skip
    result = cli("push", gguf, "alice/model-gguf", "--dry-run")
    card = ModelCard(result.out[result.out.index("---") :], ignore_metadata_errors=False)
    assert "llama-cli --hf-repo alice/model-gguf --hf-file model-q8_0.gguf" in card.text
    assert "ollama run hf.co/alice/model-gguf" in card.text


def test_card_of_a_quantized_hub_model_says_quantized(cli, tmp_path):
    """An NF4 `quantize` of a Hub base: relation `quantized`; with adapters it stays `merge`."""
    from huggingface_hub import ModelCard

    from loramerge.card import render_card

    out = tmp_path / "nf4"
    assert cli("quantize", LLAMA, "-o", out, "--to", "nf4").code == 0
    record = json.loads((out / "loramerge.json").read_text())
    record["base"]["source"] = "meta/llama-base@" + "a" * 40
    card = ModelCard(render_card(record, "alice/llama-nf4", for_hub=True))
    meta = card.data.to_dict()
    assert meta["base_model"] == "meta/llama-base" and meta["base_model_relation"] == "quantized"
    assert "nf4" in meta["tags"] and "merge" not in meta["tags"]
    record["adapters"] = [{"source": "x/y", "weight": 1.0, "rank": 8, "scale": 2.0, "sha256": "0"}]
    merged = ModelCard(render_card(record, "alice/llama-nf4", for_hub=True)).data.to_dict()
    assert merged["base_model_relation"] == "merge"


def test_quantize_push_to(hub, tmp_path):
    env = _env(hub, tmp_path / "hf", HF_TOKEN=TOKEN)
    out = tmp_path / "nf4"
    run = _run(env, "quantize", LLAMA, "-o", out, "--to", "nf4", "--push-to", "alice/nf4")
    assert run.returncode == 0, run.stderr
    repo = hub.state.repos["alice/nf4"]
    pushed = repo.commits[repo.branches["main"]]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert pushed[shard] == (out / shard).read_bytes()


def test_adapter_folders_push_with_an_adapter_card(cli, tmp_path):
    """combine / extract outputs are PEFT adapters: library peft, relation adapter."""
    from huggingface_hub import ModelCard

    from loramerge.card import render_adapter_card

    out = tmp_path / "combined"
    lora, lora_b = ADAPTERS / "llama-lora", ADAPTERS / "llama-lora-b"
    assert cli("combine", lora, lora_b, "-w", "1", "-w", "-0.5", "-o", out).code == 0
    run = cli("push", out, "alice/combined", "--dry-run")
    assert run.code == 0, run.err
    record = json.loads((out / "loramerge.json").read_text())
    record["base"]["source"] = "meta/llama-base@" + "b" * 40
    card = ModelCard(render_adapter_card(record, "alice/combined"), ignore_metadata_errors=False)
    meta = card.data.to_dict()
    assert meta["base_model_relation"] == "adapter" and meta["library_name"] == "peft"
    assert 'AutoPeftModelForCausalLM.from_pretrained("alice/combined")' in card.text
