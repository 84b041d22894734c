"""`eval.external`: after training, the run's final model - loaded from the files the run just
logged as its MLflow model, so the numbers are those `experiments.predict` and serving give -
scores each external cohort. The run logs ext_<name>_* metrics with intervals, a ROC curve and
the predictions CSV per cohort. Cohorts are scanned before training and take no part in it.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from experiments.config.schema import Config, EvalConfig
from experiments.data.cohorts import CohortFiles
from experiments.data.image_store import ImageArray
from experiments.errors import DataError
from experiments.evaluation import evaluate, stats
from experiments.evaluation.cohorts import (
    cohort_metrics,
    cohort_roc,
    decision_line,
    decisions,
    ood_auroc,
    referral_metrics,
)
from experiments.evaluation.figures import plot_patients, plot_reliability
from experiments.evaluation.metrics import Predictions
from experiments.evaluation.tables import write_patients
from experiments.models.adapt import adapt_batchnorm
from experiments.serving import export
from experiments.serving.cascade import FALLBACK_DIR, FIRST, Cascade, load_folder
from experiments.serving.inference import MODEL_FILE, REFER, Predictor
from experiments.serving.ood import OodReference, fit_reference
from experiments.tracking import records
from experiments.training.build import ood_reference_coverage

log = logging.getLogger(__name__)

CHUNK = 128  # images decoded and scored at a time: a cohort of any size fits in memory


def score_files(predictor: Predictor | Cascade, files: Sequence[str], batch_size: int,
                mpp: float | None = None) -> list[dict[str, object]]:
    """`Predictor.score` rows of every file (an unreadable one gets its error, no scores)."""
    rows: list[dict[str, object]] = []
    for start in range(0, len(files), CHUNK):
        rows += predictor.score(files[start:start + CHUNK], batch_size=batch_size, mpp=mpp)
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
    """One row per image: file, group, label, p_<class>..., predicted, decision, ood_score
    (when the model has a reference), a cascade's answered_by, error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    first = rows[0] if rows else {}
    scored = [f"p_{c}" for c in class_names] + (["ood_score"] if "ood_score" in first else [])
    named = ["answered_by"] if "answered_by" in first else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "group", "label", *scored[:len(class_names)], "predicted",
                         "decision", *scored[len(class_names):], *named, "error"])
        for i, row in enumerate(rows):
            group = "" if cohort.groups is None else cohort.groups[i]
            values = ["" if row["error"] else f"{row[p]:.6f}" for p in scored]
            writer.writerow([cohort.files[i], group, class_names[cohort.labels[i]],
                             *values[:len(class_names)], row["predicted"], row["decision"],
                             *values[len(class_names):], *(row[n] for n in named),
                             row["error"]])
    return path


def cohort_referral(ood: OodReference, rows: Sequence[dict[str, object]],
                    cohort: CohortFiles, class_names: Sequence[str],
                    prefix: str) -> dict[str, float]:
    """<prefix>referred, _accepted_accuracy (the model's own decision, else its most probable
    class, against the label) and _ood_auroc of the cohort's readable images."""
    readable = [i for i, row in enumerate(rows) if not row["error"]]
    scores = np.array([rows[i]["ood_score"] for i in readable], dtype=float)
    answer = [str(rows[i]["decision"] or rows[i]["predicted"]) for i in readable]
    truth = [class_names[cohort.labels[i]] for i in readable]
    correct = np.array([a == t for a, t in zip(answer, truth, strict=True)])
    return referral_metrics(scores, correct, ood, prefix, foreign=True)


def cascade_referral(cascade: Cascade, rows: Sequence[dict[str, object]], cohort: CohortFiles,
                     class_names: Sequence[str], prefix: str) -> dict[str, float]:
    """A cascade's <prefix>answered_by_first (the share its first model kept), _referred and
    _accepted_accuracy of its final answers (the fallback's own referral may still refer),
    and _ood_auroc of the first model's score, which decides who answers."""
    readable = [i for i, row in enumerate(rows) if not row["error"]]
    answers = np.array([str(rows[i]["decision"]) for i in readable])
    truth = np.array([class_names[cohort.labels[i]] for i in readable])
    referred = answers == REFER
    out = {f"{prefix}answered_by_first": float(np.mean([rows[i]["answered_by"] == FIRST
                                                        for i in readable])),
           f"{prefix}referred": float(referred.mean())}
    if (~referred).any():
        out[f"{prefix}accepted_accuracy"] = float((answers == truth)[~referred].mean())
    if cascade.first.ood is not None and readable:  # always (a cascade's first model refers)
        scores = np.array([rows[i]["ood_score"] for i in readable], dtype=float)
        out[f"{prefix}ood_auroc"] = ood_auroc(scores, cascade.first.ood)
    return out


