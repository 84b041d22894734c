"""The model a cross-validation's parent run logs - the ensemble of the fold models, the model
refitted on every image (cv.refit), or the cascade of a refit on the home images and one on
every source (cv.cascade) - with its temperature and threshold fitted on pooled out-of-fold
predictions, never on a test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from experiments.config.cohorts import MAIN_SOURCE
from experiments.config.schema import Config, EvalConfig
from experiments.data import loading
from experiments.orchestration.external import fit_ood
from experiments.orchestration.oof import Fold, operating_point
from experiments.serving import export, inference
from experiments.serving.cascade import FALLBACK_DIR
from experiments.serving.ood import OodReference
from experiments.tracking import records, run_records


@dataclass(frozen=True)
class Refit:
    """The refit model, its epochs, and the features of every image its out-of-distribution
    reference is fitted on, when a frozen backbone's cache held them (no second pass)."""

    model: keras.Model
    epochs: int
    features: np.ndarray | None


@dataclass(frozen=True)
class Home:
    """cv.cascade's first model: refitted on the home images (`loaded`), with the folds of
    its cross-validation (each fold's home model)."""

    refit: Refit
    folds: list[Fold]
    loaded: loading.LoadedData
    evaluation: EvalConfig  # its own temperature switch (cv.home_temperature)


def log_parent_model(settings: Config, loaded: loading.LoadedData, positive: int,
                     folds: list[Fold], output_dir: Path, refit: Refit | None,
                     home: Home | None = None) -> dict[str, float]:
    """The parent's model: the refit model when there is one, else the ensemble of the fold
    models; with `home` (cv.cascade), the cascade of the home model and the refit model.
    Returns its operating point as logged (model_temperature, ...: the run's summary reads
    them)."""
    temperature, threshold = operating_point(folds, positive, settings.eval)
    describe = {"backbone": settings.backbone.name, "patch_size": settings.data.patch_size,
                "resize": settings.data.resize, "input_mpp": loaded.input_mpp,
                "stain_normalization": settings.data.stain_normalization}
    reference = None
    if refit is not None:
        model, reference = refit.model, refit.features
        kind: dict[str, Any] = {"kind": "cv_refit", "epochs": refit.epochs}
        records.set_tags({"estimate": "cross-validation: the refit model trained on every "
                          "image and has no test split of its own; its expected performance "
                          "is the pooled out-of-fold estimate of this run"})
    else:
        members = [inference.load_model(f.model_dir / inference.MODEL_FILE) for f in folds]
        model = export.ensemble(members)
        kind = {"kind": "cv_ensemble", "members": len(members)}
    info = export.model_info(loaded.class_names, loaded.image_size, positive, settings.eval.tta,
                             temperature, threshold, **describe, **kind)
    training = folds[0].training
    records.log_metrics({f"best_{training.monitor}": float(np.mean([f.best_value
                                                                    for f in folds]))})
    # the model's training images
    ood = fit_ood(settings, model, loaded.pool.images, reference)
    logged: dict[str, float] = {}
    model_dir = output_dir / run_records.MODEL_DIR
    fallback = None
    if home is not None:
        fallback = model_dir / FALLBACK_DIR
        run_records.save_run_model(model, info, fallback, ood)
        logged = run_records.log_operating_point("fallback_model_", temperature, threshold)
        model, info, ood, (temperature, threshold) = home_model(settings, home, positive,
                                                                describe)
        kind = {"kind": "cv_cascade"}
    logged = {**logged, **run_records.log_operating_point("model_", temperature, threshold)}
    run_records.log_run_model(model, info, model_dir, settings.mlflow.register_as,
                              {"model_kind": str(kind["kind"]),
                               "checkpoint_monitor": training.monitor,
                               "checkpoint_mode": "max" if training.higher_is_better else "min"},
                              ood, fallback)
    return logged


def home_model(settings: Config, home: Home, positive: int, describe: dict[str, Any]
               ) -> tuple[keras.Model, dict[str, Any], OodReference | None,
                          tuple[float, float | None]]:
    """cv.cascade's first model, its info, its out-of-distribution reference (of the home
    images: what it accepts) and its temperature and threshold (from its folds' predictions
    of the home images; fitted or not per cv.home_temperature)."""
    temperature, threshold = operating_point(home.folds, positive, home.evaluation, MAIN_SOURCE)
    loaded = home.loaded
    info = export.model_info(loaded.class_names, loaded.image_size, positive, settings.eval.tta,
                             temperature, threshold, **describe, kind="cv_cascade",
                             epochs=home.refit.epochs)
    records.set_tags({"estimate": "cross-validation: the cascade's models were refitted on "
                      "every image (the first on the home images) and have no test split of "
                      "their own; test_* is the pooled out-of-fold estimate of the folds' "
                      "cascades, fallback_test_* that of the all-source model alone"})
    ood = fit_ood(settings, home.refit.model, loaded.pool.images, home.refit.features)
    return home.refit.model, info, ood, (temperature, threshold)
