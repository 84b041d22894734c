"""`python -m experiments.predict model=... input=... output=predictions.csv`

model: an MLflow run id (its model: a single run's, a cross-validation's ensemble or refit), a
registered or logged model URI (`models:/name/version`, `models:/m-...`, `runs:/<id>/model`), or
a `.keras` file (class names from the `model_info.json` beside it). input: an image file or a
folder (searched recursively). Writes one row per image: file, p_<class> for each class,
predicted class (the most probable), decision (at the decision threshold chosen on validation,
for two classes), and error. Probabilities use the run's test-time augmentation and temperature
(from model_info.json; `tta=none` turns TTA off): the same numbers as the MLflow model serves.
mpp=<micrometres per pixel of the input images> rescales them to the model's training scale
(a model trained with data.mpp).
fallback=<another model, as model=>: a cascade - the first model answers the images its
out-of-distribution reference accepts and hands the ones it refers to the fallback (e.g. a
model trained on your images alone first, one trained on them and other laboratories' as the
fallback); the `answered_by` column says which answered.
Unreadable files get an error and no prediction instead of stopping the job.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras

from experiments.config.choices import TTA_MODES
from experiments.console import configure_logging
from experiments.data.folders import IMAGE_EXTENSIONS
from experiments.errors import UserError, report_user_errors
from experiments.serving.cascade import Cascade
from experiments.serving.inference import MODEL_INFO, ModelInfo, Predictor, load_model
from experiments.tracking.store import default_store_uri

log = logging.getLogger(__name__)

# key=value arguments and their defaults ("": not given)
OPTIONS = {"model": "", "input": "", "output": "predictions.csv", "batch_size": "32",
           "tracking_uri": "", "tta": "auto", "mpp": "", "fallback": ""}
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def load_predictor(spec: str, tracking_uri: str | None) -> Predictor | Cascade:
    """The model and what it needs to predict (classes, input size, TTA, temperature,
    threshold) from any source. Run ids and model URIs are looked up in `tracking_uri`
    (default: ./mlruns/mlflow.db)."""
    tracking_uri = tracking_uri or default_store_uri()
    if RUN_ID.match(spec) and not Path(spec).exists():
        return _from_run(spec, tracking_uri)
    if spec.startswith(("models:/", "runs:/")):
        return _from_model_uri(spec, tracking_uri)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"model={spec!r} is not a run id, a models:/ or runs:/ URI, or an "
                        "existing .keras file")
    if path.with_name(MODEL_INFO).is_file():
        return Predictor.load(path)
    model = load_model(path)
    n_classes = int(model.output_shape[-1])
    log.warning(f"no {MODEL_INFO} beside {path}; naming classes class_0..")
    return Predictor(model, ModelInfo(tuple(f"class_{i}" for i in range(n_classes)),
                                      int(model.input_shape[1])))


def _from_model_uri(uri: str, tracking_uri: str) -> Predictor | Cascade:
    """The run's MLflow model, loaded through pyfunc (the object MLflow serving uses)."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pyfunc.load_model(uri).unwrap_python_model().predictor
    except MlflowException as error:
        raise UserError(f"model={uri!r}: {error.message} (store {tracking_uri}; add "
                        "tracking_uri=... when the model lives in another store)") from error


def _from_run(run_id: str, tracking_uri: str) -> Predictor | Cascade:
    """A run's model: its `model_uri` tag; runs logged before the MLflow model carried the
    predictor fall back to `checkpoints/best.keras` + `model_info.json`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise UserError(f"No MLflow run {run_id!r} in store {tracking_uri} (add "
                        "tracking_uri=... when the run lives in another store)") from error
    if "model_uri" in run.data.tags:
        try:
            return _from_model_uri(run.data.tags["model_uri"], tracking_uri)
        except (UserError, AttributeError):
            pass  # a Keras-flavour model of an older version: use its checkpoint
    if run.info.status != "FINISHED":
        raise UserError(f"MLflow run {run_id} is {run.info.status} and has no model yet")
    folder = Path(tempfile.mkdtemp(prefix="predict-"))
    try:
        local = Path(client.download_artifacts(run_id, "checkpoints", str(folder)))
    except (MlflowException, OSError) as error:
        raise UserError(f"MLflow run {run_id} logged no model") from error
    return Predictor.load(local / "best.keras")


def list_inputs(source: str | Path) -> list[Path]:
    """An image file, or every image under a folder (hidden files left out), sorted."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"input={str(source)!r} does not exist")
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith(".") and not p.is_dir())


