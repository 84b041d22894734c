"""`python -m experiments.adapt model=... input=<folder of unlabeled images>`

Test-time BatchNorm adaptation (AdaBN) to a new laboratory: every BatchNormalization layer's
statistics are re-estimated on the folder's images (no labels needed; nothing else changes) and
the adapted model is logged as a new MLflow run and model - registered as a new version with
`register_as=NAME` - tagged with what it was adapted from and the folder's fingerprint (the
sha256 of its images' bytes). model: anything `experiments.predict` takes (a run id, a
models:/ or runs:/ URI, a .keras file). The model keeps its classes, threshold and
temperature; it has no out-of-distribution reference (the source's describes features the
adaptation moved). Options: tracking_uri (default ./mlruns/mlflow.db),
experiment (default: the source run's, else "adapted"), batch_size (32).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.console import configure_logging
from experiments.errors import DataError, UserError, report_user_errors
from experiments.models.adapt import adapt_batchnorm
from experiments.predict import RUN_ID, key_values, list_inputs, load_predictor
from experiments.serving.cascade import Cascade
from experiments.serving.inference import Predictor
from experiments.tracking import records, run_records, store

log = logging.getLogger(__name__)

OPTIONS = {"model": "", "input": "", "tracking_uri": "", "register_as": "", "experiment": "",
           "batch_size": "32"}


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """adapt's key=value arguments, checked."""
    values = key_values(argv, OPTIONS, __doc__)
    if not values["batch_size"].isdigit() or int(values["batch_size"]) < 2:
        raise UserError("batch_size must be an integer >= 2 (batch statistics need two images)."
                        f" Received: batch_size={values['batch_size']!r}")
    return values


def folder_fingerprint(files: Sequence[Path]) -> str:
    """sha256 over the images' own sha256s, in order of their names: the same images give the
    same fingerprint wherever the folder lives."""
    digests = sorted((path.name, hashlib.sha256(path.read_bytes()).hexdigest())
                     for path in files)
    return hashlib.sha256("\n".join(f"{n}\t{d}" for n, d in digests).encode()).hexdigest()


def read_images(predictor: Predictor, files: Sequence[Path]) -> np.ndarray:
    """The readable images, decoded as the model decodes them; unreadable ones are named."""
    images, skipped = predictor.decode(files, [str(f) for f in files])
    if skipped:
        log.warning(f"Leaving out {len(skipped)} unreadable file(s): "
                    + "; ".join(f"{files[i]}: {why}" for i, why in list(skipped.items())[:5]))
    if images is None or len(images) < 2:
        raise DataError(f"AdaBN needs at least 2 readable images; found "
                        f"{0 if images is None else len(images)}")
    return images


def adapt(spec: str, folder: str, tracking_uri: str, register_as: str | None = None,
          experiment: str | None = None, batch_size: int = 32) -> str:
    """Adapt the model `spec` to the images under `folder` and log it; returns the run id."""
    predictor = load_predictor(spec, tracking_uri)
    if isinstance(predictor, Cascade):
        raise UserError(f"model={spec!r} is a cascade of two models; adapt a single model "
                        "(a cascade's referral was fitted on the features AdaBN would move)")
    files = list_inputs(folder)
    images = read_images(predictor, files)
    fingerprint = folder_fingerprint(files)
    layers = adapt_batchnorm(predictor.model, images, batch_size)
    if layers == 0:
        raise UserError(f"model={spec!r} has no BatchNormalization layer to adapt")
    log.info(f"Adapted {layers} BatchNormalization layers to {len(images)} images of {folder}")
    tags = {"adapted_from": spec, "adaptation_folder": str(Path(folder).resolve()),
            "adaptation_sha256": fingerprint, "adaptation_images": str(len(images)),
            "adaptation_batchnorm_layers": str(layers), "model_kind": "adabn"}
    info = {**dataclasses.asdict(predictor.info), "class_names": list(predictor.info.class_names),
            "adapted": {"from": spec, "folder_sha256": fingerprint, "images": len(images)}}
    store.check_server(tracking_uri)
    experiment_id = store.ensure_experiment(tracking_uri, experiment or source_experiment(
        spec, tracking_uri), str(store.artifact_root_of(tracking_uri)))
    with (store.open_run(experiment_id, f"adapted to {Path(folder).name}", tags) as run_id,
          tempfile.TemporaryDirectory() as scratch):
        records.log_params({"adapted_from": spec, "adaptation_folder": tags["adaptation_folder"]})
        # no out-of-distribution reference: it describes the unadapted model's features
        model_uri = run_records.log_run_model(predictor.model, info, Path(scratch) / "model",
                                              register_as or None, {}, None)
    print(f"Adapted model: MLflow run {run_id}, {model_uri}"
          + (f" (registered as {register_as})" if register_as else ""))
    return run_id


def source_experiment(spec: str, tracking_uri: str) -> str:
    """The experiment of the source run (a run id), else "adapted"."""
    if RUN_ID.match(spec) and not Path(spec).exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        return client.get_experiment(client.get_run(spec).info.experiment_id).name
    return "adapted"


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    adapt(args["model"], args["input"], args["tracking_uri"] or store.default_store_uri(),
          args["register_as"] or None, args["experiment"] or None, int(args["batch_size"]))


if __name__ == "__main__":
    main()
