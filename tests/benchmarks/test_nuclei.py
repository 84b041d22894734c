"""benchmarks/nuclei.py: on images of purple discs of a known size on pink (the images
tests/data/test_nuclei.py draws), it measures that size, and it recovers by how much a copy of
the folder was shrunk."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.data.test_nuclei import disc_folder, shrunk


def table(stdout: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_nuclei_measures_disc_size_and_recovers_a_shrunk_copys_scale(tmp_path):
    disc_folder(tmp_path / "reference", 16)
    shrunk(tmp_path / "reference", tmp_path / "smaller", 0.6)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "nuclei.py"),
                             str(tmp_path / "reference"), str(tmp_path / "smaller"),
                             "--reference"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in table(result.stdout, "reference"):  # per class: 3 images, discs of 16 px
        assert row[2] == "3"
        assert abs(float(row[4].split()[0]) - 16) <= 1.0, row
    (scale,) = [row for row in table(result.stdout, "smaller") if len(row) == 4]
    assert abs(float(scale[3]) - 1 / 0.6) <= 0.12, scale  # its mpp / the reference's
