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
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from experiments import data as data_lib
from experiments import evaluate, export, inference, job, tracking
from experiments.build import Components, build
from experiments.errors import ConfigError
from experiments.evaluate import Evaluation, Predictions
from experiments.inference import decide
from experiments.schema import Config, EvalConfig
from experiments.train import TrainResult

# Fold metrics summarised as cv_<name>_mean / cv_<name>_std on the parent run.
SPREAD_METRICS = ("test_accuracy", "test_roc_auc", "test_sensitivity", "test_specificity",
                  "test_tta_accuracy", "test_tta_roc_auc", "test_op_sensitivity",
                  "test_op_specificity", "best_epoch")
# Pooled metrics whose spread over repeats is logged as cv_repeat_<name>_std.
REPEAT_METRICS = ("test_accuracy", "test_roc_auc", "test_tta_accuracy", "test_tta_roc_auc")


@dataclass(frozen=True)
class Fold:
    repeat: int  # 1-based
    number: int  # 1-based
    evaluation: Evaluation
    training: TrainResult
    model_dir: Path  # the fold's model.keras and model_info.json

    @property
    def best_epoch(self) -> int:
        return self.training.best_epoch

    @property
    def best_value(self) -> float:
        return self.training.best_value


@dataclass(frozen=True)
class CVResult:
    parent_id: str
    metrics: dict[str, float]
    folds: list[Fold]

    @property
    def best_value(self) -> float:
        """The monitored validation metric at the folds' checkpoints, averaged (for sweepers)."""
        return float(np.mean([fold.best_value for fold in self.folds]))


def _concat(predictions: Sequence[Predictions]) -> Predictions:
    return Predictions(tuple(f for p in predictions for f in p.files),
                       np.concatenate([p.labels for p in predictions]),
                       np.concatenate([p.probabilities for p in predictions]))


def at_half(pred: Predictions, threshold: float, positive: int) -> Predictions:
    """Shift p(positive) so that `threshold` maps to 0.5: the same decisions at 0.5. Pools
    folds whose thresholds differ (each chosen on its own validation split)."""
    probabilities = pred.probabilities.copy()
    probabilities[:, positive] = np.clip(probabilities[:, positive] - threshold + 0.5, 0, 1)
    probabilities[:, 1 - positive] = 1 - probabilities[:, positive]
    return Predictions(pred.files, pred.labels, probabilities)


def repeats_of(folds: Sequence[Fold]) -> list[list[Fold]]:
    """The folds grouped by repeat, in order."""
    return [[f for f in folds if f.repeat == r] for r in sorted({f.repeat for f in folds})]


def pooled(folds: Sequence[Fold], part: str = "plain") -> Predictions:
    """One repeat's out-of-fold predictions of `part` (an Evaluation attribute), by file."""
    joined = _concat([getattr(f.evaluation, part) for f in folds])
    order = np.argsort(joined.files, kind="stable")
    return Predictions(tuple(joined.files[i] for i in order), joined.labels[order],
                       joined.probabilities[order])


def stacked(folds: Sequence[Fold], part: str = "plain",
            positive: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), probabilities (R, n, C)) over repeats, aligned by file; with `positive`,
    each fold's final predictions shifted to decide at 0.5 as at its own threshold."""
    sets = []
    for repeat in repeats_of(folds):
        if positive is None:
            sets.append(pooled(repeat, part))
        else:
            shifted = [dataclasses.replace(f, evaluation=dataclasses.replace(
                f.evaluation, test=at_half(f.evaluation.test, f.evaluation.threshold,
                                           positive))) for f in repeat]
            sets.append(pooled(shifted, "test"))
    return sets[0].labels, np.stack([s.probabilities for s in sets])


def _metrics(labels: np.ndarray, sets: np.ndarray, positive: int, settings: EvalConfig,
             prefix: str) -> dict[str, float]:
    """Point metrics averaged over the sets of predictions, and bootstrap intervals."""
    points = [evaluate.classification_metrics(Predictions((), labels, p), positive, prefix)
              for p in sets]
    out = {name: float(np.mean([p[name] for p in points])) for name in points[0]}
    intervals = evaluate.interval_metrics(Predictions((), labels, sets), positive, settings,
                                          prefix)
    return {**out, **intervals}


