"""Cross-validation (`cv.folds=K`, `cv.repeats=R`): one MLflow parent run, one child run per
fold. Fold k of repeat r (from 0) tests on the k-th part of the fold assignment seeded with
data.split_seed (else trainer.seed) + r and trains, with trainer.seed + r and its validation
split carved out, on the rest.

The parent pools the folds' out-of-fold test predictions (every image tested once per repeat,
by a model that never saw it), reports their metrics with bootstrap intervals (averaged over
repeats, every resample drawing the same images for each repeat) and the folds' spread, and
logs one model (`parent`): the ensemble of the fold models (the mean of their probabilities),
or with `cv.refit=true` one model trained on every image (`experiments.refit`), or with
`cv.cascade=true` the cascade of a refit on data.root's images and one on every source (every
fold then trains both: `cascading`). Its temperature and decision threshold are fitted on the
pooled out-of-fold predictions, never on a test split.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.config.instantiate import Components
from experiments.config.schema import Config
from experiments.data import loading
from experiments.data import splits as splits_lib
from experiments.data.cohorts import scan_cohorts
from experiments.errors import ConfigError
from experiments.evaluation import figures as figures_lib
from experiments.evaluation import metrics as metrics_lib
from experiments.evaluation import tables
from experiments.orchestration import cascading, parent, single
from experiments.orchestration.external import evaluate_cohorts
from experiments.orchestration.oof import (
    Fold,
    plot_oof_patients,
    pooled,
    pooled_metrics,
    raw_out_of_fold,
    repeats_of,
    write_oof_patients,
    write_oof_predictions,
)
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
        if cv.cascade:
            check_training_split(settings, cascading.home_splits(splits).train)
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
    homes: list[Fold] = []  # cv.cascade: each fold's home model
    with store.created_run(experiment_id, run_name, tags) as parent_id:
        log.info(f"MLflow parent run {parent_id}: {n_folds}-fold cross-validation{repeats} "
                 f"(experiment {ml.experiment_name!r})")
        seeded = {repeat: with_seed(settings, components, settings.trainer.seed + repeat - 1)
                  for repeat in range(1, cv.repeats + 1)}  # folds seeded by the split
        for repeat, number, splits in planned:
            folds.append(run_fold(*seeded[repeat], loaded, splits, repeat, number,
                                  experiment_id, parent_id, run_name))
            if cv.cascade:
                homes.append(run_fold(*cascading.home_settings(*seeded[repeat]), loaded,
                                      cascading.home_splits(splits),
                                      repeat, number, experiment_id, parent_id, run_name,
                                      cascading.HOME))
        refit = home = None
        if cv.refit:  # a child run of its own, before the parent is active again
            refit = train_refit(settings, components, loaded, folds, experiment_id, parent_id,
                                run_name, output_dir / "refit")
        if cv.cascade:
            home_loaded = cascading.home_data(loaded)
            own_settings, own_components = cascading.home_settings(settings, components)
            own = train_refit(own_settings, own_components, home_loaded, homes, experiment_id,
                              parent_id, f"{run_name} {cascading.HOME}",
                              output_dir / f"refit_{cascading.HOME}")
            home = parent.Home(own, homes, home_loaded, own_settings.eval)
        with store.open_run(None, None, {}, parent_id):
            metrics = log_cross_validation(settings, components, loaded, positive, folds,
                                           output_dir, homes)
            metrics.update(parent.log_parent_model(settings, loaded, positive, folds,
                                                   output_dir, refit, home))
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
                output_dir: Path) -> parent.Refit:
    """cv.refit: one model on every image for the folds' median best epoch."""
    from experiments.orchestration import refit  # trains a model: only when asked

    epochs = max(1, round(statistics.median(f.best_epoch for f in folds)))
    model, features = refit.train_refit(settings, components, loaded, epochs, experiment_id,
                                        parent_id, run_name, output_dir)
    return parent.Refit(model, epochs, features)


def run_fold(settings: Config, components: Components, loaded: loading.LoadedData,
             splits: splits_lib.Splits, repeat: int, number: int, experiment_id: str,
             parent_id: str, run_name: str, variant: str | None = None) -> Fold:
    """One fold as a child run of the parent; a `variant` (cv.cascade's home model) is a
    second model of the same fold, named and tagged by it, its model not logged (its
    predictions are what the parent pools)."""
    prepared = build(settings, components, splits, loaded.skipped, loaded.image_size,
                     loaded.input_mpp)
    fold_tags = {**single.run_tags(settings, prepared), "mlflow.parentRunId": parent_id,
                 "cv_parent": parent_id, "cv_fold": str(number), "cv_repeat": str(repeat),
                 **({"cv_model": variant} if variant else {})}
    if settings.cv.leave_source_out and splits.test.sources:
        fold_tags["cv_test_source"] = splits.test.sources[0]
    output_dir = Path(settings.paths.output_dir)
    many = settings.cv.repeats > 1
    fold_dir = (output_dir / (f"repeat_{repeat}" if many else "")
                / f"fold_{number}{f'_{variant}' if variant else ''}")
    label = (f"repeat {repeat} fold {number}" if many else f"fold {number}") + (
        f" {variant}" if variant else "")
    with store.open_run(experiment_id, f"{run_name} {label}", fold_tags) as run_id:
        log.info(f"{label.capitalize()}: MLflow run {run_id}")
        result, evaluation = single.train_and_evaluate(settings, components, prepared, fold_dir,
                                                       run_id, log_model=settings.cv.fold_models
                                                       and variant is None)
    return Fold(repeat, number, evaluation, result, fold_dir / run_records.MODEL_DIR)


def log_cross_validation(settings: Config, components: Components, loaded: loading.LoadedData,
                         positive: int, folds: list[Fold], output_dir: Path,
                         homes: Sequence[Fold] = ()) -> dict[str, float]:
    """The parent run's config, pooled metrics, out-of-fold predictions and figures; with
    the folds' home models (cv.cascade), the cascade's."""
    run_records.log_config(components, output_dir, settings.backbone.name,
                           settings.backbone.weights)
    if homes:
        alone, folds = folds, cascading.cascade_folds(folds, homes, positive)
        metrics = cascading.cascade_metrics(folds, alone, positive, settings.eval)
    else:
        metrics = pooled_metrics(folds, positive, settings.eval)
    records.log_metrics(metrics)
    folder = output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    class_names = loaded.class_names
    first = pooled(repeats_of(folds)[0])
    paths = [write_oof_predictions(folds, class_names, positive,
                                   folder / "test_predictions.csv", cascade=bool(homes)),
             figures_lib.plot_confusion_matrix(first, class_names, folder / "confusion_matrix.png"),
             figures_lib.plot_roc_curve(first, class_names, positive, folder / "roc_curve.png")]
    if not homes:  # what its operating point is fitted on: what an ensemble of sweeps pools
        paths.append(tables.write_predictions(raw_out_of_fold(folds), class_names,
                                              folder / "val_predictions.csv"))
    if first.groups is not None:
        paths.append(write_oof_patients(folds, class_names, positive,
                                        folder / "test_patients.csv"))
        figure = plot_oof_patients(folds, class_names, positive, folder / "test_patients.png")
        paths += [figure] if figure is not None else []
    for path in paths:
        records.log_artifact(path)
    return metrics
