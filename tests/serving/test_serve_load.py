"""The load benchmark's short mode, as CI runs it: a tiny model served on loopback, 40
requests from 2 clients, every one answered."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow  # ~30 s: trains a tiny model, starts a server
def test_serve_load_short_mode_answers_every_request(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "serve_load.py"),
                             "--short"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| single |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["single", "1", "2", "40", "1"] and cells[10] == "0"  # 0 failed
    assert float(cells[5]) > 0 and float(cells[7]) <= float(cells[8]) <= float(cells[9])
    assert "CPU:" in result.stdout
