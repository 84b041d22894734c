"""Paired statistics against independent references: DeLong from its definition (the
Mann-Whitney kernel, O(m n)) and a hand-worked example, McNemar against a brute-force
sign-flip permutation test and hand-worked tails, the corrected t-test against its formula,
the paired bootstrap against DeLong's interval, Holm by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, roc_auc_score

from experiments.evaluation.paired import (
    accuracy_rows,
    corrected_t,
    delong,
    holm,
    mcnemar,
    paired_bootstrap,
    roc_auc_rows,
)


def delong_by_definition(labels, a, b):
    """DeLong et al. (1988) as written: psi(x, y) = 1, 1/2, 0 for x >, =, < y; structural
    components V10 (per positive) and V01 (per negative); S = S10/m + S01/n."""
    pos, neg = labels == 1, labels == 0
    m, n = pos.sum(), neg.sum()
    v10, v01, aucs = [], [], []
    for s in (a, b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    s = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    se = math.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    z = (aucs[0] - aucs[1]) / se
    return aucs[0], aucs[1], se, 2 * stats.norm.sf(abs(z))


def test_delong_hand_worked_example():
    """3 positives, 2 negatives, every structural component worked out by hand."""
    labels = np.array([1, 1, 1, 0, 0])
    a = np.array([0.9, 0.8, 0.4, 0.5, 0.1])
    b = np.array([0.7, 0.6, 0.2, 0.3, 0.1])
    # a: V10 = [1, 1, 1/2] (0.4 beats 0.1 only), V01 = [2/3, 1] (0.5 is beaten by 0.9, 0.8)
    # b: V10 = [1, 1, 1/2] (0.2 beats 0.1 only), V01 = [2/3, 1]: the same ranking pattern
    result = delong(labels, a, b)
    assert result.auc_a == pytest.approx(5 / 6) and result.auc_b == pytest.approx(5 / 6)
    assert result.difference == 0 and result.standard_error == 0 and result.p_value == 1.0
    # swap one comparison in b: 0.2 -> 0.05 now beats no negative: V10_b = [1, 1, 0]
    b2 = np.array([0.7, 0.6, 0.05, 0.3, 0.1])
    r2 = delong(labels, a, b2)
    assert r2.auc_b == pytest.approx(4 / 6)
    # S10 = cov([1,1,1/2],[1,1,0])/3 -> var_a = 1/12, var_b = 1/3, cov = 1/6 (ddof 1), / m=3
    # S01: a = [2/3, 1], b = [2/3, 2/3] (0.05 is below 0.1 now) -> var_a = 1/18, var_b = 0,
    # cov = 0, / n=2
    variance = (1 / 12 + 1 / 3 - 2 / 6) / 3 + (1 / 18) / 2
    assert r2.standard_error == pytest.approx(math.sqrt(variance), abs=1e-12)
    assert r2.p_value == pytest.approx(2 * stats.norm.sf((1 / 6) / math.sqrt(variance)))


@pytest.mark.parametrize("seed", range(5))
def test_delong_agrees_with_its_definition_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 60 + 20 * seed
    labels = rng.integers(0, 2, n)
    a = labels * 0.8 + rng.normal(0, 1, n)
    b = np.round(labels * 0.5 + 0.5 * a + rng.normal(0, 1, n), 1)  # ties, correlated with a
    result = delong(labels, a, b)
    auc_a, auc_b, se, p = delong_by_definition(labels, a, b)
    assert result.auc_a == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert result.auc_b == pytest.approx(roc_auc_score(labels, b), abs=1e-12)
    assert (result.auc_a, result.auc_b) == pytest.approx((auc_a, auc_b), abs=1e-12)
    assert result.standard_error == pytest.approx(se, abs=1e-9)
    assert result.p_value == pytest.approx(p, abs=1e-6)


def sign_flip_p(only_a: int, only_b: int) -> float:
    """Brute force: under the null each discordant image is equally likely to favour a or b;
    enumerate every assignment and count those at least as extreme as observed."""
    discordant = only_a + only_b
    observed = abs(only_a - only_b)
    extreme = sum(abs(2 * sum(flips) - discordant) >= observed
                  for flips in itertools.product((0, 1), repeat=discordant))
    return extreme / 2 ** discordant


@pytest.mark.parametrize(("only_a", "only_b"), [(1, 6), (0, 5), (3, 3), (7, 2), (0, 0), (9, 4)])
def test_mcnemar_exact_matches_a_brute_force_permutation_test(only_a, only_b):
    both, neither = 20, 5
    correct_a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, bool)
    correct_b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, bool)
    result = mcnemar(correct_a, correct_b)
    assert (result.only_a, result.only_b) == (only_a, only_b)
    expected = 1.0 if only_a + only_b == 0 else sign_flip_p(only_a, only_b)
    assert result.p_value == pytest.approx(expected, abs=1e-12)


def test_mcnemar_hand_worked():
    # 1 vs 6 discordant: P(X <= 1) = (1 + 7) / 128 for X ~ Bin(7, 1/2); two-sided 16/128
    result = mcnemar(np.array([1, 0, 0, 0, 0, 0, 0], bool), np.array([0, 1, 1, 1, 1, 1, 1], bool))
    assert result.p_value == pytest.approx(16 / 128)


def test_corrected_t_against_its_formula():
    d = np.array([0.02, 0.05, -0.01, 0.03, 0.04, 0.00, 0.02, 0.06, 0.01, 0.03])  # 2 x 5 folds
    n_train, n_test = 160, 40
    mean, var, j = d.mean(), d.var(ddof=1), len(d)
    t_expected = mean / math.sqrt((1 / j + n_test / n_train) * var)
    t, p = corrected_t(d, n_train, n_test)
    assert t == pytest.approx(t_expected, abs=1e-12)
    assert p == pytest.approx(2 * stats.t.sf(abs(t_expected), j - 1), abs=1e-12)
    naive_t = stats.ttest_1samp(d, 0).statistic  # the correction only ever widens
    assert abs(t) < abs(naive_t)


def test_paired_bootstrap_interval_agrees_with_delong_within_monte_carlo_error():
    rng = np.random.default_rng(7)
    n = 400
    labels = rng.integers(0, 2, n)
    a = labels * 1.2 + rng.normal(0, 1, n)
    b = 0.6 * a + labels * 0.2 + rng.normal(0, 0.8, n)
    difference, low, high = paired_bootstrap(labels, a, b, roc_auc_rows, resamples=2000)
    result = delong(labels, a, b)
    assert difference == pytest.approx(result.difference, abs=1e-12)
    d_low, d_high = result.interval()
    assert low == pytest.approx(d_low, abs=0.01) and high == pytest.approx(d_high, abs=0.01)


def test_row_metrics_equal_scikit_learn_row_by_row():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, (6, 30))
    score = np.round(rng.normal(size=(6, 30)) + truth, 1)  # rounded: ties count half
    decision = (score > 0.5).astype(int)
    for row in range(6):
        assert roc_auc_rows(truth, score)[row] == pytest.approx(
            roc_auc_score(truth[row], score[row]), abs=1e-12)
        assert accuracy_rows(truth, decision)[row] == accuracy_score(truth[row], decision[row])


def test_paired_bootstrap_redraws_resamples_missing_a_class():
    """Two positives among 12 images: many resamples miss them; none may reach the AUC."""
    labels = np.array([1, 1] + [0] * 10)
    a = np.linspace(0, 1, 12)[::-1]
    b = np.linspace(0, 1, 12)
    difference, low, high = paired_bootstrap(labels, a, b, roc_auc_rows, resamples=300)
    assert difference == pytest.approx(1.0)  # a ranks both positives first, b last
    assert np.isfinite([low, high]).all() and low <= difference <= high


def test_paired_bootstrap_resamples_whole_patients():
    """Eight patients, ten identical images each: resampling patients gives a wider interval
    than pretending the 40 images are independent."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(8), 10)
    labels = np.repeat([0, 1] * 4, 10)
    patient_effect = np.repeat(rng.normal(0, 1, 8), 10)
    a = (labels + patient_effect > 0.5).astype(int)
    b = (labels - patient_effect > 0.5).astype(int)
    _, low_i, high_i = paired_bootstrap(labels, a, b, accuracy_rows, resamples=500)
    _, low_g, high_g = paired_bootstrap(labels, a, b, accuracy_rows, resamples=500,
                                        groups=groups)
    assert high_g - low_g > high_i - low_i


