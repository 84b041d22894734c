"""The package's shape: one-way layers, every package shipped, rooms of a readable size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import experiments
from experiments.config.choices import BACKBONE_NAMES
from experiments.models import external
from experiments.models.backbones import BACKBONES
from tests.conftest import REPO_ROOT

PACKAGE = Path(experiments.__file__).parent
MAX_LINES = 300


def test_layers_import_only_downwards():
    """import-linter's layers contract in pyproject.toml: entry points -> orchestration ->
    training -> tracking -> evaluation -> serving -> models -> data -> config."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--config", str(REPO_ROOT / "pyproject.toml")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_every_package_and_config_folder_is_shipped():
    """pyproject lists packages one by one (conf/ is mapped into the package): a new room or
    config group that is not listed would be missing from wheels."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    code = {".".join(("experiments", *p.parent.relative_to(PACKAGE).parts))
            for p in PACKAGE.rglob("__init__.py")}
    conf = REPO_ROOT / "conf"
    groups = {".".join(("experiments.conf", *d.relative_to(conf).parts))
              for d in conf.rglob("*") if d.is_dir() and d.name != "__pycache__"}
    assert listed == code | groups | {"experiments.conf"}


def test_no_module_is_a_warehouse():
    """A module over ~300 lines is asking to be split by responsibility."""
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_backbone_choices_are_the_registry():
    assert set(BACKBONE_NAMES) == set(BACKBONES) | set(external.KINDS)
