"""The MLflow tracking store: its URI, a reachable server, experiments created once (even by two
processes at a time) and runs opened and always closed with the right status.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.errors import AccessError, ServerError

LOCAL_SCHEMES = ("sqlite:", "file:", "postgresql", "mysql", "mssql")


def default_store_uri(root: str | Path | None = None) -> str:
    """The SQLite store the runs launched from `root` (default: here) write to."""
    return f"sqlite:///{Path(root or Path.cwd()).resolve() / 'mlruns' / 'mlflow.db'}"


def artifact_root_of(tracking_uri: str) -> Path:
    """Where new experiments of a local SQLite store keep artifacts: `artifacts/` beside the
    database (as runs do); the current folder's mlruns/artifacts otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts"
    return Path.cwd() / "mlruns" / "artifacts"


def is_local_store(tracking_uri: str) -> bool:
    """True for stores this process writes itself (artifacts go to a local folder)."""
    return tracking_uri.startswith(LOCAL_SCHEMES) or "://" not in tracking_uri


def model_command(description: str, registered: str) -> argparse.ArgumentParser:
    """The parser of an entry point that logs a model into a tracking store: its own
    arguments go beside --tracking-uri (this folder's mlruns/ by default) and --register-as
    (register `registered` under that name)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=default_store_uri())
    parser.add_argument("--register-as", default=None, help=f"register {registered}")
    return parser


def check_server(tracking_uri: str, experiment_name: str | None = None,
                 timeout_s: float = 5.0) -> None:
    """Fail fast when an HTTP tracking server does not answer (MLflow itself would retry for
    minutes, or worse, only after training), refuses our credentials, or does not let this
    user read `experiment_name`."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    _check_health(tracking_uri, timeout_s)
    client = MlflowClient(tracking_uri)
    with access_errors(tracking_uri, "read its experiments"):
        client.search_experiments(max_results=1)
    if experiment_name is not None:
        with access_errors(tracking_uri, f"read experiment {experiment_name!r}"):
            client.get_experiment_by_name(experiment_name)


def _check_health(tracking_uri: str, timeout_s: float) -> None:
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


@contextmanager
def access_errors(tracking_uri: str, doing: str) -> Iterator[None]:
    """A guarded server's (`mlflow server --app-name basic-auth`) 401 and 403 as one line that
    says what to set, instead of MLflow's REST error."""
    try:
        yield
    except MlflowException as error:
        if error.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if error.error_code == "UNAUTHENTICATED":
            who = f"the password of user {user!r}" if user else "a request without credentials"
            raise AccessError(
                f"MLflow tracking server {tracking_uri} refused {who} (HTTP 401) when asked to "
                f"{doing}. Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an "
                "account on that server (README, \"A guarded tracking server\").") from error
        raise AccessError(
            f"MLflow tracking server {tracking_uri}: user {user!r} may not {doing} (HTTP 403). "
            "Ask the server's admin for EDIT permission on the experiment, or log to one of "
            "your own (mlflow.experiment_name=...).") from error


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
    with (_store_setup_lock(tracking_uri),
          access_errors(tracking_uri, f"open or create experiment {experiment_name!r}")):
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
    with access_errors(mlflow.get_tracking_uri(), "start or resume a run in this experiment"):
        started = mlflow.start_run(run_id=run_id,
                                   experiment_id=None if run_id else experiment_id,
                                   run_name=None if run_id else run_name,
                                   tags=None if run_id else dict(tags))
    with started as run:
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
    with access_errors(mlflow.get_tracking_uri(), "start a run in this experiment"):
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


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if is_local_store(tracking_uri):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {tracking_uri} in a browser"