def predict_files(predictor: Predictor | Cascade, files: Sequence[Path], output: Path,
                  batch_size: int = 32, mpp: float | None = None) -> int:
    """Write predictions for `files` to `output` (CSV); return how many files failed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    progress = keras.utils.Progbar(len(files), unit_name="image")
    columns = predictor.columns
    failed = 0
    with output.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", *columns])
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            for file, row in zip(batch, predictor.score(batch, batch_size=batch_size, mpp=mpp),
                                 strict=True):
                failed += bool(row["error"])
                writer.writerow([file, *(_cell(row[c]) for c in columns)])
            progress.add(len(batch))
    return failed


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.6f}"  # NaN: an unreadable image
    return str(value)


HELP_ARGS = ("-h", "--help")


def key_values(argv: Sequence[str], options: dict[str, str], usage: str | None,
               required: Sequence[str] = ("model", "input")) -> dict[str, str]:
    """key=value arguments, as Hydra-style overrides, over `options`' defaults; an unknown
    key or a missing required one is refused with the `usage`; `--help` (or `-h`) prints it."""
    if any(arg in HELP_ARGS for arg in argv):
        print(usage)
        raise SystemExit(0)
    values = dict(options)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise UserError(f"Unknown argument {arg!r}; use key=value with keys "
                            f"{', '.join(options)}.\n{usage}")
        values[key] = value
    for key in required:
        if not values[key]:
            raise UserError(f"Missing {key}=...\n{usage}")
    return values


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """predict's key=value arguments, checked."""
    values = key_values(argv, OPTIONS, __doc__)
    if values["tta"] not in ("auto", *TTA_MODES):
        raise UserError(f"tta must be auto (as the run evaluated) or one of {TTA_MODES}. "
                        f"Received: tta={values['tta']!r}")
    if values["mpp"]:
        try:
            if float(values["mpp"]) <= 0:
                raise ValueError
        except ValueError:
            raise UserError("mpp must be a positive number (micrometres per pixel of the "
                            f"images). Received: mpp={values['mpp']!r}") from None
    if not values["batch_size"].isdigit() or int(values["batch_size"]) < 1:
        raise UserError(f"batch_size must be a positive integer. "
                        f"Received: batch_size={values['batch_size']!r}")
    return values


def load_model_as_asked(args: dict[str, str], key: str, mpp: float | None
                        ) -> Predictor | Cascade:
    """The model named by `args[key]` (a cascade's two), with the TTA asked for; refused
    when `mpp` is given and it does not know its training scale."""
    predictor = load_predictor(args[key], args["tracking_uri"] or None)
    if args["tta"] != "auto":
        predictor = with_tta(predictor, args["tta"])
    if mpp is not None and predictor.info.input_mpp is None:
        raise UserError(f"mpp={mpp} given but {key}={args[key]!r} does not know its "
                        "training scale (train it with data.mpp=...)")
    return predictor


def with_tta(predictor: Predictor | Cascade, tta: str) -> Predictor | Cascade:
    """The model predicting with `tta` (a cascade: both of its models)."""
    def one(model: Predictor) -> Predictor:
        return dataclasses.replace(model, info=dataclasses.replace(model.info, tta=tta))
    if isinstance(predictor, Cascade):
        return Cascade(one(predictor.first), one(predictor.fallback))
    return one(predictor)


def chained(args: dict[str, str], first: Predictor | Cascade,
            fallback: Predictor | Cascade) -> Cascade:
    """model= then fallback=, refused by name when they cannot be chained."""
    pair = f"model={args['model']!r} fallback={args['fallback']!r}"
    if not (isinstance(first, Predictor) and isinstance(fallback, Predictor)):
        raise UserError(f"{pair}: one of them is a cascade already; chain single models")
    try:
        return Cascade(first, fallback)
    except ValueError as error:
        raise UserError(f"{pair}: {error}") from error


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mpp = float(args["mpp"]) if args["mpp"] else None
    models = [load_model_as_asked(args, key, mpp) for key in ("model", "fallback")
              if args[key]]
    predictor = models[0] if len(models) == 1 else chained(args, *models)
    files = list_inputs(args["input"])
    output = Path(args["output"])
    failed = predict_files(predictor, files, output, int(args["batch_size"]), mpp)
    print(f"Wrote {len(files)} rows to {output.resolve()} ({failed} unreadable)")


if __name__ == "__main__":
    main()
