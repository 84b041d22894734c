"""Cross-validation results: the folds' out-of-fold test predictions pooled into one set
(every image tested once, by the model that never saw it), their metrics with bootstrap
intervals, and the folds' spread (mean +- std)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import evaluate, stats
from experiments.evaluate import Evaluation, Predictions
from experiments.schema import EvalConfig

# Fold metrics summarised as cv_<name>_mean / cv_<name>_std on the parent run.
SPREAD_METRICS = ("test_accuracy", "test_roc_auc", "test_sensitivity", "test_specificity",
                  "test_tta_accuracy", "test_tta_roc_auc", "test_op_sensitivity",
                  "test_op_specificity", "best_epoch")


@dataclass(frozen=True)
class Fold:
    number: int  # 1-based
    evaluation: Evaluation
    best_epoch: int
    best_value: float


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


def pooled_metrics(folds: Sequence[Fold], positive: int, settings: EvalConfig
                   ) -> dict[str, float]:
    """The parent run's metrics: test_* and test_tta_* of the pooled out-of-fold predictions
    with bootstrap intervals, test_op_* at each fold's own threshold, and the folds' spread."""
    plain = pooled_plain(folds)
    metrics = {**evaluate.classification_metrics(plain, positive, "test_"),
               **evaluate.interval_metrics(plain, positive, settings, "test_")}
    if folds[0].evaluation.tta is not None:
        tta = _concat([f.evaluation.tta for f in folds])
        metrics.update(evaluate.classification_metrics(tta, positive, "test_tta_"))
        metrics.update(evaluate.interval_metrics(tta, positive, settings, "test_tta_"))
    if folds[0].evaluation.threshold is not None:
        shifted = _concat([at_half(f.evaluation.test, f.evaluation.threshold, positive)
                           for f in folds])
        op = evaluate.interval_metrics(shifted, positive, settings, "test_op_")
        metrics.update({k: v for k, v in op.items() if "roc_auc" not in k})
    for name in SPREAD_METRICS:
        values = [f.evaluation.metrics.get(name, float("nan")) if name != "best_epoch"
                  else f.best_epoch for f in folds]
        if not np.isnan(values).any():
            metrics[f"cv_{name}_mean"] = float(np.mean(values))
            metrics[f"cv_{name}_std"] = float(np.std(values, ddof=1))
    metrics["best_epoch"] = float(np.mean([f.best_epoch for f in folds]))
    return metrics


def write_oof_predictions(folds: Sequence[Fold], class_names: Sequence[str], positive: int,
                          path: Path) -> Path:
    """test_predictions.csv of the parent: every image once, with its fold."""
    plain = pooled_plain(folds)
    final = _concat([f.evaluation.test for f in folds])
    header = ["file", "fold", "label", "predicted", *[f"p_{c}" for c in class_names],
              *[f"final_p_{c}" for c in class_names], "threshold", "decision_at_threshold"]
    fold_of = [fold.number for fold in folds for _ in fold.evaluation.plain.files]
    if folds[0].evaluation.threshold is None:
        thresholds = decisions = [""] * len(fold_of)
    else:
        per_row = np.array([fold.evaluation.threshold for fold in folds
                            for _ in fold.evaluation.plain.files])
        thresholds = [f"{t:.6f}" for t in per_row]
        decisions = [class_names[i] for i in stats.decide(final.probabilities, positive, per_row)]
    return evaluate.write_table(path, header, [
        plain.files, fold_of, [class_names[label] for label in plain.labels],
        evaluate.predicted_names(plain, class_names), *evaluate.probability_columns(plain),
        *evaluate.probability_columns(final), thresholds, decisions])


def pooled_plain(folds: Sequence[Fold]) -> Predictions:
    return _concat([f.evaluation.plain for f in folds])
