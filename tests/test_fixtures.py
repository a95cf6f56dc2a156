"""The committed fixtures are exactly what fixtures/make_fixtures.py writes (real PEFT output)."""

from __future__ import annotations

import subprocess
import sys

from conftest import FIXTURES, tree_hashes


def test_generator_reproduces_the_committed_fixtures(tmp_path):
    subprocess.run(
        [sys.executable, str(FIXTURES / "make_fixtures.py"), str(tmp_path), "--skip-verify"],
        check=True,
        capture_output=True,
    )
    for folder in ("llama-base", "gpt2-base", "adapters"):
        assert tree_hashes(tmp_path / folder) == tree_hashes(FIXTURES / folder), folder
