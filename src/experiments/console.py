"""What a user sees in the terminal: our lines, not the libraries' start-up noise.

TensorFlow's native code logs while it loads, before its log settings are read (the
"All log messages before absl::InitializeLog()" block: oneDNN notes, "Could not find cuda
drivers", CPU-instruction hints, and on machines with a CUDA library but no GPU an `E0000 ...
failed call to cuInit` "error" where nothing is wrong). No environment variable reaches those
lines, so TensorFlow's first import - whichever module asks for it, Keras included - runs with
the process's stderr pointed at a temporary file (a finder on `sys.meta_path`, installed here);
what it wrote is shown only if the import fails. TensorFlow is not imported here: a command
that fails on its arguments, Hydra's `--help` and `--cfg`, answer without the ~5 s it takes.
Later native logs are limited to fatal ones (`TF_CPP_MIN_LOG_LEVEL=3`), MLflow logs warnings
and errors only (`MLFLOW_LOGGING_LEVEL`) and its download progress bars are off. Each is a
default: a variable already set wins.

`EXPERIMENTS_TF_LOGS=1` leaves all of this as TensorFlow and MLflow have it. Our own diagnostics
go through `logging` (Hydra's job logging in `experiments.run`, `configure_logging` in the other
commands); `print` is kept for the summaries a user reads and for error messages.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile
import types
from collections.abc import Callable, Sequence

TF_LOGS_ENV = "EXPERIMENTS_TF_LOGS"


def quiet_start() -> None:
    """Set the libraries' log levels, and have TensorFlow's first import made silently (at
    once if it is imported already); nothing when TF_LOGS_ENV is set."""
    if os.environ.get(TF_LOGS_ENV, "") not in ("", "0"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if "tensorflow" in sys.modules:
        quiet_tensorflow_loggers()
    elif not any(isinstance(finder, SilentTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SilentTensorFlowFinder())


def quiet_tensorflow_loggers() -> None:
    """TensorFlow's Python-side logs: errors only."""
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    # tf.function retracing notes and the like: performance hints no user of ours can act on
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


class SilentTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` the usual way, once, with a loader that runs the package's import
    with file descriptor 2 redirected; every other name is left to the other finders."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the usual finders locate it, and later imports
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None  # not installed: the usual ModuleNotFoundError
        spec.loader = SilentLoader(spec.loader)
        return spec


class SilentLoader(importlib.abc.Loader):
    """`loader`, its module executed by `run_with_stderr_captured`; the module keeps `loader`
    as its own once loaded."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        run_with_stderr_captured(lambda: self.loader.exec_module(module))
        quiet_tensorflow_loggers()


def run_with_stderr_captured(step: Callable[[], object]) -> None:
    """`step()` with file descriptor 2 redirected to a temporary file, replayed if it raises."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to keep quiet
        step()
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            step()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def configure_logging(level: int = logging.INFO) -> None:
    """Our loggers' messages on stderr, one plain line each (commands that Hydra does not
    start)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("experiments")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
