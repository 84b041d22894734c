"""Comparing two classifiers scored on the same images: paired tests and intervals.

Two backbones scored on the same test images (or the same cross-validation folds) are paired:
each image's two predictions share its difficulty, so the difference between the models varies
far less than either model's metric. Treating them as independent (mean +- std per group)
throws that away; with 200 images every difference we measured between recipes (0.01-0.04)
sat inside the unpaired spread. Here:

- `delong`: ROC-AUC difference with DeLong's test (DeLong, DeLong & Clarke-Pearson 1988; the
  midrank form of Sun & Xu 2014);
- `mcnemar`: accuracy (or sensitivity, specificity) at each model's decisions, McNemar's exact
  test on the discordant images;
- `paired_bootstrap`: an interval for the difference of any metric, resampling images - or
  patients, when groups are known, since images of one patient are not independent;
- `corrected_t`: across repeated cross-validation, the Nadeau-Bengio corrected resampled
  t-test (the folds' training sets overlap, so the naive t-test is overconfident);
- `holm`: Holm's step-down correction when more than two configurations are compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from experiments.evaluation.tails import expanded_tail, resampled_units


@dataclass(frozen=True)
class DeLongResult:
    """AUC of each model, their difference (a - b), its standard error and two-sided p."""

    auc_a: float
    auc_b: float
    difference: float
    standard_error: float
    p_value: float

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The normal-approximation interval of the difference."""
        half = stats.norm.ppf(0.5 + level / 2) * self.standard_error
        return self.difference - half, self.difference + half


def _binary(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise ValueError("Paired tests need labels of both classes, 0 and 1. Received: "
                         f"labels with values {sorted(set(np.unique(labels).tolist()))}")
    return labels.astype(bool)


def _midranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of their ranks."""
    return stats.rankdata(values, method="average")


def delong(labels: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> DeLongResult:
    """DeLong's test of AUC(a) = AUC(b) for two scores of the same images (label 1 =
    positive; higher score = more positive)."""
    positive = _binary(labels)
    scores = np.stack([np.asarray(score_a, float), np.asarray(score_b, float)])
    if scores.shape[1] != len(positive):
        raise ValueError(f"labels and scores differ in length. Received: {len(positive)} "
                         f"labels, {scores.shape[1]} scores")
    m, n = int(positive.sum()), int((~positive).sum())
    v10 = np.empty((2, m))  # per positive: share of negatives it outranks (ties count half)
    v01 = np.empty((2, n))  # per negative: share of positives that outrank it
    aucs = np.empty(2)
    for k, score in enumerate(scores):
        x, y = score[positive], score[~positive]
        combined = _midranks(np.concatenate([x, y]))
        tx, ty = _midranks(x), _midranks(y)
        aucs[k] = (combined[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10[k] = (combined[:m] - tx) / n
        v01[k] = 1.0 - (combined[m:] - ty) / m
    covariance = np.cov(v10) / m + np.cov(v01) / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    difference = float(aucs[0] - aucs[1])
    if variance <= 0:  # identical rankings: no difference and no spread
        return DeLongResult(float(aucs[0]), float(aucs[1]), difference, 0.0,
                            1.0 if difference == 0 else 0.0)
    error = float(np.sqrt(variance))
    p_value = float(2 * stats.norm.sf(abs(difference) / error))
    return DeLongResult(float(aucs[0]), float(aucs[1]), difference, error, p_value)


@dataclass(frozen=True)
class McNemarResult:
    """Images only a got right, only b got right, and the exact two-sided p."""

    only_a: int
    only_b: int
    p_value: float


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """McNemar's exact test: under "equally accurate", each discordant image is a fair coin."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"Both models must be scored on the same images. Received: "
                         f"{a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else float(
        stats.binomtest(only_a, discordant, 0.5).pvalue)
    return McNemarResult(only_a, only_b, p_value)


RowMetric = Callable[[np.ndarray, np.ndarray], np.ndarray]


