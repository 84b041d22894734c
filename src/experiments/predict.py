"""`python -m experiments.predict model=... input=... output=predictions.csv`

model: an MLflow run id (its best checkpoint), a registered or logged model URI
(`models:/name/version`, `models:/m-...`, `runs:/<id>/model`), or a `.keras` file (class names
from the `model_info.json` beside it). input: an image file or a folder (searched
recursively). Writes one row per image: file, p_<class> for each class, predicted class (the
most probable), decision (at the decision threshold chosen on validation, for two classes), and
error. Probabilities use the run's test-time augmentation and temperature (from model_info.json;
`tta=none` turns TTA off). Unreadable files get an error and no prediction instead of stopping
the job.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from experiments import backbones  # noqa: F401  (registers PreprocessInput for loading)
from experiments.data import IMAGE_EXTENSIONS, load_image
from experiments.evaluate import TTA_MODES, load_checkpoint, predict_probabilities
from experiments.stats import apply_temperature, decide
from experiments.tracking import MODEL_INFO, default_store_uri

OPTIONS = {"model": None, "input": None, "output": "predictions.csv", "batch_size": "32",
           "tracking_uri": None, "tta": "auto"}
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class LoadedModel:
    model: keras.Model
    class_names: tuple[str, ...]
    image_size: int
    tta: str = "none"
    temperature: float = 1.0
    threshold: float | None = None  # on p(positive_class)
    positive_class: str | None = None


def _info_from_model(model: keras.Model, info: dict | None, source: str) -> LoadedModel:
    size = int(model.input_shape[1])
    if info is None:
        n_classes = int(model.output_shape[-1])
        print(f"warning: no {MODEL_INFO} for {source}; naming classes class_0..", file=sys.stderr)
        return LoadedModel(model, tuple(f"class_{i}" for i in range(n_classes)), size)
    if int(info["image_size"]) != size:
        raise ValueError(f"{source}: model input {size} px but {MODEL_INFO} says "
                         f"{info['image_size']}")
    return LoadedModel(model, tuple(info["class_names"]), size, info.get("tta", "none"),
                       float(info.get("temperature") or 1.0), info.get("threshold"),
                       info.get("positive_class"))


def load_model(spec: str, tracking_uri: str | None) -> LoadedModel:
    """Load a model and what it needs to predict (class names, input size) from any source.

    Run ids and model URIs are looked up in `tracking_uri` (default: ./mlruns/mlflow.db).
    """
    tracking_uri = tracking_uri or default_store_uri()
    if spec.startswith(("models:/", "runs:/")):
        import mlflow
        import mlflow.keras

        mlflow.set_tracking_uri(tracking_uri)
        model = mlflow.keras.load_model(spec)  # Keras' safe mode stays on
        metadata = mlflow.models.get_model_info(spec).metadata
        return _info_from_model(model, metadata, spec)
    if RUN_ID.match(spec) and not Path(spec).exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        folder = Path(tempfile.mkdtemp(prefix="predict-"))
        local = Path(client.download_artifacts(spec, "checkpoints", str(folder)))
        spec = str(local / "best.keras")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model={spec!r} is not a run id, a models:/ or runs:/ URI, "
                                "or an existing .keras file")
    info_path = path.with_name(MODEL_INFO)
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    return _info_from_model(load_checkpoint(path), info, str(path))


def list_inputs(source: str | Path) -> list[Path]:
    """An image file, or every image under a folder (hidden files left out), sorted."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input={str(source)!r} does not exist")
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith(".") and not p.is_dir())


def predict_files(loaded: LoadedModel, files: Sequence[Path], output: Path,
                  batch_size: int = 32) -> int:
    """Write predictions for `files` to `output` (CSV); return how many files failed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    progress = keras.utils.Progbar(len(files), unit_name="image")
    names = loaded.class_names
    with_decision = loaded.threshold is not None and len(names) == 2
    positive = names.index(loaded.positive_class) if with_decision else 0
    failed = 0
    with output.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", *[f"p_{c}" for c in names], "predicted", "decision", "error"])
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            images, ok, errors = [], [], {}
            for file in batch:
                try:
                    images.append(load_image(str(file), loaded.image_size))
                    ok.append(file)
                except ValueError as error:
                    errors[file] = str(error).removeprefix(f"{file}: ")
            probs = np.empty((0, len(names)))
            if images:
                probs = apply_temperature(predict_probabilities(
                    loaded.model, np.stack(images), batch_size, loaded.tta), loaded.temperature)
            by_file = dict(zip(ok, probs, strict=True))
            for file in batch:
                if file in errors:
                    failed += 1
                    writer.writerow([file, *[""] * len(names), "", "", errors[file]])
                    continue
                p = by_file[file]
                decision = (names[int(decide(p[None], positive, loaded.threshold)[0])]
                            if with_decision else "")
                writer.writerow([file, *[f"{v:.6f}" for v in p], names[int(np.argmax(p))],
                                 decision, ""])
            progress.add(len(batch))
    return failed


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """key=value arguments, as Hydra-style overrides; unknown keys are refused."""
    values = dict(OPTIONS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise SystemExit(f"Unknown argument {arg!r}; use key=value with keys "
                             f"{', '.join(OPTIONS)}.\n{__doc__}")
        values[key] = value
    if values["tta"] not in ("auto", *TTA_MODES):
        raise SystemExit(f"tta must be auto (as the run evaluated), none or dihedral. "
                         f"Received: tta={values['tta']!r}")
    for key in ("model", "input"):
        if not values[key]:
            raise SystemExit(f"Missing {key}=...\n{__doc__}")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    loaded = load_model(args["model"], args["tracking_uri"])
    if args["tta"] != "auto":
        loaded = dataclasses.replace(loaded, tta=args["tta"])
    files = list_inputs(args["input"])
    output = Path(args["output"])
    failed = predict_files(loaded, files, output, int(args["batch_size"]))
    print(f"Wrote {len(files)} rows to {output.resolve()} ({failed} unreadable)")


if __name__ == "__main__":
    main()
