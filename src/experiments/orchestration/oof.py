"""Out-of-fold results of a cross-validation: each fold's test predictions pooled (per repeat,
aligned by file) into the parent run's metrics with bootstrap intervals, the spread over folds
and repeats, and the parent's test_predictions.csv.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.config.schema import EvalConfig
from experiments.evaluation import figures, stats, tables
from experiments.evaluation import metrics as metrics_lib
from experiments.evaluation.cohorts import decision_line, patient_metrics, per_source_metrics
from experiments.evaluation.evaluate import Evaluation
from experiments.evaluation.metrics import Predictions
from experiments.serving.cascade import FALLBACK, FIRST
from experiments.serving.inference import decide
from experiments.training.callbacks import TrainResult

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


def concat_predictions(predictions: Sequence[Predictions]) -> Predictions:
    def joined(part: str) -> tuple[str, ...] | None:
        if any(getattr(p, part) is None for p in predictions):
            return None
        return tuple(value for p in predictions for value in getattr(p, part))
    return Predictions(tuple(f for p in predictions for f in p.files),
                       np.concatenate([p.labels for p in predictions]),
                       np.concatenate([p.probabilities for p in predictions]),
                       joined("groups"), joined("sources"))


def referred_of(folds: Sequence[Fold]) -> np.ndarray:
    """Whether each fold's referral referred each of its test images, in the order
    `concat_predictions` joins the folds' predictions."""
    flags = [f.evaluation.referred for f in folds]
    if any(flag is None for flag in flags):
        raise RuntimeError("A fold fitted no out-of-distribution referral")
    return np.concatenate([flag for flag in flags if flag is not None])


def at_half(pred: Predictions, threshold: float | None, positive: int) -> Predictions:
    """Shift p(positive) so that `threshold` maps to 0.5: the same decisions at 0.5, also for
    the mean of a patient's images (one fold holds all of them; no clipping to [0, 1], which
    would change that mean). Pools folds whose thresholds differ (each chosen on its own
    validation split) for the metrics of decisions only: the shift blurs the pooled ranking
    and calibration. No threshold: the predictions already decide at 0.5."""
    if threshold is None:
        return pred
    probabilities = pred.probabilities.copy()
    probabilities[:, positive] = probabilities[:, positive] - threshold + 0.5
    probabilities[:, 1 - positive] = 1 - probabilities[:, positive]
    return dataclasses.replace(pred, probabilities=probabilities)


def operating_point(folds: Sequence[Fold], positive: int, settings: EvalConfig,
                    source: str | None = None) -> tuple[float, float | None]:
    """Temperature and threshold for a cross-validation's model, fitted on its folds' pooled
    out-of-fold predictions (every training image, each from a model that did not train on
    it); with `source`, of that source's images only (cv.cascade's home model: the images it
    answers)."""
    pooled_raw = raw_out_of_fold(folds)
    if source is not None:
        pooled_raw = pooled_raw.subset(np.flatnonzero(np.asarray(pooled_raw.sources) == source))
    return stats.fit_operating_point(pooled_raw.labels, pooled_raw.probabilities, positive,
                                     settings.threshold, settings.fixed_threshold,
                                     settings.target_sensitivity, settings.temperature_scaling)


def raw_out_of_fold(folds: Sequence[Fold]) -> Predictions:
    """Every fold's test predictions with TTA, before temperature, pooled: what a
    cross-validation's operating point is fitted on (and its val_predictions.csv)."""
    return concat_predictions([f.evaluation.test_raw for f in folds])


def repeats_of(folds: Sequence[Fold]) -> list[list[Fold]]:
    """The folds grouped by repeat, in order."""
    return [[f for f in folds if f.repeat == r] for r in sorted({f.repeat for f in folds})]


def pooled(folds: Sequence[Fold], part: str = "plain") -> Predictions:
    """One repeat's out-of-fold predictions of `part` (an Evaluation attribute), by file."""
    joined = concat_predictions([getattr(f.evaluation, part) for f in folds])
    order = np.argsort(joined.files, kind="stable")
    return joined.subset(order)


def pooled_final(folds: Sequence[Fold], positive: int) -> Predictions:
    """One repeat's final out-of-fold predictions, each fold's shifted to decide at 0.5 as it
    did at its own threshold."""
    shifted = [dataclasses.replace(f, evaluation=dataclasses.replace(
        f.evaluation, test=at_half(f.evaluation.test, f.evaluation.threshold, positive)))
        for f in folds]
    return pooled(shifted, "test")


