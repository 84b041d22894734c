"""`eval.external`: after training, the run's final model - loaded from the files the run just
logged as its MLflow model, so the numbers are those `experiments.predict` and serving give -
scores each external cohort. The run logs ext_<name>_* metrics with intervals, a ROC curve and
the predictions CSV per cohort. Cohorts are scanned before training and take no part in it.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.config.schema import EvalConfig
from experiments.data.cohorts import CohortFiles
from experiments.evaluation.cohorts import cohort_metrics, cohort_roc
from experiments.evaluation.metrics import Predictions
from experiments.serving.inference import MODEL_FILE, Predictor
from experiments.tracking import records

log = logging.getLogger(__name__)

CHUNK = 128  # images decoded and scored at a time: a cohort of any size fits in memory


def score_files(predictor: Predictor, files: Sequence[str],
                batch_size: int) -> list[dict[str, object]]:
    """`Predictor.score` rows of every file (an unreadable one gets its error, no scores)."""
    rows: list[dict[str, object]] = []
    for start in range(0, len(files), CHUNK):
        rows += predictor.score(files[start:start + CHUNK], batch_size=batch_size)
    return rows


def cohort_predictions(cohort: CohortFiles, rows: Sequence[dict[str, object]],
                       class_names: Sequence[str]) -> Predictions:
    """The readable images' final probabilities (TTA and temperature applied)."""
    keep = [i for i, row in enumerate(rows) if not row["error"]]
    probabilities = np.array([[rows[i][f"p_{c}"] for c in class_names] for i in keep],
                             dtype=float)
    groups = None if cohort.groups is None else tuple(cohort.groups[i] for i in keep)
    return Predictions(tuple(cohort.files[i] for i in keep), cohort.labels[keep],
                       probabilities.reshape(len(keep), len(class_names)), groups)


def write_cohort_table(cohort: CohortFiles, rows: Sequence[dict[str, object]],
                       class_names: Sequence[str], path: Path) -> Path:
    """One row per image: file, group, label, p_<class>..., predicted, decision, error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    probability = [f"p_{c}" for c in class_names]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "group", "label", *probability, "predicted", "decision",
                         "error"])
        for i, row in enumerate(rows):
            group = "" if cohort.groups is None else cohort.groups[i]
            scores = ["" if row["error"] else f"{row[p]:.6f}" for p in probability]
            writer.writerow([cohort.files[i], group, class_names[cohort.labels[i]], *scores,
                             row["predicted"], row["decision"], row["error"]])
    return path


def evaluate_cohorts(cohorts: Sequence[CohortFiles], model_dir: Path, settings: EvalConfig,
                     batch_size: int, folder: Path, run_id: str) -> dict[str, float]:
    """Score every cohort with the model in `model_dir` and log, into the active run `run_id`, its
    metrics (each once: a resumed run does not log them twice), ROC curve and predictions
    under external/<name>/. Returns the metrics."""
    if not cohorts:
        return {}
    predictor = Predictor.load(model_dir / MODEL_FILE)
    info = predictor.info
    class_names = list(info.class_names)
    positive = class_names.index(info.positive_class or class_names[-1])
    metrics: dict[str, float] = {}
    for cohort in cohorts:
        name = cohort.cohort.name
        log.info(f"External cohort {name!r}: scoring {len(cohort.files)} images "
                 f"({cohort.cohort.root})")
        rows = score_files(predictor, cohort.files, batch_size)
        pred = cohort_predictions(cohort, rows, class_names)
        prefix = f"ext_{name}_"
        found = {f"{prefix}n_unreadable": float(len(rows) - len(pred.labels))}
        if len(pred.labels):
            found.update(cohort_metrics(pred, positive, info.threshold, settings, prefix))
        metrics.update(found)
        out = folder / name
        paths = [write_cohort_table(cohort, rows, class_names, out / "predictions.csv")]
        roc = cohort_roc(pred, class_names, positive, name, out / "roc_curve.png")
        paths += [roc] if roc is not None else []
        for path in paths:
            records.log_artifact(path, f"external/{name}")
        accuracy = found.get(f"{prefix}accuracy", float("nan"))
        auc = found.get(f"{prefix}roc_auc", float("nan"))
        log.info(f"  {name}: accuracy {accuracy:.3f}, ROC-AUC {auc:.3f} "
                 f"({int(found[f'{prefix}n_unreadable'])} unreadable)")
    records.log_new_metrics(run_id, metrics)
    return metrics

