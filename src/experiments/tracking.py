"""Everything MLflow: store setup, the run's lifecycle, params, per-epoch metrics, artifacts.

Runs are opened with `with`, so a job that raises ends its run as FAILED (with the error
recorded) and never leaves an active run behind for the next job of a multirun.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema

from experiments.errors import RunStateError, ServerError
from experiments.inference import MODEL_FILE, MODEL_INFO

LOCAL_SCHEMES = ("sqlite:", "file:", "postgresql", "mysql", "mssql")


def default_store_uri(root: str | Path | None = None) -> str:
    """The SQLite store the runs launched from `root` (default: here) write to."""
    return f"sqlite:///{Path(root or Path.cwd()).resolve() / 'mlruns' / 'mlflow.db'}"


def is_local_store(tracking_uri: str) -> bool:
    """True for stores this process writes itself (artifacts go to a local folder)."""
    return tracking_uri.startswith(LOCAL_SCHEMES) or "://" not in tracking_uri


def check_server(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an HTTP tracking server does not answer (MLflow itself would retry for
    minutes, or worse, only after training)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise ServerError(
        f"MLflow tracking server {tracking_uri} did not answer ({url}: {problem}). Start it "
        "(e.g. `mlflow server --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db --host "
        "127.0.0.1 --port 5000`) or use the local store by leaving mlflow.tracking_uri at its "
        "default.")


# Tells the MLflow 3 UI that the experiment trains models (its model-training view, not the
# GenAI view with traces and evaluation runs).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def use_store(tracking_uri: str) -> None:
    """Log to (and read from) the store at `tracking_uri` from now on."""
    mlflow.set_tracking_uri(tracking_uri)


def ensure_experiment(tracking_uri: str, experiment_name: str, artifact_root: str) -> str:
    """Point MLflow at the store and return the experiment id, creating it if needed.

    In a local store a new experiment gets an absolute artifact folder under `artifact_root`
    (MLflow's default is relative to the current directory, which scatters artifacts). Every
    experiment is tagged as model training for the UI, unless it already says what it is.
    """
    mlflow.set_tracking_uri(tracking_uri)
    with _store_setup_lock(tracking_uri):
        experiment = mlflow.get_experiment_by_name(experiment_name)
        if experiment is not None:
            if not EXPERIMENT_KIND.keys() & experiment.tags.keys():
                MlflowClient().set_experiment_tag(experiment.experiment_id,
                                                  *next(iter(EXPERIMENT_KIND.items())))
            return experiment.experiment_id
        location = None
        if is_local_store(tracking_uri):
            folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment_name)
            location = str(Path(artifact_root).expanduser().resolve() / folder)
        return mlflow.create_experiment(experiment_name, artifact_location=location,
                                        tags=EXPERIMENT_KIND)


@contextmanager
def _store_setup_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise creating a SQLite store and its experiments across processes: two jobs that
    start together on a fresh store would otherwise race through MLflow's schema migration."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def open_run(experiment_id: str | None, run_name: str | None, tags: Mapping[str, str],
             run_id: str | None = None) -> Iterator[str]:
    """A new run (or the existing `run_id`, resumed) that ends FINISHED; KILLED when
    interrupted (SIGTERM, Ctrl-C); FAILED with the error as tag `error` and `error.txt`."""
    active = mlflow.active_run()
    if active is not None:
        raise RuntimeError(f"MLflow run {active.info.run_id} is still active; refusing to nest")
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                          run_name=None if run_id else run_name,
                          tags=None if run_id else dict(tags)) as run:
        try:
            yield run.info.run_id
        except (KeyboardInterrupt, SystemExit) as error:
            try:  # the status first: a failing tag write must not leave the run RUNNING
                mlflow.end_run("KILLED")
            finally:
                MlflowClient().set_tag(run.info.run_id, "interrupted",
                                       f"{type(error).__name__}: {error}")
            raise
        except BaseException as error:
            mlflow.set_tag("error", error_tag(error))
            mlflow.log_text("".join(traceback.format_exception(error)), "error.txt")
            raise


def error_tag(error: BaseException) -> str:
    """The `error` tag of a failed run: exception type and message, within MLflow's limit."""
    return f"{type(error).__name__}: {error}"[:5000]


@contextmanager
def created_run(experiment_id: str, run_name: str | None, tags: Mapping[str, str]
                ) -> Iterator[str]:
    """A run created but not made active, so that child runs can be opened meanwhile (a
    cross-validation's parent). The block finishes it by resuming it with `open_run(...,
    run_id)`; if the block raises, the run ends FAILED (KILLED when interrupted)."""
    client = MlflowClient()
    run_id = client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
    try:
        yield run_id
    except (KeyboardInterrupt, SystemExit):
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as error:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "error", error_tag(error))
            client.set_terminated(run_id, "FAILED")
        raise


