"""What a run records in MLflow: params, metrics (each once, also on resume), tags, artifacts,
the resolved config, and metric histories read back.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.errors import RunStateError

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


# A run whose final metrics include a ROC-AUC interval wholly below 0.5 carries this tag
# (experiments.run); comparisons repeat it.
BACKWARDS_TAG = "warning_ranked_backwards"


def tag_ended_run(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    """Tags on a run that has already ended: what its summary found in its final metrics."""
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


PARENT_RUN_ENV = "EXPERIMENTS_PARENT_RUN_ID"  # set by the sweep callback for its jobs


def parent_run_tags() -> dict[str, str]:
    """Tag that makes this run a child of the sweep's parent run, inside a sweep."""
    parent = os.environ.get(PARENT_RUN_ENV)
    return {"mlflow.parentRunId": parent} if parent else {}


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
