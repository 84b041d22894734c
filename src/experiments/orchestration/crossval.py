"""Cross-validation (`cv.folds=K`, `cv.repeats=R`): one MLflow parent run, one child run per
fold. Fold k of repeat r (from 0) tests on the k-th part of the fold assignment seeded with
data.split_seed (else trainer.seed) + r and trains, with trainer.seed + r and its validation
split carved out, on the rest.

The parent pools the folds' out-of-fold test predictions (every image tested once per repeat,
by a model that never saw it), reports their metrics with bootstrap intervals (averaged over
repeats, every resample drawing the same images for each repeat) and the folds' spread, and
logs one model: the ensemble of the fold models (the mean of their probabilities), or with
`cv.refit=true` one model trained on every image (`experiments.refit`). Its temperature and
decision threshold are fitted on the pooled out-of-fold predictions, never on a test split.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from experiments.config.cohorts import MAIN_SOURCE
from experiments.config.instantiate import Components
from experiments.config.schema import Config, EvalConfig
from experiments.data import loading
from experiments.data import splits as splits_lib
from experiments.data.cohorts import scan_cohorts
from experiments.data.decode import input_mpp
from experiments.errors import ConfigError
from experiments.evaluation import figures as figures_lib
from experiments.evaluation import metrics as metrics_lib
from experiments.evaluation import stats
from experiments.orchestration import single
from experiments.orchestration.external import cached_as_ood, evaluate_cohorts, fit_ood
from experiments.orchestration.oof import (
    Fold,
    concat_predictions,
    pooled,
    pooled_metrics,
    repeats_of,
    write_oof_predictions,
)
from experiments.serving import export, inference
from experiments.tracking import records, run_records, store
from experiments.training.build import build, check_training_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CVResult:
    parent_id: str
    metrics: dict[str, float]
    folds: list[Fold]

    @property
    def best_value(self) -> float:
        """The monitored validation metric at the folds' checkpoints, averaged (for sweepers)."""
        return float(np.mean([fold.best_value for fold in self.folds]))


@dataclass(frozen=True)
class Refit:
    """The refit model, its epochs, and its pooled features of every image when a frozen
    backbone's cache held them (the OOD reference's, without a second pass)."""

    model: keras.Model
    epochs: int
    features: np.ndarray | None


def check_supported(settings: Config, loaded: loading.LoadedData) -> None:
    if settings.resume is not None:
        raise ConfigError("resume is not supported for cross-validation (cv.folds > 1); start "
                          f"it again. Received: resume={settings.resume!r}")
    if loaded.test is not None:
        raise ConfigError("Cross-validation tests on data.root's own folds; set "
                          "data.test_root=null or cv.folds=1. Received: data.test_root="
                          f"{settings.data.test_root!r}")


def with_seed(settings: Config, components: Components,
              seed: int) -> tuple[Config, Components]:
    """Settings and recorded params of the repeat whose folds and training use `seed`."""
    trainer = dataclasses.replace(settings.trainer, seed=seed)
    eval_settings = dataclasses.replace(settings.eval, seed=seed)
    params = {**components.params, "trainer.seed": seed, "eval.seed": seed}
    return (dataclasses.replace(settings, trainer=trainer, eval=eval_settings),
            dataclasses.replace(components, params=params))


