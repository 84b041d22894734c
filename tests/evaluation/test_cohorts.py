"""External-cohort metrics: patient aggregation, patient resampling, one-class cohorts."""

from __future__ import annotations

import csv
import dataclasses
import logging

import numpy as np
import pytest

from experiments.config.schema import EvalConfig
from experiments.evaluation import stats
from experiments.evaluation.cohorts import cohort_metrics, patient_recognition_rate, per_patient
from experiments.evaluation.metrics import Predictions
from experiments.evaluation.tables import write_patients
from experiments.tracking.summary import warn_backwards


def probs(p_positive: list[float]) -> np.ndarray:
    p = np.asarray(p_positive)
    return np.stack([1 - p, p], axis=1)


def test_patient_aggregation_matches_a_hand_computed_example():
    # patient A (benign): 0.2, 0.4, 0.9 -> mean 0.5; patient B (malignant): 0.8, 0.6 -> 0.7
    pred = Predictions(("a1", "a2", "a3", "b1", "b2"), np.array([0, 0, 0, 1, 1]),
                       probs([0.2, 0.4, 0.9, 0.8, 0.6]), ("A", "A", "A", "B", "B"))
    patients = per_patient(pred)
    assert patients.files == ("A", "B")
    np.testing.assert_array_equal(patients.labels, [0, 1])
    np.testing.assert_allclose(patients.probabilities[:, 1], [0.5, 0.7])
    # BreakHis' rate at threshold 0.5: A has 2 of 3 right, B 2 of 2 -> (2/3 + 1) / 2
    assert patient_recognition_rate(pred, 1, 0.5) == pytest.approx((2 / 3 + 1) / 2)
    # at threshold 0.7: A still 2 of 3 (0.9 is called malignant), B 1 of 2 (0.6 is not)
    assert patient_recognition_rate(pred, 1, 0.7) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_the_patient_table_matches_a_hand_computed_example(tmp_path):
    # as above: A (benign) 0.2, 0.4, 0.9 -> 0.5; B (malignant) 0.8, 0.6 -> 0.7
    pred = Predictions(("a1", "a2", "a3", "b1", "b2"), np.array([0, 0, 0, 1, 1]),
                       probs([0.2, 0.4, 0.9, 0.8, 0.6]), ("A", "A", "A", "B", "B"))
    names = ["benign", "malignant"]
    with write_patients([pred], names, 1, [0.7], tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # at 0.7: A's mean 0.5 is benign (right; 2 of 3 images right), B's 0.7 malignant (right;
    # 0.6 is not: 1 of 2)
    assert [(r["patient"], r["label"], r["n_images"], r["decision"], r["correct"]) for r in rows
            ] == [("A", "benign", "3", "benign", "1"), ("B", "malignant", "2", "malignant", "1")]
    assert [float(r["p_malignant"]) for r in rows] == pytest.approx([0.5, 0.7])
    assert [float(r["images_correct"]) for r in rows] == pytest.approx([2 / 3, 1 / 2])
    # per-image thresholds (a cross-validation's folds) and a second repeat: A at 0.4 is
    # called malignant (wrong); without one at 0.5 as the patient-level metrics (A's 0.5 too)
    with write_patients([pred, pred], names, 1, [np.array([0.4] * 3 + [0.5] * 2), None],
                        tmp_path / "q.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["repeat"], r["patient"], r["decision"], r["correct"]) for r in rows] == [
        ("0", "A", "malignant", "0"), ("0", "B", "malignant", "1"),
        ("1", "A", "malignant", "0"), ("1", "B", "malignant", "1")]


def test_the_patients_figure_draws_patients_of_several_images_only(tmp_path):
    from PIL import Image

    from experiments.evaluation.figures import plot_patients

    names = ["benign", "malignant"]
    pred = Predictions(("a1", "a2", "b1", "b2", "c1"), np.array([0, 0, 1, 1, 1]),
                       probs([0.2, 0.4, 0.8, 0.6, 0.9]), ("A", "A", "B", "B", "C"))
    two = plot_patients(pred, names, 1, 0.5, tmp_path / "p.png", "patients")
    more = Predictions(pred.files * 2, np.tile(pred.labels, 2), np.tile(pred.probabilities, (2, 1)),
                       ("A", "A", "B", "B", "C", "E", "E", "F", "F", "G"))
    four = plot_patients(more, names, 1, 0.5, tmp_path / "p4.png", "patients")
    with Image.open(two) as small, Image.open(four) as tall:  # a row per patient
        assert small.format == tall.format == "PNG" and tall.size[1] > small.size[1]
    # without groups, or with one patient of two images (C is one image: its own row of one)
    assert plot_patients(dataclasses.replace(pred, groups=None), names, 1, 0.5,
                         tmp_path / "q.png", "x") is None
    assert plot_patients(dataclasses.replace(pred, groups=("A", "A", "B", "C", "D")), names,
                         1, None, tmp_path / "r.png", "x") is None
    assert not (tmp_path / "q.png").exists() and not (tmp_path / "r.png").exists()


def test_a_patient_with_images_of_both_classes_counts_once_per_class():
    pred = Predictions(("x1", "x2", "x3"), np.array([0, 1, 1]), probs([0.1, 0.7, 0.9]),
                       ("X", "X", "X"))
    patients = per_patient(pred)
    np.testing.assert_array_equal(patients.labels, [0, 1])
    np.testing.assert_allclose(patients.probabilities[:, 1], [0.1, 0.8])


def test_group_resamples_draw_whole_patients_within_each_class():
    labels = np.array([0] * 6 + [1] * 6)
    groups = np.array(["p1"] * 3 + ["p2"] * 3 + ["p3"] * 2 + ["p4"] * 4)
    for index in stats.group_resamples(labels, groups, 50, seed=1):
        counts = {g: int(np.sum(groups[index] == g)) for g in np.unique(groups)}
        for group, n in counts.items():  # every patient drawn whole, any number of times
            assert n % int(np.sum(groups == group)) == 0
        # two patients per class in every resample: both classes are always there
        assert set(labels[index]) == {0, 1}


def test_patient_resampling_widens_the_interval_of_correlated_images():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    groups = np.repeat([f"p{i}" for i in range(8)], 10)  # 8 patients, 10 images each
    per_group = rng.uniform(0.2, 0.8, 8)  # every image of a patient scored alike
    scores = np.repeat(per_group, 10) + rng.normal(0, 0.01, 80)
    p = probs(np.clip(scores, 0, 1).tolist())
    by_image = stats.bootstrap_intervals(labels, p, 1, n_resamples=500)["roc_auc"]
    by_patient = stats.bootstrap_intervals(labels, p, 1, n_resamples=500,
                                           groups=groups)["roc_auc"]
    assert by_image[0] == pytest.approx(by_patient[0])
    assert by_patient[2] - by_patient[1] > 1.5 * (by_image[2] - by_image[1])


def test_one_class_cohort_logs_only_what_is_defined():
    settings = EvalConfig(seed=0, bootstrap_resamples=200)
    pred = Predictions(tuple("abcd"), np.zeros(4, dtype=int), probs([0.1, 0.2, 0.6, 0.3]),
                       ("P", "P", "Q", "Q"))
    metrics = cohort_metrics(pred, 1, 0.5, settings, "ext_benign_")
    assert metrics["ext_benign_accuracy"] == pytest.approx(0.75)
    assert metrics["ext_benign_specificity"] == pytest.approx(0.75)
    assert "ext_benign_roc_auc" not in metrics and "ext_benign_sensitivity" not in metrics
    assert metrics["ext_benign_patient_accuracy"] == pytest.approx(1.0)  # means 0.15, 0.45
    assert metrics["ext_benign_n_patients"] == 2 and metrics["ext_benign_n_images"] == 4
    assert all(np.isfinite(v) for v in metrics.values())


def test_images_ranked_backwards_are_warned_of_in_the_run_summary(caplog):
    """A cohort whose ROC-AUC interval lies wholly below 0.5 (the model confidently wrong),
    per image and per patient; a well-ranked one is not mentioned."""
    labels = np.repeat([0, 1], 40)
    p_malignant = np.where(labels == 1, np.linspace(0.05, 0.45, 80), np.linspace(0.95, 0.55, 80))
    files = tuple(f"img{i}" for i in range(80))
    groups = tuple(f"P{i // 8}" for i in range(80))  # ten patients of one class each
    settings = EvalConfig(seed=0, bootstrap_resamples=200)
    metrics = {
        **cohort_metrics(Predictions(files, labels, probs(p_malignant), groups), 1, 0.5,
                         settings, "ext_lab_"),
        **cohort_metrics(Predictions(files, labels, probs(1 - p_malignant), groups), 1, 0.5,
                         settings, "ext_home_")}
    with caplog.at_level(logging.WARNING, logger="experiments"):
        warned = warn_backwards(metrics)
    assert warned == ["ext_lab_patient_roc_auc", "ext_lab_roc_auc"]
    assert "ext_lab_roc_auc 0.000 [0.000, 0.000]" in caplog.text
    assert "ranks these images backwards" in caplog.text and "ext_home" not in caplog.text