def roc_auc_rows(truth: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of (R, n) arrays (`truth` 0/1, higher score = more positive), by
    the Mann-Whitney rank formula (ties count half): thousands of resamples in one call."""
    ranks = stats.rankdata(score, axis=1)
    positives = truth.sum(axis=1)
    negatives = truth.shape[1] - positives
    return ((ranks * truth).sum(axis=1) - positives * (positives + 1) / 2) / (
        positives * negatives)


def accuracy_rows(truth: np.ndarray, decision: np.ndarray) -> np.ndarray:
    """Accuracy of each row of (R, n) arrays of labels and decided labels."""
    return (truth == decision).mean(axis=1)


def _image_resamples(labels: np.ndarray, resamples: int,
                     rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) image indices drawn with replacement; a resample that misses a class
    (no AUC, no sensitivity) is drawn again."""
    n = len(labels)
    index = rng.integers(0, n, (resamples, n))
    while True:
        one_class = np.flatnonzero(np.ptp(labels[index], axis=1) == 0)
        if not one_class.size:
            return index
        index[one_class] = rng.integers(0, n, (one_class.size, n))


def paired_bootstrap(labels: np.ndarray, score_a: np.ndarray, score_b: np.ndarray,
                     metric: RowMetric, resamples: int = 2000, seed: int = 0,
                     groups: np.ndarray | None = None, level: float = 0.95,
                     ) -> tuple[float, float, float]:
    """(difference, low, high): metric(labels, a) - metric(labels, b) and its percentile
    interval over resamples that draw the same images for both models - whole groups
    (patients) when `groups` is given. Resamples missing a class are drawn again. The
    percentiles are expanded for the number of units resampled (`tails.expanded_tail`): with
    8 patients the plain ones held the population's accuracy difference in 87% of simulated
    cohorts, the expanded ones in 92% (tested). `metric` scores each row of (R, n) arrays
    (`roc_auc_rows`, `accuracy_rows`): image resamples are one array operation (a
    per-resample scikit-learn call took 9 s per comparison)."""
    labels = np.asarray(labels)
    a, b = np.asarray(score_a), np.asarray(score_b)
    rng = np.random.default_rng(seed)
    if groups is None:
        index = _image_resamples(labels, resamples, rng)
        differences = metric(labels[index], a[index]) - metric(labels[index], b[index])
    else:
        names, members = np.unique(np.asarray(groups), return_inverse=True)
        rows_of = [np.flatnonzero(members == g) for g in range(len(names))]
        found: list[float] = []
        while len(found) < resamples:
            chosen = np.concatenate([rows_of[g]
                                     for g in rng.integers(0, len(names), len(names))])
            if len(np.unique(labels[chosen])) < 2:
                continue
            truth = labels[chosen][None]
            found.append(float(metric(truth, a[chosen][None])[0]
                               - metric(truth, b[chosen][None])[0]))
        differences = np.asarray(found)
    # resamples are not stratified
    tail = expanded_tail(level, resampled_units(labels, groups), strata=1) * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    point = metric(labels[None], a[None])[0] - metric(labels[None], b[None])[0]
    return float(point), float(low), float(high)


def corrected_t(differences: np.ndarray, n_train: int, n_test: int) -> tuple[float, float]:
    """(t, two-sided p) of the Nadeau-Bengio corrected resampled t-test: the per-fold metric
    differences of repeated cross-validation, whose variance is inflated by n_test / n_train
    for the overlap between training sets (Nadeau & Bengio 2003; Bouckaert & Frank 2004)."""
    d = np.asarray(differences, float)
    if len(d) < 2:
        raise ValueError(f"The corrected t-test needs at least 2 fold results. Received: {len(d)}")
    variance = d.var(ddof=1)
    if variance == 0:
        return (0.0, 1.0) if d.mean() == 0 else (float(np.sign(d.mean()) * np.inf), 0.0)
    t = float(d.mean() / np.sqrt((1 / len(d) + n_test / n_train) * variance))
    return t, float(2 * stats.t.sf(abs(t), len(d) - 1))


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    p = np.asarray(p_values, float)
    order = np.argsort(p)
    scaled = np.minimum(1.0, p[order] * (len(p) - np.arange(len(p))))
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted
