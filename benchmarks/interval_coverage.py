"""Do a cohort's intervals cover what other patients of the same source give?

Reads the predictions of an external cohort with patients (`external/<name>/predictions.csv`
of a run with `eval.external.<name>.group_pattern`), halves its patients at random many times
(each class's patients split in two) and asks how often the 95% patient-bootstrap interval of
one half holds the other half's value - the interval the project reports
(`stats.bootstrap_intervals`, expanded for small samples) against the plain percentile one.
An exact interval for the population's value holds an independent sample of the same size
about 83% of the time (the difference of two such estimates has twice the variance).

    cd benchmarks && python interval_coverage.py \
        RUN_ROOT/mlruns/artifacts/*/*/artifacts/external/breakhis/predictions.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from machine import cpu_line, print_table  # benchmarks/ (run from there)
from sklearn.metrics import roc_auc_score

from experiments.evaluation import stats

METRICS = ("accuracy", "roc_auc")


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (1: malignant), (n, 2) probabilities and patients of a predictions CSV."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([r["label"] == "malignant" for r in rows], int)
    p = np.array([float(r["p_malignant"]) for r in rows])
    return labels, np.stack([1 - p, p], axis=1), np.array([r["group"] for r in rows])


def plain_tail(confidence: float, units: int, strata: int) -> float:
    return (1 - confidence) / 2


def held_shares(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, halvings: int,
                resamples: int) -> dict[str, float]:
    """Share of random halvings in which one half's interval holds the other half's value."""
    rng = np.random.default_rng(0)
    patients = {g: labels[groups == g][0] for g in np.unique(groups)}
    by_class = [[g for g, y in patients.items() if y == label] for label in (0, 1)]
    held: dict[str, list[bool]] = {m: [] for m in METRICS}
    for trial in range(halvings):
        half = [g for members in by_class
                for g in rng.permutation(members)[:len(members) // 2]]
        first = np.isin(groups, half)
        interval = stats.bootstrap_intervals(labels[first], probs[first], 1, 0.5, resamples,
                                             0.95, trial, groups[first])
        y, p = labels[~first], probs[~first, 1]  # the other half: its values, no interval
        other = {"accuracy": float(np.mean((p >= 0.5) == y)), "roc_auc": roc_auc_score(y, p)}
        for m in METRICS:
            if m in interval:
                held[m].append(interval[m][1] <= other[m] <= interval[m][2])
    return {m: float(np.mean(v)) for m, v in held.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", type=Path)
    parser.add_argument("--halvings", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=500)
    args = parser.parse_args(argv)
    print(cpu_line())
    rows = []
    expanded = stats.expanded_tail
    for path in args.predictions:
        labels, probs, groups = read_predictions(path)
        shares = {}
        for name, tail in (("expanded", expanded), ("plain", plain_tail)):
            stats.expanded_tail = tail  # the same resamples, the plain percentiles
            try:
                shares[name] = held_shares(labels, probs, groups, args.halvings, args.resamples)
            finally:
                stats.expanded_tail = expanded
        rows.append((path.parts[-5][:8], f"{len(np.unique(groups))}",
                     *(f"{shares[name][m]:.2f}" for m in METRICS
                       for name in ("plain", "expanded"))))
    print_table(("run", "patients", "accuracy: plain", "accuracy: expanded",
                 "ROC-AUC: plain", "ROC-AUC: expanded"), rows)


if __name__ == "__main__":
    main()
