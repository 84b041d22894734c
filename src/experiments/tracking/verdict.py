"""The paired verdict of a comparison: for every two groups of runs tested on the same images,
how far apart they are and how sure we are - effect sizes with intervals first, p-values
beside them (`experiments.evaluation.paired`), Holm-corrected over all pairs.

Runs are paired image by image through their logged `test_predictions.csv` (a single run's
test split, or a cross-validation's out-of-fold predictions). A group with several runs on the
same images (seeds) scores each image by its runs' mean probability and majority decision.
Groups tested on different images are not paired; the verdict says so and why. Two
cross-validations on the same folds also get the Nadeau-Bengio corrected t-test on their
per-fold test AUC differences.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from experiments.evaluation import paired

LEVEL = 0.05
RESAMPLES = 2000


@dataclass(frozen=True)
class Scored:
    """A group's per-image test predictions, its runs pooled."""

    key: str
    files: tuple[str, ...]
    truth: np.ndarray      # bool: the positive class
    score: np.ndarray      # p(positive), after TTA and temperature when logged
    decision: np.ndarray   # bool: decided positive (at the run's threshold when it had one)
    folds: frozenset[tuple[str, str, str]] = frozenset()  # (file, repeat, fold) of a CV
    fold_runs: tuple[Run, ...] = ()  # a single cross-validation's fold runs
    runs: tuple[Run, ...] = ()  # the group's runs (several: seeds)

    @property
    def classes(self) -> tuple[str, str]:
        """(other class, positive class) names, from the runs' tags."""
        tags = self.runs[0].data.tags
        positive = tags["positive_class"]
        others = [c for c in tags.get("classes", "").split(",") if c and c != positive]
        return (others[0] if len(others) == 1 else f"not {positive}", positive)


Table = dict[str, tuple[bool, float, bool]]
Assignment = frozenset[tuple[str, str, str]]


def download_predictions(client: MlflowClient, runs: Sequence[Run], folder: Path
                         ) -> dict[str, Path]:
    """run id -> its logged test_predictions.csv, downloaded once into `folder` for everything
    a report reads from it (ROC curves, the verdict)."""
    paths = {}
    for run in runs:
        target = folder / run.info.run_id
        target.mkdir(parents=True, exist_ok=True)
        paths[run.info.run_id] = Path(client.download_artifacts(
            run.info.run_id, "test_predictions.csv", str(target)))
    return paths


def read_predictions(path: Path, positive: str) -> tuple[Table, Assignment]:
    """file -> (is positive, p(positive), decided positive) of one run's test predictions (an
    image scored several times, in repeated CV, gets its mean probability and majority vote),
    and the (file, repeat, fold) of a cross-validation's out-of-fold rows (empty for a single
    run's test split)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    score_column = f"final_p_{positive}" if rows and f"final_p_{positive}" in rows[0] \
        else f"p_{positive}"
    decided = "decision_at_threshold" if rows and "decision_at_threshold" in rows[0] \
        else "predicted"
    seen: dict[str, list[tuple[bool, float, bool]]] = {}
    for row in rows:
        seen.setdefault(row["file"], []).append(
            (row["label"] == positive, float(row[score_column]), row[decided] == positive))
    table = {file: (values[0][0], float(np.mean([v[1] for v in values])),
                    bool(np.mean([v[2] for v in values]) >= 0.5))
             for file, values in seen.items()}
    return table, frozenset((row["file"], row["repeat"], row["fold"])
                            for row in rows if "fold" in row)


def fold_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """The fold runs of a cross-validation parent: one per fold (not its refit, nor a second
    model of the fold - cv.cascade's home model, tagged cv_model)."""
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.cv_parent = '{parent.info.run_id}' and tags.cv_fold != ''",
                              max_results=5000)
    return [run for run in runs if "cv_model" not in run.data.tags]


