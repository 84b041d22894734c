"""Pooled out-of-fold metrics per source and per patient: ranking and calibration of the
predictions as they are, decisions at each fold's own threshold."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from experiments.config.schema import EvalConfig
from experiments.evaluation import stats
from experiments.evaluation.evaluate import Evaluation
from experiments.evaluation.metrics import Predictions
from experiments.orchestration.oof import Fold, shipped_calibration, source_metrics
from experiments.training.callbacks import TrainResult


def fold(number: int, files, labels, p, patients, threshold: float,
         sources: tuple[str, ...] | None = None) -> Fold:
    pred = Predictions(tuple(files), np.asarray(labels), np.stack([1 - p, p], axis=1),
                       tuple(patients), sources or tuple("bh" for _ in files))
    evaluation = Evaluation({}, pred, None, pred, pred, pred, threshold)
    training = TrainResult({}, 1, 0.0, "val_loss", False, None)
    return Fold(1, number, evaluation, training, None)


def test_source_metrics_rank_the_predictions_as_they_are_and_decide_at_each_folds_threshold():
    """Two folds of one source, each deciding at its own threshold (0.2 and 0.8). Shifted to
    decide at 0.5 (and clipped), fold 1's benign 0.7 became 1.0 and fold 2's malignant 0.95
    became 0.65: the pooled ROC-AUC and the ECE were those of other numbers."""
    p1, p2 = np.array([0.1, 0.7, 0.75, 0.9]), np.array([0.3, 0.6, 0.85, 0.95])
    labels1, labels2 = [0, 0, 1, 1], [0, 0, 1, 1]
    folds = [fold(1, ["a1", "a2", "a3", "a4"], labels1, p1, ["A", "A", "B", "B"], 0.2),
             fold(2, ["b1", "b2", "b3", "b4"], labels2, p2, ["C", "C", "D", "D"], 0.8)]
    settings = EvalConfig(seed=0, bootstrap_resamples=200)
    metrics = source_metrics(folds, 1, settings)
    labels, p = np.r_[labels1, labels2], np.r_[p1, p2]
    assert metrics["test_source_bh_roc_auc"] == pytest.approx(roc_auc_score(labels, p))
    assert metrics["test_source_bh_ece"] == pytest.approx(stats.reliability_bins(
        labels, np.stack([1 - p, p], axis=1), settings.calibration_bins).ece)
    # decisions: fold 1 at 0.2 calls its benign 0.7 malignant, fold 2 at 0.8 is right 4 times
    assert metrics["test_source_bh_accuracy"] == pytest.approx(7 / 8)
    assert metrics["test_source_bh_specificity"] == pytest.approx(3 / 4)
    # patients (mean probability): A 0.4 (wrong), B 0.825 at 0.2; C 0.45, D 0.9 at 0.8
    assert metrics["test_source_bh_patient_accuracy"] == pytest.approx(3 / 4)
    assert metrics["test_source_bh_patient_roc_auc"] == pytest.approx(
        roc_auc_score([0, 1, 0, 1], [0.4, 0.825, 0.45, 0.9]))
    assert metrics["test_patient_roc_auc"] == metrics["test_source_bh_patient_roc_auc"]


def test_the_shipped_temperature_is_scored_on_the_folds_it_was_not_fitted_on():
    """A sharp fold (its probe chose a large C) and a soft one: each fold's own temperature
    would calibrate it, the one shipped temperature cannot serve both. test_shipped_ece scales
    each fold by the temperature the other fold's raw predictions give, per source too."""
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 20)
    margin = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 1.2, 40)
    sharp, soft = 1 / (1 + np.exp(-4 * margin[:20])), 1 / (1 + np.exp(-0.5 * margin[20:]))
    sources = tuple(["seed", "bh"] * 10)
    folds = [fold(1, [f"a{i}" for i in range(20)], labels[:20], sharp, ["A"] * 20, 0.5,
                  sources),
             fold(2, [f"b{i}" for i in range(20)], labels[20:], soft, ["B"] * 20, 0.5,
                  sources)]
    settings = EvalConfig(seed=0)
    metrics = shipped_calibration(folds, settings)

    def two(p: np.ndarray) -> np.ndarray:
        return np.stack([1 - p, p], axis=1)

    t_sharp = stats.fit_temperature(labels[:20], two(sharp))
    t_soft = stats.fit_temperature(labels[20:], two(soft))
    assert t_sharp > 1.5 and t_soft < 0.7  # the folds want opposite corrections
    scaled = np.concatenate([stats.apply_temperature(two(sharp), t_soft),
                             stats.apply_temperature(two(soft), t_sharp)])
    assert metrics["test_shipped_ece"] == pytest.approx(
        stats.reliability_bins(labels, scaled, settings.calibration_bins).ece)
    bh = np.asarray(sources * 2) == "bh"
    assert metrics["test_source_bh_shipped_ece"] == pytest.approx(
        stats.reliability_bins(labels[bh], scaled[bh], settings.calibration_bins).ece)
    own = np.concatenate([stats.apply_temperature(two(sharp), t_sharp),
                          stats.apply_temperature(two(soft), t_soft)])
    assert metrics["test_shipped_ece"] > stats.reliability_bins(
        labels, own, settings.calibration_bins).ece + 0.05  # worse than each at its own
    unscaled = shipped_calibration(folds, EvalConfig(seed=0, temperature_scaling=False))
    assert unscaled["test_shipped_ece"] == pytest.approx(stats.reliability_bins(
        labels, two(np.r_[sharp, soft]), settings.calibration_bins).ece)
