"""The quiet start: TensorFlow's native start-up lines are held back, and shown when its import
fails (they are then the only clue)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from experiments.console import SilentTensorFlowFinder, run_with_stderr_captured


def write_to_fd2(text: str) -> None:
    os.write(2, text.encode())  # as native code writes: below sys.stderr


def test_what_a_step_writes_to_fd2_is_dropped_when_it_succeeds(capfd):
    run_with_stderr_captured(lambda: write_to_fd2("I0000 oneDNN custom operations are on\n"))
    write_to_fd2("after\n")
    assert capfd.readouterr().err == "after\n"


def test_what_a_step_wrote_is_replayed_when_it_fails(capfd):
    def fails() -> None:
        write_to_fd2("E0000 libcudart.so: cannot open shared object file\n")
        raise ImportError("no module named _pywrap_tensorflow_internal")

    with pytest.raises(ImportError, match="_pywrap"):
        run_with_stderr_captured(fails)
    assert capfd.readouterr().err == "E0000 libcudart.so: cannot open shared object file\n"


def test_the_finder_hands_tensorflow_to_the_usual_finders_once():
    """In a fresh process: importing the package leaves TensorFlow unloaded with the finder
    waiting; the first import of it (through Keras) removes the finder and leaves the module
    with its own loader, and nothing of its start-up on stderr."""
    code = ("import sys, experiments; from experiments.console import SilentTensorFlowFinder; "
            "waiting = [f for f in sys.meta_path if isinstance(f, SilentTensorFlowFinder)]; "
            "assert 'tensorflow' not in sys.modules and len(waiting) == 1, waiting; "
            "import keras, tensorflow; "
            "assert not [f for f in sys.meta_path if isinstance(f, SilentTensorFlowFinder)]; "
            "assert type(tensorflow.__loader__).__name__ == 'SourceFileLoader', "
            "tensorflow.__loader__; print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("EXPERIMENTS_TF_LOGS",
                                                           "TF_CPP_MIN_LOG_LEVEL")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-3000:]
    assert result.stderr == "", result.stderr[-3000:]


def test_other_names_are_left_to_the_other_finders():
    assert SilentTensorFlowFinder().find_spec("numpy", None) is None
