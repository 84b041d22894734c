"""Metrics of a model on an external cohort: per image and, when patients are known, per
patient, each with a bootstrap interval that resamples patients (images of one patient are
strongly correlated; BreakHis reports a patient-level rate for that reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from experiments.config.schema import EvalConfig
from experiments.evaluation import stats
from experiments.evaluation.figures import plot_roc_curve
from experiments.evaluation.metrics import Predictions, interval_metrics
from experiments.serving.ood import OodReference


def decisions(probabilities: np.ndarray, positive: int, threshold: float | None) -> np.ndarray:
    """Each image's class index as the model decides it: at the threshold on p(positive) for
    two classes, else the most probable class."""
    if probabilities.shape[1] == 2 and threshold is not None:
        return np.where(probabilities[:, positive] >= threshold, positive, 1 - positive)
    return probabilities.argmax(axis=1)


def decision_line(threshold: float | None, n_classes: int) -> float | None:
    """Where p(positive) is cut: the model's threshold, else 0.5 for two classes (as the
    patient-level metrics decide); None for more classes (the most probable class)."""
    return 0.5 if threshold is None and n_classes == 2 else threshold


def per_patient(pred: Predictions) -> Predictions:
    """One row per patient and class: the mean of its images' probabilities (the patient's
    label is its images' label; a patient with images of two classes gives a row per class).
    Rows are named by patient and ordered by name."""
    patients = pred.patients("per_patient")
    return Predictions(tuple(g for g, _, _ in patients),
                       np.array([y for _, y, _ in patients], dtype=int),
                       np.stack([pred.probabilities[i].mean(axis=0) for _, _, i in patients]))


def patient_recognition_rate(pred: Predictions, positive: int,
                             threshold: float | None) -> float:
    """BreakHis' patient-level recognition rate (Spanhol et al. 2016): the mean over patients of
    the fraction of each patient's images classified correctly."""
    if pred.groups is None:
        raise ValueError("patient_recognition_rate needs each image's group. Received: None")
    correct = decisions(pred.probabilities, positive, threshold) == pred.labels
    groups = np.asarray(pred.groups)
    return float(np.mean([correct[groups == g].mean() for g in np.unique(groups)]))


def cohort_metrics(pred: Predictions, positive: int, threshold: float | None,
                   settings: EvalConfig, prefix: str) -> dict[str, float]:
    """<prefix>accuracy, _roc_auc, _sensitivity, _specificity (at the model's threshold) with
    _ci_low/_ci_high, _ece, _ece_calibrated_95 (the ECE a calibrated model stays under 95% of
    the time on as many images: `stats.calibrated_ece_quantile`) and _n_images; with groups
    also <prefix>patient_* (the mean probability per patient) and
    <prefix>patient_recognition_rate. A metric a cohort lacks
    the class for (ROC-AUC of a one-class cohort) is left out, not logged as NaN."""
    cut = 0.5 if threshold is None else threshold
    out = {**interval_metrics(pred, positive, settings, prefix, cut),
           f"{prefix}ece": stats.reliability_bins(pred.labels, pred.probabilities,
                                                  settings.calibration_bins).ece,
           f"{prefix}ece_calibrated_95": stats.calibrated_ece_quantile(
               pred.probabilities, settings.calibration_bins, seed=settings.seed),
           f"{prefix}n_images": float(len(pred.labels))}
    return {**out, **patient_metrics(pred, positive, threshold, settings, prefix)}


def patient_metrics(pred: Predictions, positive: int, threshold: float | None,
                    settings: EvalConfig, prefix: str) -> dict[str, float]:
    """<prefix>patient_* metrics of the mean probability per patient with intervals over
    patients, <prefix>patient_recognition_rate and <prefix>n_patients; none without groups."""
    if pred.groups is None:
        return {}
    cut = 0.5 if threshold is None else threshold
    return {**interval_metrics(per_patient(pred), positive, settings, f"{prefix}patient_", cut),
            f"{prefix}patient_recognition_rate": patient_recognition_rate(pred, positive,
                                                                          threshold),
            f"{prefix}n_patients": float(len(set(pred.groups)))}


def per_source_metrics(pred: Predictions, positive: int, threshold: float | None,
                       settings: EvalConfig) -> dict[str, float]:
    """`cohort_metrics` of each source's test images as test_source_<name>_* (none when the
    run trained on one source)."""
    if pred.sources is None:
        return {}
    sources = np.asarray(pred.sources)
    out: dict[str, float] = {}
    for name in np.unique(sources):
        part = pred.subset(np.flatnonzero(sources == name))
        out.update(cohort_metrics(part, positive, threshold, settings, f"test_source_{name}_"))
    return out


def referral_metrics(scores: np.ndarray, correct: np.ndarray, ood: OodReference, prefix: str,
                     foreign: bool) -> dict[str, float]:
    """<prefix>referred (the share of images over the out-of-distribution threshold) and
    <prefix>accepted_accuracy (accuracy on the others); for a foreign cohort also
    <prefix>ood_auroc, how well the score tells its images from same-source images the
    reference did not contain (its held-out scores)."""
    referred = ood.refer(scores)
    out = {f"{prefix}referred": float(referred.mean()) if len(scores) else float("nan")}
    if (~referred).any():
        out[f"{prefix}accepted_accuracy"] = float(np.asarray(correct)[~referred].mean())
    if foreign and len(scores):
        out[f"{prefix}ood_auroc"] = ood_auroc(scores, ood)
    return out


def ood_auroc(scores: np.ndarray, ood: OodReference) -> float:
    """How well the out-of-distribution score tells a foreign cohort's images (`scores`)
    from same-source images the reference did not contain (its held-out scores)."""
    truth = np.r_[np.zeros(len(ood.held_out)), np.ones(len(scores))]
    return float(roc_auc_score(truth, np.r_[ood.held_out, scores]))


def cohort_roc(pred: Predictions, class_names: Sequence[str], positive: int, name: str,
               path: Path) -> Path | None:
    """The cohort's ROC curve, or None when it holds one class only."""
    if len(np.unique(pred.labels)) < 2:
        return None
    return plot_roc_curve(pred, class_names, positive, path, f"ROC curve, cohort {name!r}")
