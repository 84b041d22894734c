"""What a user sees in the terminal: our lines, not the libraries' start-up noise.

TensorFlow's native code logs while it loads, before its log settings are read (the
"All log messages before absl::InitializeLog()" block: oneDNN notes, "Could not find cuda
drivers", CPU-instruction hints, and on machines with a CUDA library but no GPU an `E0000 ...
failed call to cuInit` "error" where nothing is wrong). No environment variable reaches those
lines, so TensorFlow is imported once here with the process's stderr pointed at a temporary
file; what it wrote is shown only if the import fails. Later native logs are limited to fatal
ones (`TF_CPP_MIN_LOG_LEVEL=3`), MLflow logs warnings and errors only (`MLFLOW_LOGGING_LEVEL`)
and its download progress bars are off. Each is a default: a variable already set wins.

`EXPERIMENTS_TF_LOGS=1` leaves all of this as TensorFlow and MLflow have it. Our own diagnostics
go through `logging` (Hydra's job logging in `experiments.run`, `configure_logging` in the other
commands); `print` is kept for the summaries a user reads and for error messages.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

TF_LOGS_ENV = "EXPERIMENTS_TF_LOGS"


def quiet_start() -> None:
    """Set the libraries' log levels and import TensorFlow without its start-up lines (unless
    it is imported already); nothing when TF_LOGS_ENV is set."""
    if os.environ.get(TF_LOGS_ENV, "") not in ("", "0"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    if "tensorflow" not in sys.modules:
        _import_tensorflow_silently()
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # tf.function retracing notes and the like: performance hints no user of ours can act on
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _import_tensorflow_silently() -> None:
    """`import tensorflow` with file descriptor 2 redirected; replayed on failure."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to keep quiet
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
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
