"""Every command a user types: a mistake the user can fix is one line on stderr and exit code
2, never a traceback; the first screen holds our lines, not TensorFlow's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

NATIVE_LOG_MARKS = ("absl::InitializeLog", "I0000 ", "W0000 ", "E0000 ", "cuInit", "oneDNN",
                    "cuda drivers", "cpu_feature_guard")


def command(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m experiments.<module> ARGS` as a user runs it (no log settings of ours)."""
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module, args", [
    ("run", ["data.root=/no/such/folder"]),
    ("run", ["data=demo", "backbone.name=no_such_backbone"]),
    # ("run", []) - data.root unset - is e2e/test_reliability.py's, which checks what it says
    ("predict", ["model=/no/such/model.keras", "input=."]),
    ("compare", ["--experiment", "no-such-experiment"]),
    ("compare", ["--experiment", "e", "--filter", "this is not a filter"]),
    ("ensemble", ["--parent", "0123456789abcdef0123456789abcdef"]),
    ("cascade", ["--first", "0123456789abcdef0123456789abcdef", "--fallback", "x"]),
    ("adapt", ["model=/no/such/model.keras", "input=."]),
    ("predict", ["model=/no/such/model.keras", "input=.", "mpp=0"]),
    ("scale", ["input=/no/such/folder", "reference=."]),
])
def test_a_user_error_is_one_line_and_exit_code_2(module, args, tmp_path):
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    if module == "compare" and "--filter" in args:  # an experiment to search
        subprocess.run([sys.executable, "-c", "import mlflow; mlflow.set_tracking_uri("
                        f"{store!r}); mlflow.create_experiment('e')"], check=True, timeout=120)
    extra = {"run": [f"paths.root={tmp_path}"], "predict": [f"tracking_uri={store}"],
             "compare": ["--tracking-uri", store], "ensemble": ["--tracking-uri", store],
             "cascade": ["--tracking-uri", store], "adapt": [f"tracking_uri={store}"],
             "scale": []}
    result = command(module, *args, *extra[module], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr[-3000:]


def test_first_screen_has_no_tensorflow_log_lines(tmp_path):
    """The quickstart's whole output (a shrunk run): no line of TensorFlow's native logging."""
    result = command("run", "experiment=quickstart", "trainer.epochs=1", "data.image_size=32",
                     "data.images_per_class=10", "eval.gradcam_images=0",
                     "eval.bootstrap_resamples=100", f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    screen = result.stdout + result.stderr
    assert not [line for line in screen.splitlines()
                if any(mark in line for mark in NATIVE_LOG_MARKS)], screen[-3000:]
    assert "Run " in result.stdout and "test_accuracy" in result.stdout
