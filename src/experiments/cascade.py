"""`python -m experiments.cascade --first <run id> --fallback <run id>`: two runs' models as one
MLflow model - the first (e.g. trained on your laboratory's images alone) answers the images
its out-of-distribution referral accepts, the fallback (e.g. trained on them and other
laboratories') the ones it refers (`experiments.serving.cascade`). `experiments.predict
model=<the new run>` and `mlflow models serve` use it like any model; each answer says which
model gave it (`answered_by`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.console import configure_logging
from experiments.errors import UserError, report_user_errors
from experiments.serving.cascade import Cascade
from experiments.serving.inference import MODEL_FILE, MODEL_INFO, Predictor
from experiments.tracking import model_registry, records, run_records, store


def run_with_model(client: MlflowClient, run_id: str) -> Run:
    """The run, refused when it is not in the store or logged no model."""
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise UserError(f"No MLflow run {run_id!r} in store {client.tracking_uri}") from error
    if "model_uri" not in run.data.tags:
        raise UserError(f"MLflow run {run_id} ({run.info.run_name}) logged no model")
    return run


def log_cascade(tracking_uri: str, first_id: str, fallback_id: str,
                register_as: str | None = None) -> str:
    """Log the cascade of two runs' models as a new run in the first one's experiment; returns
    its run id."""
    client = MlflowClient(tracking_uri)
    store.use_store(tracking_uri)
    runs = [run_with_model(client, run_id) for run_id in (first_id, fallback_id)]
    with tempfile.TemporaryDirectory() as folder:
        first, fallback = (model_registry.download_logged(client, run.data.tags["model_uri"],
                                                          Path(folder) / name)
                           for run, name in zip(runs, ("first", "fallback"), strict=True))
        for run, local in zip(runs, (first, fallback), strict=True):
            if "fallback_model" in model_registry.logged_files(local):
                raise UserError(f"Run {run.info.run_id} ({run.info.run_name}) logged a cascade "
                                "already; chain single models")
        try:
            Cascade(*(Predictor.load(d / MODEL_FILE) for d in (first, fallback)))
        except ValueError as error:
            raise UserError(f"--first {first_id} --fallback {fallback_id}: {error}") from error
        info = {**json.loads((first / MODEL_INFO).read_text()), "kind": "cascade",
                "first_run": first_id, "fallback_run": fallback_id}
        tags = {"model_kind": "cascade", "cascade_first": first_id,
                "cascade_fallback": fallback_id}
        name = f"cascade {runs[0].info.run_name} -> {runs[1].info.run_name}"
        with store.open_run(runs[0].info.experiment_id, name, tags) as run_id:
            records.log_params({"first": first_id, "fallback": fallback_id})
            model_uri = run_records.publish_model(first, info, register_as,
                                                  fallback_dir=fallback)
    print(f"Cascade {first_id} -> {fallback_id}: MLflow run {run_id}, model {model_uri}")
    return run_id


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    parser = store.model_command(__doc__, "the cascade's model")
    parser.add_argument("--first", required=True,
                        help="the run whose model answers what its referral accepts")
    parser.add_argument("--fallback", required=True,
                        help="the run whose model answers what the first refers")
    args = parser.parse_args(argv)
    store.check_server(args.tracking_uri)
    log_cascade(args.tracking_uri, args.first, args.fallback, args.register_as)


if __name__ == "__main__":
    main()