def test_paired_bootstrap_of_few_patients_covers_the_population_difference():
    """8 patients of 10 images; model b right on an image with the patient's own probability
    (Beta(6, 3)), model a on its images with 0.1 more (capped at 1): the population's accuracy
    difference is E[min(p + 0.1, 1) - p]. The expanded 95% intervals held it in 92% of these
    300 cohorts, the plain percentiles in 87%."""
    rng = np.random.default_rng(0)
    p = rng.beta(6, 3, 1_000_000)
    population = float(np.mean(np.minimum(p + 0.1, 1) - p))
    labels, groups = np.repeat([0, 1], 40), np.repeat(np.arange(8), 10)
    held = []
    for trial in range(300):
        own = np.repeat(rng.beta(6, 3, 8), 10)
        draw = rng.random(80)
        right_a, right_b = draw < np.minimum(own + 0.1, 1), draw < own
        a, b = np.where(right_a, labels, 1 - labels), np.where(right_b, labels, 1 - labels)
        _, low, high = paired_bootstrap(labels, a, b, accuracy_rows, resamples=1000,
                                        seed=trial, groups=groups)
        held.append(low <= population <= high)
    assert np.mean(held) >= 0.90


def test_holm_by_hand():
    adjusted = holm(np.array([0.01, 0.04, 0.03]))
    # sorted 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> monotone 0.06
    assert adjusted.tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert holm(np.array([0.5, 0.9])).tolist() == pytest.approx([1.0, 1.0])  # 0.5 x 2 caps


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="labels of both classes"):
        delong(np.ones(4), np.arange(4), np.arange(4))
    with pytest.raises(ValueError, match="same images"):
        mcnemar(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="at least 2 fold results"):
        corrected_t(np.array([0.1]), 100, 25)