def stacked(folds: Sequence[Fold], part: str = "plain",
            positive: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), probabilities (R, n, C)) over repeats, aligned by file; with `positive`,
    each fold's final predictions shifted to decide at 0.5 as at its own threshold."""
    sets = []
    for repeat in repeats_of(folds):
        if positive is None:
            sets.append(pooled(repeat, part))
        else:
            sets.append(pooled_final(repeat, positive))
    return sets[0].labels, np.stack([s.probabilities for s in sets])


def _metrics(labels: np.ndarray, sets: np.ndarray, positive: int, settings: EvalConfig,
             prefix: str, groups: tuple[str, ...] | None) -> dict[str, float]:
    """Point metrics averaged over the sets of predictions, and bootstrap intervals (over
    patients when `groups` are known)."""
    points = [metrics_lib.classification_metrics(Predictions((), labels, p), positive, prefix)
              for p in sets]
    out = {name: float(np.mean([p[name] for p in points])) for name in points[0]}
    intervals = metrics_lib.interval_metrics(Predictions((), labels, sets, groups), positive,
                                             settings, prefix)
    return {**out, **intervals}


def source_metrics(folds: Sequence[Fold], positive: int, settings: EvalConfig
                   ) -> dict[str, float]:
    """test_source_<name>_* and test_patient_* of the pooled out-of-fold final predictions,
    the mean over repeats: ROC-AUC and calibration of the predictions as they are, decisions
    (accuracy, sensitivity, specificity) at each fold's own threshold. (Ranked after the
    shift to each fold's threshold, two sources' pooled ROC-AUC read 0.04 lower and the ECE
    twice as high with `eval.threshold=youden`.)"""
    per_repeat = []
    for repeat in repeats_of(folds):
        ranked, decided = pooled(repeat, "test"), pooled_final(repeat, positive)
        as_they_are = {**per_source_metrics(ranked, positive, 0.5, settings),
                       **patient_metrics(ranked, positive, 0.5, settings, "test_")}
        at_thresholds = {**per_source_metrics(decided, positive, 0.5, settings),
                         **patient_metrics(decided, positive, 0.5, settings, "test_")}
        per_repeat.append({name: (as_they_are if _of_ranking(name) else at_thresholds)[name]
                           for name in as_they_are})
    return {name: float(np.mean([m[name] for m in per_repeat])) for name in per_repeat[0]
            if all(name in m for m in per_repeat)}


def shipped_calibration(folds: Sequence[Fold], settings: EvalConfig) -> dict[str, float]:
    """test_shipped_ece (test_source_<name>_shipped_ece per source): the calibration error of
    the one temperature the parent ships (fitted on the pooled raw out-of-fold predictions),
    nested - each fold's raw predictions scaled by what the other folds' give - mean over
    repeats. test_ece takes each fold at its own validation temperature, so it describes the
    fold models: on the multi-source recipe it read 0.05-0.06 on BreakHis where the shipped
    temperature gives 0.13-0.16 (benchmarks/README.md, session 24)."""
    per_repeat = []
    for repeat in repeats_of(folds):
        raw = raw_out_of_fold(repeat)
        fold_of = np.concatenate([np.full(len(f.evaluation.test_raw.labels), f.number)
                                  for f in repeat])
        scaled = stats.nested_temperature(raw.labels, raw.probabilities, fold_of)[0] \
            if settings.temperature_scaling else raw.probabilities
        parts = {"test_": np.ones(len(fold_of), bool)}
        if raw.sources is not None:
            parts.update({f"test_source_{name}_": np.asarray(raw.sources) == name
                          for name in sorted(set(raw.sources))})
        per_repeat.append({f"{prefix}shipped_ece": stats.reliability_bins(
            raw.labels[part], scaled[part], settings.calibration_bins).ece
            for prefix, part in parts.items()})
    return {name: float(np.mean([m[name] for m in per_repeat])) for name in per_repeat[0]}


def _of_ranking(name: str) -> bool:
    """Whether a cohort metric depends on the probabilities, not on the decisions."""
    return "roc_auc" in name or name.endswith(("_ece", "_ece_calibrated_95", "_n_images",
                                               "_n_patients"))


