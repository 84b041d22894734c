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


# Prints, at exit, which of the heavy libraries the command loaded.
LOADED_PROBE = ("import atexit, sys; atexit.register(lambda: print('LOADED', *[m for m in "
                "('tensorflow', 'keras', 'mlflow') if m in sys.modules], file=sys.stderr))")


def command_loading(module: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str],
                                                                   list[str]]:
    """`python -m experiments.<module> ARGS`, and the heavy libraries it loaded."""
    code = (f"{LOADED_PROBE}; import runpy, sys; sys.argv = ['{module}', *{list(args)!r}]; "
            f"runpy.run_module('experiments.{module}', run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    loaded = [line.split()[1:] for line in result.stderr.splitlines()
              if line.startswith("LOADED")]
    assert loaded, result.stderr[-3000:]
    return result, loaded[-1]


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
    """The quickstart's whole output (a shrunk run): no line of TensorFlow's native logging,
    though TensorFlow is first imported after the config has composed (by whichever module
    needs it first), not when the package is."""
    result, loaded = command_loading(
        "run", "experiment=quickstart", "trainer.epochs=1", "data.image_size=32",
        "data.images_per_class=10", "eval.gradcam_images=0", "eval.bootstrap_resamples=100",
        f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert loaded == ["tensorflow", "keras", "mlflow"]
    screen = result.stdout + result.stderr
    assert not [line for line in screen.splitlines()
                if any(mark in line for mark in NATIVE_LOG_MARKS)], screen[-3000:]
    assert "Run " in result.stdout and "test_accuracy" in result.stdout


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "== Configuration groups =="),
    (["experiment=transfer_multisource", "--cfg", "job"], 0, "cascade: true"),
    (["data.roott=/x"], 1, "Could not override 'data.roott'"),
    ([], 2, "`data.root` must be set"),
    (["data.root=/no/such/folder"], 2, "Data folder does not exist: /no/such/folder (set "
                                       "data.root)"),
    (["data=demo", "backbone.weights=/no/such.h5"], 2, "backbone.weights file not found"),
])
def test_the_run_command_answers_without_loading_tensorflow(args, code, says, tmp_path):
    """Hydra's help and composed config, an override that names no key, a required key left
    unset and a folder or weights file that is not there answer in about a second:
    TensorFlow, Keras and MLflow (5-6 s to import) load only once the config has composed,
    validated and named only locations that exist (benchmarks/startup.py)."""
    result, loaded = command_loading("run", f"paths.root={tmp_path}", *args, cwd=tmp_path)
    assert result.returncode == code, result.stderr[-3000:]
    assert says in result.stdout + result.stderr
    assert loaded == [], loaded


def test_help_of_the_key_value_commands(tmp_path, capsys):
    """`--help` prints the usage and succeeds (it was refused as an unknown argument): predict
    as a user runs it, adapt and scale (the same key=value parser) in this process."""
    from experiments import adapt, scale

    result = command("predict", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "python -m experiments.predict model=" in result.stdout
    for module in (adapt, scale):
        with pytest.raises(SystemExit) as stopped:
            module.parse_args(["-h"])
        assert stopped.value.code == 0
        assert f"python -m experiments.{module.__name__.split('.')[-1]}" in capsys.readouterr().out
