"""Nothing lost under crashes, full disks and concurrent runs.

Crashes are real: a merge runs in a child process that SIGKILLs itself at a chosen point (after
the n-th tensor, while closing shards, while writing the record, between the renames of an
--overwrite). Afterwards OUT is absent or complete and verifiable, and a rerun succeeds.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import blake3
import pytest
import torch
from conftest import ADAPTERS, LLAMA, tree_hashes
from safetensors.torch import load_file, save_file

ADAPTER = ADAPTERS / "llama-lora"
# Runs the real CLI after arranging for SIGKILL, or a hold, at one point of the write. A held
# child writes "held" to the file descriptor HELD_FD and waits there until its SIGINT handler has
# run, so a test can act while the child is known to be mid-write, however slow the machine.
HARNESS = textwrap.dedent(
    """
    import importlib, itertools, os, signal, sys, threading
    from loramerge.sink import sharded
    merge_module = importlib.import_module("loramerge.merge")
    point, n = sys.argv[1], int(sys.argv[2])
    calls = itertools.count(1)  # next() is atomic: worker threads race here
    interrupted = threading.Event()

    def on_sigint(signum, frame):
        interrupted.set()
        signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without the harness

    def hit():
        seen = next(calls)
        if seen == n and point.startswith("hold"):
            os.write(int(os.environ["HELD_FD"]), b"held\\n")
            interrupted.wait()
        elif seen == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def after(owner, name):
        original = getattr(owner, name)
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            hit()
            return result
        setattr(owner, name, wrapped)

    def on_sigterm(signum, frame):
        interrupted.set()
        loramerge_cli.terminate(signum, frame)  # the handler the command installs itself

    from loramerge import cli as loramerge_cli
    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    if point in ("tensor", "hold-tensor"):
        after(sharded.ShardedWriter, "write")
        after(sharded.ShardedWriter, "copy")
    elif point == "finish":
        after(sharded.SafetensorsWriter, "finish")
    elif point == "record":
        after(merge_module, "write_provenance")
    elif point == "rename":
        after(os, "rename")
    sys.argv = ["loramerge", *sys.argv[3:]]
    from loramerge.cli import main
    main()
    """
)


def _child(tmp_path, point: str, n: int, *args, **popen) -> subprocess.Popen:
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    cmd = [sys.executable, str(script), point, str(n), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _held_child(tmp_path, *args) -> subprocess.Popen:
    """A merge child held after writing its first tensor; returns once it says it is there."""
    held, tell = os.pipe()
    env = {**os.environ, "HELD_FD": str(tell)}
    child = _child(tmp_path, "hold-tensor", 1, *args, pass_fds=(tell,), env=env)
    os.close(tell)
    with os.fdopen(held, "rb") as pipe:
        said = pipe.readline()  # blocks until the child is held, or b"" if it exited instead
    if said != b"held\n":
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"the child never reached the hold: {err.decode()}")
    return child


def _merge_args(out, *extra):
    return ["merge", LLAMA, ADAPTER, "-o", out, "--max-shard-size", "60KB", *extra]


def _complete(cli, out) -> bool:
    """OUT is a finished merge: files match the record and weights match base + adapter."""
    files = cli("verify", out, "--files")
    weights = cli("verify", out, "--base", LLAMA, "--adapter", ADAPTER, "-q")
    return files.code == 0 and weights.code == 0


@pytest.mark.parametrize(
    "point, n",
    [
        ("tensor", 1),
        ("tensor", 5),
        ("tensor", 14),
        ("tensor", 21),
        ("finish", 1),
        ("finish", 3),
        ("record", 1),
        ("rename", 1),
        ("rename", 2),
    ],
)
def test_sigkill_leaves_nothing_or_everything(cli, tmp_path, point, n):
    out = tmp_path / "out"
    if point == "rename":
        assert cli(*_merge_args(out)).code == 0  # an older OUT that --overwrite replaces
        old = tree_hashes(out)
    child = _child(tmp_path, point, n, *_merge_args(out, "--overwrite"))
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    if out.exists():
        assert _complete(cli, out) or (point == "rename" and tree_hashes(out) == old)
    rerun = cli(*_merge_args(out, "--overwrite"))
    assert rerun.code == 0, rerun.err
    assert _complete(cli, out)
    assert [p.name for p in tmp_path.iterdir() if ".loramerge-" in p.name] == []


def test_killed_overwrite_between_renames_restores_the_old_output(cli, tmp_path):
    out = tmp_path / "out"
    assert cli(*_merge_args(out)).code == 0
    old = tree_hashes(out)
    child = _child(tmp_path, "rename", 1, *_merge_args(out, "--overwrite"))
    child.wait(timeout=120)
    assert not out.exists()  # killed after moving the old OUT aside
    result = cli("merge", LLAMA, ADAPTERS / "llama-rslora", "-o", out)
    assert result.code == 2 and "already exists" in result.err  # the old one is back
    assert tree_hashes(out) == old


def test_second_run_on_the_same_output_fails_clearly(cli, tmp_path):
    out = tmp_path / "out"
    first = _held_child(tmp_path, *_merge_args(out))  # holds the lock while held
    second = cli(*_merge_args(out))
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert second.code == 2 and "another loramerge run is writing" in second.err
    assert not out.exists()
    assert cli(*_merge_args(out)).code == 0 and _complete(cli, out)


@pytest.mark.parametrize(
    ("sent", "status", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_ctrl_c_or_sigterm_removes_the_temporary(tmp_path, sent, status, said):
    out = tmp_path / "out"
    child = _held_child(tmp_path, *_merge_args(out))
    assert list(tmp_path.glob(".out.loramerge-tmp-*"))  # mid-write: the temporary is there
    child.send_signal(sent)  # the child stays held until its handler has run
    _, err = child.communicate(timeout=120)
    assert child.returncode == status, err.decode()
    assert err.decode().strip().endswith(f"Error: {said}")
    assert not out.exists() and not list(tmp_path.glob(".out.loramerge-*"))


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("out", ["merge", LLAMA, ADAPTER]),
        ("out.gguf", ["quantize", LLAMA, "--to", "gguf", "--gguf-type", "f32"]),
        ("out.gguf", ["export-adapter", ADAPTER, "--base", LLAMA]),
    ],
)
def test_file_size_limit_mid_write(tmp_path, name, command):
    """RLIMIT_FSIZE (EFBIG) mid-write, a safetensors shard, a GGUF model or a GGUF adapter:
    one clear error naming the file, nothing left behind."""
    out = tmp_path / name
    before = tree_hashes(LLAMA.parent)

    def limit():
        limit = 100_000 if name == "out" else 20_000
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "loramerge", *command, "-o", out, "-q"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"Error: cannot write {tmp_path}/.{name}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(f".{name}.loramerge-*"))
    assert tree_hashes(LLAMA.parent) == before


@pytest.mark.parametrize(
    "code, words",
    [(errno.ENOSPC, "No space left on device"), (errno.EIO, "Input/output error")],
)
def test_write_errors_mid_write(cli, tmp_path, monkeypatch, code, words):
    from loramerge.sink import safetensors_writer

    calls = [0]
    real = os.pwrite

    def failing(fd, data, offset):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(code, os.strerror(code))
        return real(fd, data, offset)

    monkeypatch.setattr(safetensors_writer.os, "pwrite", failing)
    out = tmp_path / "out"
    result = cli("merge", LLAMA, ADAPTER, "-o", out)
    assert result.code == 2 and words in result.err and "model.safetensors" in result.err
    assert result.err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out.loramerge-*"))


def test_read_only_target(cli, tmp_path, monkeypatch):
    target = tmp_path / "ro"
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(target)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    target.mkdir()
    monkeypatch.setattr(os, "open", read_only)
    result = cli("merge", LLAMA, ADAPTER, "-o", target / "out")
    assert result.code == 2 and "Read-only file system" in result.err
    assert list(target.iterdir()) == []


def test_free_space_is_checked_up_front(cli, tmp_path, monkeypatch):
    merge_module = importlib.import_module("loramerge.merge")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(merge_module.shutil, "disk_usage", lambda _: usage._replace(free=100_000))
    result = cli("merge", LLAMA, ADAPTER, "-o", tmp_path / "out")
    assert result.code == 2 and re.search(r"needs [\d.]+ MB but only 100 kB are free", result.err)
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_adapter_is_refused_unless_allowed(cli, tmp_path):
    adapter = tmp_path / "nan-adapter"
    shutil.copytree(ADAPTER, adapter)
    state = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    result = cli("merge", LLAMA, adapter, "-o", tmp_path / "out")
    assert result.code == 2 and "--allow-nonfinite" in result.err and key in result.err
    assert not (tmp_path / "out").exists()
    allowed = cli("merge", LLAMA, adapter, "-o", tmp_path / "out", "--allow-nonfinite")
    assert allowed.code == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert any(torch.isnan(t).any() for t in merged.values())


@pytest.mark.parametrize("pattern", ["(a+)+", "(q|q)*_proj", "(x{1,3})+y"])
def test_backtracking_patterns_are_refused(cli, tmp_path, pattern):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {pattern: 8}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = cli("merge", LLAMA, adapter, "-o", tmp_path / "out")
    assert result.code == 2 and "nests quantifiers" in result.err


def test_integrity_record_and_check(cli, tmp_path):
    out = tmp_path / "out"
    assert cli(*_merge_args(out)).code == 0
    record = json.loads((out / "loramerge.json").read_text())
    on_disk = {p.name for p in out.iterdir()} - {"loramerge.json"}
    assert set(record["files"]) == on_disk
    assert cli("verify", out, "--files").code == 0
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    broken = cli("verify", out, "--files")
    assert broken.code == 1 and shard.name in broken.out


def test_the_record_hashes_files_with_blake3(cli, tmp_path):
    """Every file's digest is the blake3 package's, and that package is BLAKE3 (the
    specification's test vectors)."""
    assert blake3.blake3(b"").hexdigest().startswith("af1349b9f5f9a1a6a0404dea36dcc949")
    assert blake3.blake3(b"abc").hexdigest().startswith("6437b3ac38465133ffb63b75273a8db5")
    out = tmp_path / "out"
    assert cli(*_merge_args(out)).code == 0
    record = json.loads((out / "loramerge.json").read_text())
    assert record["files_hash"] == "blake3"
    assert record["files"] == {
        name: blake3.blake3((out / name).read_bytes()).hexdigest() for name in record["files"]
    }


def test_records_written_with_sha256_still_check(cli, tmp_path):
    """A record from before BLAKE3 (sha256 digests, no `files_hash`) is checked with sha256; a
    hash this version does not know is refused."""
    out = tmp_path / "out"
    assert cli(*_merge_args(out)).code == 0
    path = out / "loramerge.json"
    record = json.loads(path.read_text())
    del record["files_hash"]
    record["files"] = {name: tree_hashes(out)[name] for name in record["files"]}  # sha256
    path.write_text(json.dumps(record, indent=2))
    passed = cli("verify", out, "--files")
    assert passed.code == 0 and "match their recorded sha256" in passed.out
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    changed = cli("verify", out, "--files")
    assert changed.code == 1 and "changed: config.json" in changed.out
    path.write_text(json.dumps({**record, "files_hash": "md5"}))
    unknown = cli("verify", out, "--files")
    assert unknown.code == 2 and unknown.err.startswith("Error: unknown file hash 'md5'")


def test_the_command_line_takes_sigterm_as_ctrl_c():
    """`main` installs `terminate` for SIGTERM (the test above sends it through the harness)."""
    probe = textwrap.dedent(
        """
        import signal, sys
        from loramerge import cli
        sys.argv = ["loramerge", "--version"]
        try:
            cli.main()
        except SystemExit:
            pass
        print(signal.getsignal(signal.SIGTERM) is cli.terminate)
        """
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.split()[-1] == "True", result.stderr