def scored_group(client: MlflowClient, key: str, runs: Sequence[Run],
                 predictions: Mapping[str, Path]) -> Scored | str:
    """The group's pooled predictions (`predictions`: run id -> test_predictions.csv), or why
    they cannot be pooled (runs tested on different images)."""
    read = [read_predictions(predictions[run.info.run_id], run.data.tags["positive_class"])
            for run in runs]
    tables, assignments = [table for table, _ in read], [folds for _, folds in read]
    files = sorted(tables[0])
    if any(sorted(table) != files for table in tables[1:]):
        return (f"the runs of {key} were tested on different images (their splits differ: "
                "fix data.split_seed so every run sees the same folds)")
    truth = np.array([tables[0][f][0] for f in files])
    score = np.array([np.mean([t[f][1] for t in tables]) for f in files])
    decision = np.array([np.mean([t[f][2] for t in tables]) >= 0.5 for f in files])
    single_cv = len(runs) == 1 and bool(assignments[0])
    return Scored(key, tuple(files), truth, score, decision,
                  assignments[0] if len(set(assignments)) == 1 else frozenset(),
                  tuple(run for run in fold_runs(client, runs[0])
                        if "test_roc_auc" in run.data.metrics) if single_cv else (),
                  tuple(runs))


def corrected_across_folds(a: Scored, b: Scored) -> dict[str, Any]:
    """The Nadeau-Bengio corrected t-test on the per-fold test AUC differences of two
    cross-validations on the same folds (empty when either is not one)."""
    if not (a.fold_runs and b.fold_runs):
        return {}

    def by_fold(runs: Sequence[Run]) -> dict[tuple[str, str], Run]:
        return {(r.data.tags.get("cv_repeat", "1"), r.data.tags["cv_fold"]): r for r in runs}

    fa, fb = by_fold(a.fold_runs), by_fold(b.fold_runs)
    keys = sorted(fa.keys() & fb.keys())
    if len(keys) < 2:
        return {}
    differences = np.array([fa[k].data.metrics["test_roc_auc"]
                            - fb[k].data.metrics["test_roc_auc"] for k in keys])
    tags = fa[keys[0]].data.tags
    n_train = int(tags.get("n_train", 0)) + int(tags.get("n_val", 0))
    t, p = paired.corrected_t(differences, n_train, int(tags.get("n_test", 1)))
    return {"n_fold_results": len(keys), "mean_fold_delta_roc_auc": float(differences.mean()),
            "t_corrected_roc_auc": t, "p_corrected_roc_auc": p}


def compare_pair(a: Scored, b: Scored, seed: int = 0) -> dict[str, Any]:
    """The paired effect sizes, intervals and tests of a - b."""
    row: dict[str, Any] = {"a": a.key, "b": b.key, "n_images": len(a.files)}
    result = paired.delong(a.truth.astype(int), a.score, b.score)
    _, low, high = paired.paired_bootstrap(a.truth.astype(int), a.score, b.score,
                                           paired.roc_auc_rows,
                                           RESAMPLES, seed)
    row.update(auc_a=result.auc_a, auc_b=result.auc_b, delta_roc_auc=result.difference,
               delta_roc_auc_low=low, delta_roc_auc_high=high, p_delong=result.p_value)
    correct_a, correct_b = a.decision == a.truth, b.decision == b.truth
    test = paired.mcnemar(correct_a, correct_b)
    delta, low, high = paired.paired_bootstrap(
        a.truth.astype(int), a.decision.astype(int), b.decision.astype(int),
        paired.accuracy_rows, RESAMPLES, seed)
    row.update(accuracy_a=float(correct_a.mean()), accuracy_b=float(correct_b.mean()),
               delta_accuracy=delta, delta_accuracy_low=low, delta_accuracy_high=high,
               p_mcnemar=test.p_value, only_a_right=test.only_a, only_b_right=test.only_b)
    row.update(corrected_across_folds(a, b))
    return row


def score_groups(client: MlflowClient, groups: Sequence[tuple[str, Sequence[Run]]],
                 predictions: Mapping[str, Path]) -> tuple[list[Scored], list[str]]:
    """Each group's pooled predictions, in the groups' alphabetical order, from the runs'
    test predictions (`download_predictions`); and why the groups that could not be pooled
    were left out."""
    refused: list[str] = []
    scored = []
    for key, runs in sorted(groups, key=lambda group: group[0]):
        group = scored_group(client, key, runs, predictions)
        if isinstance(group, str):
            refused.append(group)
        else:
            scored.append(group)
    return scored, refused


