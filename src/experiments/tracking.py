"""Everything MLflow: store setup, the run's lifecycle, params, per-epoch metrics, artifacts.

Runs are opened with `with`, so a job that raises ends its run as FAILED (with the error
recorded) and never leaves an active run behind for the next job of a multirun.
"""

from __future__ import annotations

import re
import subprocess
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import mlflow

LOCAL_SCHEMES = ("sqlite:", "file:", "postgresql", "mysql", "mssql")


def is_local_store(tracking_uri: str) -> bool:
    """True for stores this process writes itself (artifacts go to a local folder)."""
    return tracking_uri.startswith(LOCAL_SCHEMES) or "://" not in tracking_uri


def ensure_experiment(tracking_uri: str, experiment_name: str, artifact_root: str) -> str:
    """Point MLflow at the store and return the experiment id, creating it if needed.

    In a local store a new experiment gets an absolute artifact folder under `artifact_root`
    (MLflow's default is relative to the current directory, which scatters artifacts).
    """
    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if is_local_store(tracking_uri):
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment_name)
        location = str(Path(artifact_root).expanduser().resolve() / folder)
    return mlflow.create_experiment(experiment_name, artifact_location=location)


@contextmanager
def open_run(experiment_id: str, run_name: str | None,
             tags: Mapping[str, str]) -> Iterator[str]:
    """A run that ends FINISHED, or FAILED with the error as a tag and an artifact."""
    active = mlflow.active_run()
    if active is not None:
        raise RuntimeError(f"MLflow run {active.info.run_id} is still active; refusing to nest")
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags)) as run:
        try:
            yield run.info.run_id
        except BaseException as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            mlflow.log_text("".join(traceback.format_exception(error)), "error.txt")
            raise


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None become strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_params(params: Mapping[str, Any]) -> None:
    mlflow.log_params(dict(params))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(dict(tags))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


def git_commit(folder: str | Path) -> str | None:
    """The commit of the git checkout holding `folder` (suffix -dirty), or None if not one."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              check=False)
    try:
        head = git("rev-parse", "HEAD")
    except FileNotFoundError:  # git itself is not installed
        return None
    if head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if is_local_store(tracking_uri):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {tracking_uri} in a browser"


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs `loss`, `accuracy`, `val_loss`, `val_accuracy`, `lr` and `epoch_seconds` per epoch.

    Steps are 1-based epoch numbers; `lr` is the rate in force during the epoch (read before
    ReduceLROnPlateau may lower it at the epoch's end).
    """

    METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")

    def __init__(self) -> None:
        super().__init__()
        self._lr = float("nan")
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        metrics = {name: logs[name] for name in self.METRICS if name in logs}
        metrics["lr"] = self._lr
        metrics["epoch_seconds"] = time.perf_counter() - self._started
        log_metrics(metrics, step=epoch + 1)
