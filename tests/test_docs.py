"""Every `loramerge` command in docs/*.md runs as written against the fixtures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT

BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)
GUIDES = sorted((ROOT / "docs").glob("*.md"))


def commands(guide: Path) -> list[str]:
    """The shell lines of a guide's sh blocks that call loramerge (continuations joined)."""
    lines = []
    for block in BLOCK.findall(guide.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("loramerge "):
                lines.append(line.strip())
    return lines


@pytest.mark.parametrize("guide", [g for g in GUIDES if commands(g)], ids=lambda g: g.name)
def test_guide_commands_run(guide, tmp_path):
    (tmp_path / "fixtures").symlink_to(FIXTURES)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in commands(guide):
        result = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{guide.name}: {line}\n{result.stderr}"
        assert "Traceback" not in result.stderr, line