def paired_rows(scored: Sequence[Scored]) -> tuple[list[dict[str, Any]], list[str]]:
    """(a row per comparable pair, a - b with a before b, with Holm-adjusted p-values; why the
    other pairs were not paired)."""
    refused: list[str] = []
    rows = []
    for a, b in itertools.combinations(scored, 2):
        if a.files != b.files or a.folds != b.folds:
            what = "images" if a.files != b.files else "folds"
            refused.append(f"{a.key} and {b.key} were tested on different {what} (their "
                           "splits differ: fix data.split_seed so both see the same folds)")
            continue
        rows.append(compare_pair(a, b))
    if rows:
        for test in ("p_delong", "p_mcnemar"):
            adjusted = paired.holm(np.array([r[test] for r in rows]))
            for row, value in zip(rows, adjusted, strict=True):
                row[f"{test}_holm"] = float(value)
    return rows, refused


def verdicts(client: MlflowClient, groups: Sequence[tuple[str, Sequence[Run]]],
             predictions: Mapping[str, Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """(a row per comparable pair; why the others were not paired): `score_groups`, then
    `paired_rows`."""
    scored, refused = score_groups(client, groups, predictions)
    rows, unpaired = paired_rows(scored)
    return rows, refused + unpaired


def sentence(row: dict[str, Any]) -> str:
    """'a - b: AUC +0.012 [-0.02, +0.04], p = 0.41 (DeLong); accuracy ...: not
    distinguishable on 200 images'."""
    distinguishable = min(row["p_delong_holm"], row["p_mcnemar_holm"]) < LEVEL
    folds = "" if "p_corrected_roc_auc" not in row else (
        f"; per fold AUC {row['mean_fold_delta_roc_auc']:+.3f} over {row['n_fold_results']} "
        f"folds, p = {row['p_corrected_roc_auc']:.3g} (corrected t)")
    return (f"{row['a']} - {row['b']}: AUC {row['delta_roc_auc']:+.3f} "
            f"[{row['delta_roc_auc_low']:+.3f}, {row['delta_roc_auc_high']:+.3f}], "
            f"p = {row['p_delong']:.3g} (DeLong); accuracy {row['delta_accuracy']:+.3f} "
            f"[{row['delta_accuracy_low']:+.3f}, {row['delta_accuracy_high']:+.3f}], "
            f"p = {row['p_mcnemar']:.3g} (McNemar){folds}: "
            + ("distinguishable" if distinguishable else "not distinguishable")
            + f" on {row['n_images']} images (Holm-corrected, {LEVEL})")


def slug(key: str) -> str:
    """A group key as part of a metric name: its values ('backbone.name=resnet50' ->
    'resnet50')."""
    values = [part.split("=", 1)[-1] for part in key.split(", ")]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(values))


def pair_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The parent run's verdict metrics: delta_roc_auc__a_vs_b, p_delong__a_vs_b, ..."""
    metrics = {}
    for row in rows:
        pair = f"{slug(row['a'])}_vs_{slug(row['b'])}"
        for name in ("delta_roc_auc", "delta_roc_auc_low", "delta_roc_auc_high", "p_delong",
                     "delta_accuracy", "delta_accuracy_low", "delta_accuracy_high",
                     "p_mcnemar", "p_corrected_roc_auc"):
            if name in row:
                metrics[f"{name}__{pair}"] = float(row[name])
    return metrics


def write_verdict(rows: Sequence[dict[str, Any]], refused: Sequence[str], output: Path) -> str:
    """verdict.md and verdict.csv; returns the Markdown."""
    lines = ["# Paired verdict", "",
             "Every two groups tested on the same images, paired image by image: effect "
             f"(a - b) with a 95% paired bootstrap interval ({RESAMPLES} resamples), DeLong's "
             "test for ROC-AUC and McNemar's exact test for accuracy at each model's "
             "decisions; p-values Holm-corrected over all pairs.", ""]
    lines += [f"- {sentence(row)}" for row in rows] or ["- no pair of groups could be paired"]
    lines += [f"- not paired: {reason}" for reason in refused]
    text = "\n".join(lines) + "\n"
    (output / "verdict.md").write_text(text)
    with (output / "verdict.csv").open("w", newline="") as handle:
        columns = list(dict.fromkeys(key for row in rows for key in row)) or ["a", "b"]
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return text