def pooled_metrics(folds: Sequence[Fold], positive: int, settings: EvalConfig
                   ) -> dict[str, float]:
    """The parent run's metrics: test_* and test_tta_* of the pooled out-of-fold predictions
    with bootstrap intervals, test_op_* at each fold's own threshold, and the spread over
    folds (cv_<name>_mean/_std) and over repeats (cv_repeat_<name>_std)."""
    labels, plain = stacked(folds, "plain")
    metrics = _metrics(labels, plain, positive, settings, "test_")
    if folds[0].evaluation.tta is not None:
        metrics.update(_metrics(labels, stacked(folds, "tta")[1], positive, settings,
                                "test_tta_"))
    if folds[0].evaluation.threshold is not None:
        op = evaluate.interval_metrics(
            Predictions((), labels, stacked(folds, positive=positive)[1]), positive, settings,
            "test_op_")
        metrics.update({k: v for k, v in op.items() if "roc_auc" not in k})
    for name in SPREAD_METRICS:
        values = [f.evaluation.metrics.get(name, float("nan")) if name != "best_epoch"
                  else f.best_epoch for f in folds]
        if len(values) > 1 and not np.isnan(values).any():
            metrics[f"cv_{name}_mean"] = float(np.mean(values))
            metrics[f"cv_{name}_std"] = float(np.std(values, ddof=1))
    repeats = repeats_of(folds)
    if len(repeats) > 1:
        for name in REPEAT_METRICS:
            part = "tta" if name.startswith("test_tta_") else "plain"
            if part == "tta" and folds[0].evaluation.tta is None:
                continue
            prefix = "test_tta_" if part == "tta" else "test_"
            values = [evaluate.classification_metrics(pooled(r, part), positive, prefix)[name]
                      for r in repeats]
            metrics[f"cv_repeat_{name}_std"] = float(np.std(values, ddof=1))
    metrics["best_epoch"] = float(np.mean([f.best_epoch for f in folds]))
    return metrics


def write_oof_predictions(folds: Sequence[Fold], class_names: Sequence[str], positive: int,
                          path: Path) -> Path:
    """test_predictions.csv of the parent: every image once per repeat, with its fold."""
    rows = [(f, i) for f in folds for i in range(len(f.evaluation.plain.files))]
    plain = _concat([f.evaluation.plain for f in folds])
    final = _concat([f.evaluation.test for f in folds])
    header = ["file", "repeat", "fold", "label", "predicted", *[f"p_{c}" for c in class_names],
              *[f"final_p_{c}" for c in class_names], "threshold", "decision_at_threshold"]
    if folds[0].evaluation.threshold is None:
        thresholds = decisions = [""] * len(rows)
    else:
        per_row = np.array([f.evaluation.threshold for f, _ in rows])
        thresholds = [f"{t:.6f}" for t in per_row]
        decisions = [class_names[i] for i in decide(final.probabilities, positive, per_row)]
    return evaluate.write_table(path, header, [
        plain.files, [f.repeat for f, _ in rows], [f.number for f, _ in rows],
        [class_names[label] for label in plain.labels],
        evaluate.predicted_names(plain, class_names), *evaluate.probability_columns(plain),
        *evaluate.probability_columns(final), thresholds, decisions])