def run_cross_validation(settings: Config, components: Components) -> CVResult:
    """Every fold of every repeat as a child run, then the parent's pooled results and
    model (ensemble, or refit)."""
    cv, ml = settings.cv, settings.mlflow
    loaded = single.load_run_data(settings)
    check_supported(settings, loaded)
    cohorts = scan_cohorts(settings.eval.cohorts, loaded.class_names)
    output_dir = Path(settings.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    experiment_id = store.ensure_experiment(ml.tracking_uri, ml.experiment_name,
                                            ml.artifact_root)
    positive = metrics_lib.positive_index(loaded.class_names, settings.data.positive_class)
    repeats = f" x{cv.repeats}" if cv.repeats > 1 else ""
    planned = plan_folds(settings, loaded)
    for _, _, splits in planned:  # before the parent run opens: a fold would fail halfway
        check_training_split(settings, splits.train)
    n_folds = len(planned) // cv.repeats
    tags = {**run_records.common_tags(settings.backbone.name, settings.backbone.weights,
                                      loaded.class_names, positive,
                                      loaded.image_size),
            "cv_folds": str(n_folds), "cv_repeats": str(cv.repeats),
            **({"cv_leave_source_out": "true"} if cv.leave_source_out else {}),
            "n_images": str(len(loaded.pool)), "splits_sha256": splits_lib.folds_sha256(planned)}
    kind = "loso" if cv.leave_source_out else f"cv{n_folds}"
    run_name = f"{ml.run_name or settings.backbone.name} {kind}{repeats}"
    folds: list[Fold] = []
    with store.created_run(experiment_id, run_name, tags) as parent_id:
        log.info(f"MLflow parent run {parent_id}: {n_folds}-fold cross-validation{repeats} "
                 f"(experiment {ml.experiment_name!r})")
        seeded = {repeat: with_seed(settings, components, settings.trainer.seed + repeat - 1)
                  for repeat in range(1, cv.repeats + 1)}  # folds seeded by the split
        for repeat, number, splits in planned:
            folds.append(run_fold(*seeded[repeat], loaded, splits, repeat, number,
                                  experiment_id, parent_id, run_name))
        refit = None
        if cv.refit:  # a child run of its own, before the parent is active again
            refit = train_refit(settings, components, loaded, folds, experiment_id, parent_id,
                                run_name, output_dir / "refit")
        with store.open_run(None, None, {}, parent_id):
            metrics = log_cross_validation(settings, components, loaded, positive, folds,
                                           output_dir)
            log_parent_model(settings, loaded, positive, folds, output_dir, refit)
            metrics.update(evaluate_cohorts(cohorts, output_dir / run_records.MODEL_DIR,
                                            settings.eval, settings.trainer.batch_size,
                                            output_dir / "external", parent_id))
    return CVResult(parent_id, metrics, folds)


def plan_folds(settings: Config, loaded: loading.LoadedData
               ) -> list[tuple[int, int, splits_lib.Splits]]:
    """(repeat, fold number, splits) of every fold, in order: stratified K-fold per repeat,
    seeded by the split seed + repeat, or one fold per source (cv.leave_source_out)."""
    cv, data = settings.cv, settings.data
    seed = loading.split_seed(data, settings.trainer.seed)
    if cv.leave_source_out:
        by_source = splits_lib.source_folds(loaded.class_names, loaded.pool, data.val_fraction,
                                            seed)
        for number, (name, _) in enumerate(by_source, start=1):
            log.info(f"Fold {number} tests on source {name!r}")
        return [(1, number, splits) for number, (_, splits) in enumerate(by_source, start=1)]
    return [(repeat, number, splits) for repeat in range(1, cv.repeats + 1)
            for number, splits in enumerate(splits_lib.make_folds(
                loaded.class_names, loaded.pool, cv.folds, data.val_fraction,
                seed + repeat - 1), start=1)]


def train_refit(settings: Config, components: Components, loaded: loading.LoadedData,
                folds: Sequence[Fold], experiment_id: str, parent_id: str, run_name: str,
                output_dir: Path) -> Refit:
    """cv.refit: one model on every image for the folds' median best epoch."""
    from experiments.orchestration import refit  # trains a model: only when asked

    epochs = max(1, round(statistics.median(f.best_epoch for f in folds)))
    model, features = refit.train_refit(settings, components, loaded, epochs, experiment_id,
                                        parent_id, run_name, output_dir)
    return Refit(model, epochs, features)


def run_fold(settings: Config, components: Components, loaded: loading.LoadedData,
             splits: splits_lib.Splits, repeat: int, number: int, experiment_id: str,
             parent_id: str, run_name: str) -> Fold:
    """One fold as a child run of the parent."""
    prepared = build(settings, components, splits, loaded.skipped, loaded.image_size)
    fold_tags = {**single.run_tags(settings, prepared), "mlflow.parentRunId": parent_id,
                 "cv_parent": parent_id, "cv_fold": str(number), "cv_repeat": str(repeat)}
    if settings.cv.leave_source_out and splits.test.sources:
        fold_tags["cv_test_source"] = splits.test.sources[0]
    output_dir = Path(settings.paths.output_dir)
    many = settings.cv.repeats > 1
    fold_dir = output_dir / (f"repeat_{repeat}" if many else "") / f"fold_{number}"
    label = f"repeat {repeat} fold {number}" if many else f"fold {number}"
    with store.open_run(experiment_id, f"{run_name} {label}", fold_tags) as run_id:
        log.info(f"{label.capitalize()}: MLflow run {run_id}")
        result, evaluation = single.train_and_evaluate(settings, components, prepared, fold_dir,
                                                       run_id, log_model=settings.cv.fold_models)
    return Fold(repeat, number, evaluation, result, fold_dir / run_records.MODEL_DIR)


def log_cross_validation(settings: Config, components: Components, loaded: loading.LoadedData,
                         positive: int, folds: list[Fold], output_dir: Path
                         ) -> dict[str, float]:
    """The parent run's config, pooled metrics, out-of-fold predictions and figures."""
    run_records.log_config(components, output_dir, settings.backbone.name,
                           settings.backbone.weights)
    metrics = pooled_metrics(folds, positive, settings.eval)
    records.log_metrics(metrics)
    folder = output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    class_names = loaded.class_names
    first = pooled(repeats_of(folds)[0])
    paths = [write_oof_predictions(folds, class_names, positive,
                                   folder / "test_predictions.csv"),
             figures_lib.plot_confusion_matrix(first, class_names, folder / "confusion_matrix.png"),
             figures_lib.plot_roc_curve(first, class_names, positive, folder / "roc_curve.png")]
    for path in paths:
        records.log_artifact(path)
    return metrics


def operating_point(folds: Sequence[Fold], positive: int,
                    settings: EvalConfig) -> tuple[float, float | None]:
    """Temperature and threshold for the parent's model, fitted on every pooled out-of-fold
    prediction (all training images, each from a model that did not train on it)."""
    pooled_raw = concat_predictions([f.evaluation.test_raw for f in folds])
    return stats.fit_operating_point(pooled_raw.labels, pooled_raw.probabilities, positive,
                                     settings.threshold, settings.fixed_threshold,
                                     settings.target_sensitivity, settings.temperature_scaling)


def log_parent_model(settings: Config, loaded: loading.LoadedData, positive: int,
                     folds: list[Fold], output_dir: Path,
                     refit: Refit | None) -> None:
    """The parent's model: the refit model when there is one, else the ensemble of the fold
    models."""
    temperature, threshold = operating_point(folds, positive, settings.eval)
    describe = {"backbone": settings.backbone.name, "patch_size": settings.data.patch_size,
                "resize": settings.data.resize, "input_mpp": input_mpp(
                    settings.data.mpp, loaded.pool.files_of(MAIN_SOURCE), loaded.image_size),
                "stain_normalization": settings.data.stain_normalization}
    reference = None
    if refit is not None:
        model, reference = refit.model, refit.features
        kind = {"kind": "cv_refit", "epochs": refit.epochs}
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
    records.log_metrics({"model_temperature": temperature,
                         **({"model_threshold": threshold} if threshold is not None else {}),
                         f"best_{training.monitor}": float(np.mean([f.best_value
                                                                    for f in folds]))})
    # the model's training images
    ood = fit_ood(settings, model, loaded.pool.images, cached_as_ood(settings, reference))
    run_records.log_run_model(model, info, output_dir / run_records.MODEL_DIR,
                              settings.mlflow.register_as,
                              {"model_kind": str(kind["kind"]),
                               "checkpoint_monitor": training.monitor,
                               "checkpoint_mode": "max" if training.higher_is_better else "min"},
                              ood)
