"""A run's model in MLflow: logged as a pyfunc model from code (`experiments.serving`), with the
requirements it needs, and registered by name when asked.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.entities import Run
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema

from experiments.data.splits import read_scales
from experiments.models import external
from experiments.serving import limits
from experiments.serving.cascade import Cascade, load_artifacts
from experiments.serving.inference import MODEL_FILE, MODEL_INFO, Predictor
from experiments.serving.ood import OOD_FILE


def log_model(model_dir: Path, info: Mapping[str, Any], fallback_dir: Path | None = None
              ) -> str:
    """Log the run's model folder (`model.keras` + `model_info.json`, and `ood.npz` when the
    run fitted an out-of-distribution reference) as an MLflow pyfunc model
    (`experiments.serving.ImageClassifier`, logged from code, not pickled): image bytes or
    paths in, the run's predictions out, loadable and servable without this project
    installed. With `fallback_dir`, another model's folder: a cascade (`serving.cascade`).
    Returns the model URI."""
    import experiments
    from experiments.serving import mlflow_model, pyfunc  # only when a model is logged

    names = info["class_names"]
    cascade = []  # the columns a cascade adds (serving.cascade.Cascade.columns)
    if fallback_dir is not None:
        if (fallback_dir / OOD_FILE).is_file():
            cascade.append(ColSpec("double", "fallback_ood_score"))
        cascade.append(ColSpec("string", "answered_by"))
    signature = ModelSignature(
        Schema([ColSpec("string", "image", required=False),  # base64: we decode it ourselves
                ColSpec("string", "path", required=False),
                ColSpec("double", "mpp", required=False)]),
        Schema([*(ColSpec("double", f"p_{c}") for c in names), ColSpec("string", "predicted"),
                ColSpec("string", "decision"),
                *([ColSpec("double", "ood_score")] if info.get("ood") else []),
                *cascade, ColSpec("string", "error")]))
    artifacts = model_artifacts(model_dir)
    if fallback_dir is not None:
        artifacts.update({f"fallback_{k}": v for k, v in model_artifacts(fallback_dir).items()})
    example = pd.DataFrame({"image": [pyfunc.example_image()]})
    with tempfile.TemporaryDirectory() as folder:
        # The whole package (serving imports models and data); not its config files.
        code = shutil.copytree(Path(experiments.__file__).parent, Path(folder) / "experiments",
                               ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "conf"))
        logged = mlflow.pyfunc.log_model(
            name="model", python_model=mlflow_model.__file__,
            artifacts=artifacts,
            code_paths=[str(code)], signature=signature, input_example=example,
            metadata=dict(info), pip_requirements=serving_requirements(any(
                external.needs_keras_hub(d / MODEL_FILE) for d in (model_dir, fallback_dir)
                if d is not None)),
            model_config=limits.unset())
    return logged.model_uri


def model_artifacts(model_dir: Path) -> dict[str, str]:
    """The files of a model folder the pyfunc model loads: the model, its info and, when the
    run fitted one, its out-of-distribution reference."""
    artifacts = {"model": str(model_dir / MODEL_FILE), "info": str(model_dir / MODEL_INFO)}
    if (model_dir / OOD_FILE).is_file():
        artifacts["ood"] = str(model_dir / OOD_FILE)
    return artifacts


def serving_requirements(keras_hub: bool = False) -> list[str]:
    """What the MLflow model needs to load and predict, pinned to what trained it (stated,
    not inferred: inference would re-import the model in a subprocess); keras-hub for a
    model with a KerasHub backbone."""
    from importlib.metadata import version

    names = ("mlflow", "tensorflow", "keras", "numpy", "pandas", "pillow",
             *(("keras-hub",) if keras_hub else ()))
    return [f"{name}=={version(name)}" for name in names]


def register_model(model_uri: str, name: str) -> str:
    """Register a logged model under `name`; return the new version."""
    return mlflow.register_model(model_uri, name).version


def load_logged(client: MlflowClient, model_uri: str, folder: Path) -> Predictor | Cascade:
    """A logged model (`model_uri`, a run's `model_uri` tag) downloaded from `client`'s store
    into `folder` and loaded with its info: a cascade when it was logged as one (cv.cascade,
    `experiments.cascade`)."""
    return load_artifacts(logged_files(download_logged(client, model_uri, folder)))


def logged_files(local: Path) -> dict[str, Path]:
    """The pyfunc artifacts of a downloaded model (`download_logged`'s folder), by name
    (`model`, `info`, `ood`, and a cascade's `fallback_*`): as the MLmodel file records them,
    since MLflow keeps same-named files of a cascade in numbered subfolders."""
    from mlflow.models import Model

    root = local.parent
    artifacts = Model.load(str(root / "MLmodel")).flavors["python_function"]["artifacts"]
    return {name: root / entry["path"] for name, entry in artifacts.items()}


def download_logged(client: MlflowClient, model_uri: str, folder: Path) -> Path:
    """The folder of a logged model's files (model.keras, model_info.json, ood.npz),
    downloaded from `client`'s store into `folder`. MLflow resolves a models:/<id> URI in
    the process's default store whatever tracking_uri says: the logged model is looked up
    through `client` first."""
    import mlflow.artifacts

    model_id = model_uri.removeprefix("models:/")
    if model_uri.startswith("models:/") and "/" not in model_id:
        model_uri = client.get_logged_model(model_id).artifact_location
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder),
                                                     tracking_uri=client.tracking_uri))
    return local / "artifacts"


def rescaled_sources(run: Run) -> list[str]:
    """The config keys of the training sources `run` rescaled (data.sources.<name>.mpp)."""
    return sorted(key for key, value in run.data.params.items()
                  if key.startswith("data.sources.") and key.endswith(".mpp") and value != "None")


def logged_scales(client: MlflowClient, run: Run, folder: Path) -> dict[str, float] | None:
    """file -> the factor `run` rescaled it by (its splits.csv; `decode.load_image`'s scale),
    to decode its images again as it did: empty when it rescaled no source, None when it did
    but logged no table that says by how much (runs before the column). A cross-validation's
    parent has its refits' tables (every image)."""
    if not rescaled_sources(run):
        return {}
    tables = [run]
    if "cv_folds" in run.data.tags:
        tables = client.search_runs([run.info.experiment_id],
                                    f"tags.cv_parent = '{run.info.run_id}' and "
                                    "tags.cv_refit = 'true'")
    scales: dict[str, float] = {}
    for table in tables:
        run_id = table.info.run_id
        if "splits.csv" not in {item.path for item in client.list_artifacts(run_id)}:
            return None
        read = read_scales(Path(client.download_artifacts(run_id, "splits.csv",
                                                          str(folder / run_id))))
        if read is None:
            return None
        scales.update(read)
    return scales if tables else None