RESOLVED_CONFIG = "resolved_config.yaml"


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def load_run_config(tracking_uri: str, run_id: str) -> tuple[str, str]:
    """(status, resolved config YAML) of an existing run, for `resume=<run id>`."""
    client = MlflowClient(tracking_uri)
    try:
        status = client.get_run(run_id).info.status
    except MlflowException as error:
        raise RunStateError(f"No MLflow run {run_id!r} in store {tracking_uri} (add mlflow."
                            "tracking_uri=... when the run lives in another store)") from error
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, RESOLVED_CONFIG, folder)
        except (MlflowException, OSError) as error:
            raise RunStateError(f"MLflow run {run_id} has no {RESOLVED_CONFIG}; it was not "
                                "started by this framework and cannot be resumed") from error
        return status, Path(path).read_text()


def metric_histories(run_id: str, names: Iterable[str]) -> dict[str, dict[int, float]]:
    """name -> {step: value} of the active store's run (the last value logged per step)."""
    client = MlflowClient()
    return {name: {m.step: m.value for m in sorted(client.get_metric_history(run_id, name),
                                                   key=lambda m: m.timestamp)}
            for name in names}


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


def log_new_metrics(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log the metrics the run does not hold yet (a resumed run that repeats its final
    evaluation logs each metric once)."""
    logged = MlflowClient().get_run(run_id).data.metrics
    log_metrics({k: v for k, v in metrics.items() if k not in logged})


def set_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(dict(tags))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


PARENT_RUN_ENV = "EXPERIMENTS_PARENT_RUN_ID"  # set by the sweep callback for its jobs


def parent_run_tags() -> dict[str, str]:
    """Tag that makes this run a child of the sweep's parent run, inside a sweep."""
    parent = os.environ.get(PARENT_RUN_ENV)
    return {"mlflow.parentRunId": parent} if parent else {}


def log_model(model_dir: Path, info: Mapping[str, Any]) -> str:
    """Log the run's model folder (`model.keras` + `model_info.json`) as an MLflow pyfunc model
    (`experiments.serving.ImageClassifier`, logged from code, not pickled): image bytes or
    paths in, the run's predictions out, loadable and servable without this project
    installed. Returns the model URI."""
    from experiments import mlflow_model, serving  # only when a model is logged

    names = info["class_names"]
    signature = ModelSignature(
        Schema([ColSpec("string", "image", required=False),  # base64: we decode it ourselves
                ColSpec("string", "path", required=False)]),
        Schema([*(ColSpec("double", f"p_{c}") for c in names), ColSpec("string", "predicted"),
                ColSpec("string", "decision"), ColSpec("string", "error")]))
    example = pd.DataFrame({"image": [serving.example_image()]})
    with tempfile.TemporaryDirectory() as folder:
        code = shutil.copytree(Path(serving.__file__).parent, Path(folder) / "experiments",
                               ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        logged = mlflow.pyfunc.log_model(
            name="model", python_model=mlflow_model.__file__,
            artifacts={"model": str(model_dir / MODEL_FILE), "info": str(model_dir / MODEL_INFO)},
            code_paths=[str(code)], signature=signature, input_example=example,
            metadata=dict(info), pip_requirements=serving_requirements())
    return logged.model_uri


def serving_requirements() -> list[str]:
    """What the MLflow model needs to load and predict, pinned to what trained it (stated,
    not inferred: inference would re-import the model in a subprocess)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}"
            for name in ("mlflow", "tensorflow", "keras", "numpy", "pandas", "pillow")]


def register_model(model_uri: str, name: str) -> str:
    """Register a logged model under `name`; return the new version."""
    return mlflow.register_model(model_uri, name).version


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
    LOGGED = (*METRICS, "lr", "epoch_seconds")

    def __init__(self, logged_steps: Iterable[int] = ()) -> None:
        """logged_steps: epochs already in the run (a resumed run logs each epoch once)."""
        super().__init__()
        self._logged_steps = set(logged_steps)
        self._lr = float("nan")
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 in self._logged_steps:
            return
        logs = logs or {}
        metrics = {name: logs[name] for name in self.METRICS if name in logs}
        metrics["lr"] = self._lr
        metrics["epoch_seconds"] = time.perf_counter() - self._started
        log_metrics(metrics, step=epoch + 1)
