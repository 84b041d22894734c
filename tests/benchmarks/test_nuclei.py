"""benchmarks/nuclei.py, which README sends users to for checking a folder's mpp: on images of
purple discs of a known size on pink, it measures that size, and it recovers by how much a
copy of the folder was shrunk."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw

from tests.conftest import REPO_ROOT


def disc_folder(root, diameter: int, size: int = 240, seed: int = 0) -> None:
    """Two classes of three H&E-coloured images each, every one with non-overlapping discs of
    `diameter` px (nuclei) on an eosin-pink background."""
    rng = np.random.default_rng(seed)
    for name in ("benign", "malignant"):
        (root / name).mkdir(parents=True)
        for index in range(3):
            image = Image.new("RGB", (size, size), (235, 190, 215))
            draw = ImageDraw.Draw(image)
            step = 2 * diameter
            for top in range(diameter // 2, size - step, step):
                for left in range(diameter // 2, size - step, step):
                    dy, dx = rng.integers(0, diameter // 2, 2)
                    draw.ellipse((left + dx, top + dy, left + dx + diameter - 1,
                                  top + dy + diameter - 1), fill=(70, 40, 130))
            image.save(root / name / f"{index}.png")


def shrunk(source, target, factor: float) -> None:
    for path in source.rglob("*.png"):
        (target / path.parent.name).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.resize((round(image.width * factor), round(image.height * factor)),
                         Image.Resampling.LANCZOS).save(target / path.parent.name / path.name)


def table(stdout: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_nuclei_measures_disc_size_and_recovers_a_shrunk_copys_scale(tmp_path):
    disc_folder(tmp_path / "reference", diameter=16)
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