def check_supported(settings: Config, loaded: job.LoadedData) -> None:
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
    loaded = job.load_data(settings)
    check_supported(settings, loaded)
    output_dir = Path(settings.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.ensure_experiment(ml.tracking_uri, ml.experiment_name,
                                               ml.artifact_root)
    positive = evaluate.positive_index(loaded.class_names, settings.data.positive_class)
    repeats = f" x{cv.repeats}" if cv.repeats > 1 else ""
    tags = {**job.common_tags(settings, loaded.class_names, positive, loaded.image_size),
            "cv_folds": str(cv.folds), "cv_repeats": str(cv.repeats),
            "n_images": str(len(loaded.pool))}
    run_name = f"{ml.run_name or settings.backbone.name} cv{cv.folds}{repeats}"
    folds: list[Fold] = []
    with tracking.created_run(experiment_id, run_name, tags) as parent_id:
        print(f"MLflow parent run {parent_id}: {cv.folds}-fold cross-validation{repeats} "
              f"(experiment {ml.experiment_name!r})", flush=True)
        for repeat in range(1, cv.repeats + 1):
            seeded, seeded_components = with_seed(settings, components,
                                                  settings.trainer.seed + repeat - 1)
            fold_splits = data_lib.make_folds(loaded.class_names, loaded.pool, cv.folds,
                                              settings.data.val_fraction,
                                              job.split_seed(settings) + repeat - 1)
            for number, splits in enumerate(fold_splits, start=1):
                folds.append(run_fold(seeded, seeded_components, loaded, splits, repeat,
                                      number, experiment_id, parent_id, run_name))
        refit = None
        if cv.refit:  # a child run of its own, before the parent is active again
            refit = train_refit(settings, components, loaded, folds, experiment_id, parent_id,
                                run_name, output_dir / "refit")
        with tracking.open_run(None, None, {}, parent_id):
            metrics = log_cross_validation(settings, components, loaded, positive, folds,
                                           output_dir)
            log_parent_model(settings, loaded, positive, folds, output_dir, refit)
    return CVResult(parent_id, metrics, folds)


def train_refit(settings: Config, components: Components, loaded: job.LoadedData,
                folds: Sequence[Fold], experiment_id: str, parent_id: str, run_name: str,
                output_dir: Path) -> tuple[keras.Model, int]:
    """cv.refit: one model on every image for the folds' median best epoch."""
    from experiments import refit  # trains a model: only when asked

    epochs = max(1, round(statistics.median(f.best_epoch for f in folds)))
    return refit.train_refit(settings, components, loaded, epochs, experiment_id, parent_id,
                             run_name, output_dir), epochs


def run_fold(settings: Config, components: Components, loaded: job.LoadedData,
             splits: data_lib.Splits, repeat: int, number: int, experiment_id: str,
             parent_id: str, run_name: str) -> Fold:
    """One fold as a child run of the parent."""
    prepared = build(settings, components, splits, loaded.skipped, loaded.image_size)
    fold_tags = {**job.run_tags(settings, prepared), "mlflow.parentRunId": parent_id,
                 "cv_parent": parent_id, "cv_fold": str(number), "cv_repeat": str(repeat)}
    output_dir = Path(settings.paths.output_dir)
    many = settings.cv.repeats > 1
    fold_dir = output_dir / (f"repeat_{repeat}" if many else "") / f"fold_{number}"
    label = f"repeat {repeat} fold {number}" if many else f"fold {number}"
    with tracking.open_run(experiment_id, f"{run_name} {label}", fold_tags) as run_id:
        print(f"{label.capitalize()}/{settings.cv.folds}: MLflow run {run_id}", flush=True)
        result, evaluation = job.train_and_evaluate(settings, components, prepared, fold_dir,
                                                    run_id)
    return Fold(repeat, number, evaluation, result, fold_dir / job.MODEL_DIR)


def log_cross_validation(settings: Config, components: Components, loaded: job.LoadedData,
                         positive: int, folds: list[Fold], output_dir: Path
                         ) -> dict[str, float]:
    """The parent run's config, pooled metrics, out-of-fold predictions and figures."""
    job.log_config(components, output_dir)
    metrics = pooled_metrics(folds, positive, settings.eval)
    tracking.log_metrics(metrics)
    folder = output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    class_names = loaded.class_names
    first = pooled(repeats_of(folds)[0])
    paths = [write_oof_predictions(folds, class_names, positive,
                                   folder / "test_predictions.csv"),
             evaluate.plot_confusion_matrix(first, class_names, folder / "confusion_matrix.png"),
             evaluate.plot_roc_curve(first, class_names, positive, folder / "roc_curve.png")]
    for path in paths:
        tracking.log_artifact(path)
    return metrics


def operating_point(folds: Sequence[Fold], positive: int,
                    settings: EvalConfig) -> tuple[float, float | None]:
    """Temperature and threshold for the parent's model, fitted on every pooled out-of-fold
    prediction (all training images, each from a model that did not train on it)."""
    pooled_raw = _concat([f.evaluation.test_raw for f in folds])
    return export.fit_operating_point(pooled_raw.labels, pooled_raw.probabilities, positive,
                                      settings.threshold, settings.fixed_threshold,
                                      settings.target_sensitivity, settings.temperature_scaling)


def log_parent_model(settings: Config, loaded: job.LoadedData, positive: int,
                     folds: list[Fold], output_dir: Path,
                     refit: tuple[keras.Model, int] | None) -> None:
    """The parent's model: the refit model when there is one, else the ensemble of the fold
    models."""
    temperature, threshold = operating_point(folds, positive, settings.eval)
    describe = {"backbone": settings.backbone.name, "patch_size": settings.data.patch_size,
                "stain_normalization": settings.data.stain_normalization}
    if refit is not None:
        model, epochs = refit
        kind = {"kind": "cv_refit", "epochs": epochs}
        tracking.set_tags({"estimate": "cross-validation: the refit model trained on every "
                           "image and has no test split of its own; its expected performance "
                           "is the pooled out-of-fold estimate of this run"})
    else:
        members = [inference.load_model(f.model_dir / inference.MODEL_FILE) for f in folds]
        model = export.ensemble(members)
        kind = {"kind": "cv_ensemble", "members": len(members)}
    info = export.model_info(loaded.class_names, loaded.image_size, positive, settings.eval.tta,
                             temperature, threshold, **describe, **kind)
    training = folds[0].training
    tracking.log_metrics({"model_temperature": temperature,
                          **({"model_threshold": threshold} if threshold is not None else {}),
                          f"best_{training.monitor}": float(np.mean([f.best_value
                                                                     for f in folds]))})
    job.log_run_model(model, info, output_dir / job.MODEL_DIR, settings.mlflow.register_as,
                      {"model_kind": kind["kind"], "checkpoint_monitor": training.monitor,
                       "checkpoint_mode": "max" if training.higher_is_better else "min"})