def pooled_metrics(folds: Sequence[Fold], positive: int, settings: EvalConfig,
                   one_temperature: bool = True) -> dict[str, float]:
    """The parent run's metrics: test_* and test_tta_* of the pooled out-of-fold predictions
    with bootstrap intervals, test_op_* at each fold's own threshold, and the spread over
    folds (cv_<name>_mean/_std) and over repeats (cv_repeat_<name>_std); with
    `one_temperature` (a model with one operating point), `shipped_calibration`."""
    labels, plain = stacked(folds, "plain")
    groups = pooled(repeats_of(folds)[0]).groups  # each image's patient, when known
    metrics = _metrics(labels, plain, positive, settings, "test_", groups)
    if folds[0].evaluation.tta is not None:
        metrics.update(_metrics(labels, stacked(folds, "tta")[1], positive, settings,
                                "test_tta_", groups))
    if folds[0].evaluation.threshold is not None:
        op = metrics_lib.interval_metrics(
            Predictions((), labels, stacked(folds, positive=positive)[1], groups), positive,
            settings, "test_op_")
        metrics.update({k: v for k, v in op.items() if "roc_auc" not in k})
    if folds[0].evaluation.test.sources is not None or folds[0].evaluation.test.groups:
        metrics.update(source_metrics(folds, positive, settings))
    if one_temperature and len(repeats_of(folds)[0]) > 1:
        metrics.update(shipped_calibration(folds, settings))
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
            values = [metrics_lib.classification_metrics(pooled(r, part), positive, prefix)[name]
                      for r in repeats]
            metrics[f"cv_repeat_{name}_std"] = float(np.std(values, ddof=1))
    metrics["best_epoch"] = float(np.mean([f.best_epoch for f in folds]))
    return metrics


def write_oof_predictions(folds: Sequence[Fold], class_names: Sequence[str], positive: int,
                          path: Path, cascade: bool = False) -> Path:
    """test_predictions.csv of the parent: every image once per repeat, with its fold; of a
    cascade's folds (cv.cascade) also which model answered it (`answered_by`); its group and
    source when known."""
    rows = [(f, i) for f in folds for i in range(len(f.evaluation.plain.files))]
    plain = concat_predictions([f.evaluation.plain for f in folds])
    final = concat_predictions([f.evaluation.test for f in folds])
    header = ["file", "repeat", "fold", "label", "predicted", *[f"p_{c}" for c in class_names],
              *[f"final_p_{c}" for c in class_names], "threshold", "decision_at_threshold"]
    if folds[0].evaluation.threshold is None:
        thresholds = decisions = [""] * len(rows)
    else:
        per_row = np.array([f.evaluation.threshold for f, _ in rows])
        thresholds = [f"{t:.6f}" for t in per_row]
        decisions = [class_names[i] for i in decide(final.probabilities, positive, per_row)]
    columns = [plain.files, [f.repeat for f, _ in rows], [f.number for f, _ in rows],
               [class_names[label] for label in plain.labels],
               tables.predicted_names(plain, class_names), *tables.probability_columns(plain),
               *tables.probability_columns(final), thresholds, decisions]
    if cascade:
        header.append("answered_by")
        columns.append([FALLBACK if r else FIRST for r in referred_of(folds)])
    names, identities = tables.identity_columns(plain)
    return tables.write_table(path, [*header, *names], [*columns, *identities])


def write_oof_patients(folds: Sequence[Fold], class_names: Sequence[str], positive: int,
                       path: Path) -> Path:
    """test_patients.csv of the parent: each patient's pooled out-of-fold final predictions,
    decided at the threshold of the fold that held the patient out, one block per repeat."""
    parts: list[Predictions] = []
    thresholds: list[float | np.ndarray | None] = []
    for repeat in repeats_of(folds):
        parts.append(pooled(repeat, "test"))
        if repeat[0].evaluation.threshold is None:
            thresholds.append(None)
            continue
        files = [file for f in repeat for file in f.evaluation.test.files]
        per_image = np.concatenate([np.full(len(f.evaluation.test.files), f.evaluation.threshold)
                                    for f in repeat])
        thresholds.append(per_image[np.argsort(files, kind="stable")])
    return tables.write_patients(parts, class_names, positive, thresholds, path)


def plot_oof_patients(folds: Sequence[Fold], class_names: Sequence[str], positive: int,
                      path: Path) -> Path | None:
    """test_patients.png of the parent: each patient's images in the first repeat's pooled
    out-of-fold final predictions (`figures.plot_patients`), with the threshold when every
    fold decided at the same one."""
    repeat = repeats_of(folds)[0]
    cuts = {f.evaluation.threshold for f in repeat}
    threshold = decision_line(cuts.pop(), len(class_names)) if len(cuts) == 1 else None
    return figures.plot_patients(pooled(repeat, "test"), class_names, positive, threshold,
                                 path, "patients, out of fold")
