"""Shared test setup: fixture paths, an in-process CLI runner, and the inputs-unchanged guard."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
LLAMA = FIXTURES / "llama-base"
GPT2 = FIXTURES / "gpt2-base"
ADAPTERS = FIXTURES / "adapters"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# the compiled check's kernels go to a fresh cache each session (the CLI's subprocesses share
# it): every run compiles them with numba once and loads them from the cache after
if "LORAMERGE_KERNEL_CACHE" not in os.environ:
    os.environ["LORAMERGE_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="loramerge-kernels-")
    atexit.register(shutil.rmtree, os.environ["LORAMERGE_KERNEL_CACHE"], ignore_errors=True)


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def fixture_hashes() -> dict[str, str]:
    """sha256 of every committed fixture file, taken once before the first test."""
    return tree_hashes(FIXTURES)


@pytest.fixture(autouse=True)
def inputs_unchanged(fixture_hashes):
    """After every test, every input fixture file still has its original sha256."""
    yield
    assert tree_hashes(FIXTURES) == fixture_hashes, "a test modified an input fixture"


class CliResult:
    """Exit code and captured output of one CLI run."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capfd):
    """Run `loramerge ARGS...` in process through the real entry point; return a CliResult."""
    from loramerge.cli import main

    def run(*args) -> CliResult:
        argv = sys.argv
        sys.argv = ["loramerge", *map(str, args)]
        capfd.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = argv
        out, err = capfd.readouterr()
        return CliResult(code, out, err)

    return run