def evaluate_cohorts(cohorts: Sequence[CohortFiles], model_dir: Path, settings: EvalConfig,
                     batch_size: int, folder: Path, run_id: str) -> dict[str, float]:
    """Score every cohort with the model in `model_dir` and log, into the active run `run_id`,
    its metrics (each once: a resumed run does not log them twice), ROC curve and predictions
    under external/<name>/; a cohort with `adapt` also as <name>_adabn, by the model with its
    BatchNorm statistics adapted to the cohort's images. Returns the metrics."""
    if not cohorts:
        return {}
    predictor = load_folder(model_dir)
    metrics: dict[str, float] = {}
    for cohort in cohorts:
        metrics.update(score_cohort(predictor, cohort, cohort.cohort.name, settings,
                                    batch_size, folder))
        if cohort.cohort.adapt:
            # a fresh copy to adapt (of a cascade, its fallback: the model that answers other
            # sources' images); its features move, so the reference of the training images'
            # features no longer describes them: no referral for it
            own = model_dir / FALLBACK_DIR if isinstance(predictor, Cascade) else model_dir
            adapted = dataclasses.replace(Predictor.load(own / MODEL_FILE), ood=None)
            images, _ = adapted.decode(cohort.files, cohort.files, mpp=cohort.cohort.mpp)
            if images is None or len(images) < 2:
                raise DataError(f"eval.external.{cohort.cohort.name}.adapt needs 2 readable "
                                "images")
            adapt_batchnorm(adapted.model, images, batch_size)
            metrics.update(score_cohort(adapted, cohort, f"{cohort.cohort.name}_adabn",
                                        settings, batch_size, folder))
    records.log_new_metrics(run_id, metrics)
    return metrics


def score_cohort(predictor: Predictor | Cascade, cohort: CohortFiles, name: str,
                 settings: EvalConfig, batch_size: int, folder: Path) -> dict[str, float]:
    """One cohort's ext_<name>_* metrics; its table and ROC curve logged as artifacts."""
    info = predictor.info
    class_names = list(info.class_names)
    positive = class_names.index(info.positive_class or class_names[-1])
    log.info(f"External cohort {name!r}: scoring {len(cohort.files)} images "
             f"({cohort.cohort.root})")
    rows = score_files(predictor, cohort.files, batch_size, cohort.cohort.mpp)
    pred = cohort_predictions(cohort, rows, class_names)
    prefix = f"ext_{name}_"
    found = {f"{prefix}n_unreadable": float(len(rows) - len(pred.labels))}
    if len(pred.labels):
        found.update(cohort_metrics(pred, positive, info.threshold, settings, prefix))
    if isinstance(predictor, Cascade) and len(pred.labels):
        found.update(cascade_referral(predictor, rows, cohort, class_names, prefix))
    elif isinstance(predictor, Predictor) and predictor.ood is not None and len(pred.labels):
        found.update(cohort_referral(predictor.ood, rows, cohort, class_names, prefix))
    out = folder / name
    paths = [write_cohort_table(cohort, rows, class_names, out / "predictions.csv")]
    if len(pred.labels):
        paths += cohort_figures(pred, class_names, positive, info.threshold, settings, name, out)
    if pred.groups is not None and len(pred.labels):
        paths.append(write_patients([pred], class_names, positive, [info.threshold],
                                    out / "patients.csv"))
    for path in paths:
        records.log_artifact(path, f"external/{name}")
    accuracy = found.get(f"{prefix}accuracy", float("nan"))
    auc = found.get(f"{prefix}roc_auc", float("nan"))
    log.info(f"  {name}: accuracy {accuracy:.3f}, ROC-AUC {auc:.3f} "
             f"({int(found[f'{prefix}n_unreadable'])} unreadable)")
    return found


def cohort_figures(pred: Predictions, class_names: list[str], positive: int,
                   threshold: float | None, settings: EvalConfig, name: str, out: Path
                   ) -> list[Path]:
    """A cohort's ROC curve (two classes present), reliability diagram and, with patients,
    each patient's images (`figures.plot_patients`)."""
    bins = stats.reliability_bins(pred.labels, pred.probabilities, settings.calibration_bins)
    found = [cohort_roc(pred, class_names, positive, name, out / "roc_curve.png"),
             plot_reliability({name: bins}, out / "reliability_diagram.png",
                              f"reliability, cohort {name!r}"),
             plot_patients(pred, class_names, positive,
                           decision_line(threshold, len(class_names)), out / "patients.png",
                           f"patients, cohort {name!r}")]
    return [path for path in found if path is not None]


def fit_ood(settings: Config, model: keras.Model, images: ImageArray,
            features: np.ndarray | None = None) -> OodReference | None:
    """The model's out-of-distribution reference on its training images, if the run fits one
    (`ood_reference_coverage`), with their stain statistics when eval.ood_stain. `features`:
    the model's pooled features of `images` when a frozen backbone's cache already holds them
    (no second pass)."""
    if (coverage := ood_reference_coverage(settings)) is None:
        return None
    if features is None:
        images = np.asarray(images)  # read once: a lazy store decodes its files on every read
        features = export.pooled_features(model, images)
    if features is None:  # the model has no pooled features
        return None
    return fit_reference(features, coverage, seed=settings.eval.seed,
                         images=np.asarray(images) if settings.eval.ood_stain else None)


def referral_scores(model: keras.Model, ood: OodReference, images: ImageArray,
                    features: np.ndarray | None = None) -> np.ndarray | None:
    """The out-of-distribution scores of `images` (None when the model has no pooled
    features); `features` as for `fit_ood`."""
    if features is None:
        images = np.asarray(images)  # read once: a lazy store decodes its files on every read
        features = export.pooled_features(model, images)
    if features is None:
        return None
    return ood.score(features, None if ood.stain is None else np.asarray(images))


def test_referral(ood: OodReference, evaluation: evaluate.Evaluation, scores: np.ndarray,
                  positive: int) -> dict[str, float]:
    """test_referred and test_accepted_accuracy: how many same-source test images (their
    `scores`) the model would refer, and its accuracy on the rest (at the validation
    threshold)."""
    test = evaluation.test
    correct = decisions(test.probabilities, positive, evaluation.threshold) == test.labels
    return referral_metrics(scores, correct, ood, "test_", foreign=False)
