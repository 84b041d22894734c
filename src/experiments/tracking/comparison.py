"""Comparison of finished runs: group them by the keys that differ, summarise metrics as mean +-
std over runs, and write `comparison.md`, `comparison.csv`, the paired verdict (`verdict.md`,
`verdict.csv`: `experiments.tracking.verdict`) and the overlaid curves.
"""

from __future__ import annotations

import csv
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from experiments.errors import UserError
from experiments.tracking import gallery, study_report, verdict
from experiments.tracking.records import BACKWARDS_TAG

matplotlib.use("Agg")


TABLE_METRICS = ("test_accuracy", "test_roc_auc", "test_f1", "test_recall", "test_specificity",
                 "best_epoch", "epoch_seconds", "n_parameters")


FILES = ("report.html", "comparison.md", "comparison.csv", "verdict.md", "verdict.csv",
         "roc_curves.png", "roc_bands.png", "calibration.png", "val_accuracy_curves.png",
         "lr_schedules.png", "gallery/")


@dataclass(frozen=True)
class Group:
    key: str  # e.g. "backbone.name=resnet50"
    runs: tuple[Run, ...]


def find_runs(client: MlflowClient, experiment_name: str, parent_run_id: str | None = None,
              filter_string: str = "") -> list[Run]:
    """Finished training runs (those with test metrics) of an experiment, optionally only the
    children of one parent run (a sweep's jobs, a cross-validation's folds; in any experiment
    of the store, as a sweep over `experiment=` presets spreads them) and matching an MLflow
    filter string."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise UserError(f"No MLflow experiment named {experiment_name!r} in "
                        f"{client.tracking_uri}")
    clauses = ["attributes.status = 'FINISHED'"]
    if parent_run_id:
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    if filter_string:
        clauses.append(filter_string)
    ids = [experiment.experiment_id]
    if parent_run_id:  # a sweep over presets: each job logs to its preset's own experiment
        ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    try:
        runs = client.search_runs(ids, " and ".join(clauses),
                                  order_by=["attributes.start_time ASC"], max_results=5000)
    except MlflowException as error:  # a malformed filter string or parent id
        raise UserError(f"Cannot search the runs of {experiment_name!r}: {error.message}. "
                        f"Received: filter={filter_string!r}, parent={parent_run_id!r}"
                        ) from error
    # Without a parent, a cross-validation counts once (its parent), not once per fold too.
    return [run for run in runs if "test_accuracy" in run.data.metrics
            and (parent_run_id or "cv_fold" not in run.data.tags)]


def group_runs(runs: Sequence[Run], group_by: Sequence[str]) -> list[Group]:
    """Runs grouped by the values of params `group_by` (all in one group when empty)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = ", ".join(f"{k}={run.data.params.get(k, '?')}" for k in group_by) or "all runs"
        groups.setdefault(key, []).append(run)
    return [Group(key, tuple(members)) for key, members in groups.items()]


def _run_value(client: MlflowClient, run: Run, name: str) -> float:
    if "cv_folds" in run.data.tags and name in ("epoch_seconds", "n_parameters"):
        folds = verdict.fold_runs(client, run)
        values = [_run_value(client, fold, name) for fold in folds]
        return statistics.median(values) if values else float("nan")  # the folds' own
    if name == "epoch_seconds":  # median epoch time, leaving out the first (graph tracing)
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        values = [m.value for m in history[1:]] or [m.value for m in history]
        return statistics.median(values) if values else float("nan")
    return run.data.metrics.get(name, float("nan"))


# Per external cohort (eval.external), these columns follow the test metrics.
COHORT_METRICS = ("accuracy", "roc_auc", "patient_accuracy", "ece")


def table_metrics(runs: Sequence[Run]) -> list[str]:
    """TABLE_METRICS, then ext_<cohort>_<COHORT_METRICS> of every cohort any run scored."""
    logged = {name for run in runs for name in run.data.metrics}
    cohorts = sorted({name.removeprefix("ext_").removesuffix("_n_images") for name in logged
                      if name.startswith("ext_") and name.endswith("_n_images")})
    extra = [f"ext_{cohort}_{metric}" for cohort in cohorts for metric in COHORT_METRICS
             if f"ext_{cohort}_{metric}" in logged]
    return [*TABLE_METRICS, *extra]


def _names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metric columns of summary rows, in order."""
    return [name for name in rows[0] if name not in ("group", "n_runs")] if rows else []


def summarize(client: MlflowClient, groups: Sequence[Group],
              names: Sequence[str] = TABLE_METRICS) -> list[dict[str, Any]]:
    """One row per group: n runs and (mean, std) of every metric in `names`."""
    rows = []
    for group in groups:
        row: dict[str, Any] = {"group": group.key, "n_runs": len(group.runs)}
        for name in names:
            values = np.array([_run_value(client, run, name) for run in group.runs])
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            row[name] = (float(np.mean(values)), std)
        rows.append(row)
    return rows


def _format(name: str, value: tuple[float, float]) -> str:
    mean, std = value
    if np.isnan(mean):
        return "-"
    if name == "n_parameters":
        return f"{mean / 1e6:.2f}M"
    digits = 1 if name in ("best_epoch", "epoch_seconds") else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_text(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    names = _names(rows)
    header = ["group", "n", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["group"]), str(row["n_runs"]),
                 *[_format(name, row[name]) for name in names]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        names = _names(rows)
        writer.writerow(["group", "n_runs", *[f"{name}_{stat}" for name in names
                                              for stat in ("mean", "std")]])
        for row in rows:
            writer.writerow([row["group"], row["n_runs"],
                             *[v for name in names for v in row[name]]])


def _predictions(run: Run, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(is_positive, p_positive) of a run's logged test predictions."""
    positive = run.data.tags["positive_class"]
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return (np.array([r["label"] == positive for r in rows]),
            np.array([float(r[f"p_{positive}"]) for r in rows]))


def plot_roc(groups: Sequence[Group], predictions: Mapping[str, Path], path: Path) -> None:
    """Each group's test ROC curve, pooling its runs' predictions (run id -> CSV)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for group in groups:
        parts = [_predictions(run, predictions[run.info.run_id]) for run in group.runs]
        truth = np.concatenate([p[0] for p in parts])
        score = np.concatenate([p[1] for p in parts])
        fpr, tpr, _ = skm.roc_curve(truth, score)
        ax.plot(fpr, tpr, label=f"{group.key} (AUC {skm.auc(fpr, tpr):.3f}, "
                                f"{len(group.runs)} runs)")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate "
           "(sensitivity)", title="test ROC curves")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(client: MlflowClient, groups: Sequence[Group], metric: str, path: Path,
                 log_scale: bool = False) -> bool:
    """Per-epoch `metric` by group: the mean over runs, with a band for min-max. Returns
    whether any group had such a curve (cross-validation parents and linear probes have
    none)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group in groups:
        curves = [{m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
                  for run in group.runs]
        steps = sorted(set().union(*curves))
        if not steps:
            continue
        values = np.array([[c.get(s, np.nan) for s in steps] for c in curves])
        line, = ax.plot(steps, np.nanmean(values, axis=0), marker="o", markersize=3,
                        label=group.key)
        if len(curves) > 1:
            ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0),
                            color=line.get_color(), alpha=0.15)
    if log_scale:
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (mean, min-max band)")
    drawn = bool(ax.lines)
    if drawn:  # runs without per-epoch curves (cross-validation parents) draw none
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def backwards_warnings(groups: Sequence[Group]) -> list[str]:
    """The runs that rank some images backwards (their BACKWARDS_TAG): a comparison must not
    hide that a configuration is confidently wrong on a cohort, whatever its mean scores."""
    return [f"{group.key}, run {run.info.run_name}: {run.data.tags[BACKWARDS_TAG]}"
            for group in groups for run in group.runs if BACKWARDS_TAG in run.data.tags]


def summary_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The summary table as header and cells (for the HTML report)."""
    names = _names(rows)
    return (["group", "n", *names],
            [[str(row["group"]), str(row["n_runs"]),
              *[_format(name, row[name]) for name in names]] for row in rows])


def write_report(client: MlflowClient, runs: Sequence[Run], group_by: Sequence[str],
                 output: Path, title: str = "Comparison",
                 gallery_images: int = study_report.GALLERY_IMAGES
                 ) -> tuple[str, dict[str, float]]:
    """Write the report files (FILES) into `output`; return the table and paired verdict
    text, and the verdict's metrics (for a sweep's parent run)."""
    if not runs:
        raise UserError("No finished runs with test metrics to compare")
    output.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs, group_by)
    rows = summarize(client, groups, table_metrics(runs))
    warnings = backwards_warnings(groups)
    text = table_text(rows) + "".join(f"\nWarning: {line}" for line in warnings)
    (output / "comparison.md").write_text(
        f"# Comparison of {len(runs)} runs by {', '.join(group_by) or 'nothing'}\n\n"
        "Test metrics are those of each run's best checkpoint (chosen on validation); "
        "mean ± std over the runs of a group. epoch_seconds: median epoch time. ext_<cohort>_*: "
        "the run's final model on that external cohort (eval.external).\n\n" + text)
    write_csv(rows, output / "comparison.csv")
    curves = [(caption, path) for caption, path, drawn in [
        ("validation accuracy per epoch", output / "val_accuracy_curves.png",
         plot_history(client, groups, "val_accuracy", output / "val_accuracy_curves.png")),
        ("learning rate per epoch", output / "lr_schedules.png",
         plot_history(client, groups, "lr", output / "lr_schedules.png", log_scale=True))]
        if drawn]
    with tempfile.TemporaryDirectory() as folder:  # each run's predictions, downloaded once
        predictions = verdict.download_predictions(client, runs, Path(folder))
        plot_roc(groups, predictions, output / "roc_curves.png")
        scored, refused = verdict.score_groups(client, [(g.key, g.runs) for g in groups],
                                               predictions)
        pairs, unpaired = verdict.paired_rows(scored)
        refused += unpaired
        plots = [("ROC curves with bands",
                  study_report.plot_roc_bands(scored, output / "roc_bands.png")),
                 ("calibration", study_report.plot_calibration(scored,
                                                               output / "calibration.png")),
                 *curves]
        tiles = gallery.gallery(client, scored, predictions, gallery_images,
                                Path(folder) / "models", output / "gallery")
    summary = verdict.write_verdict(pairs, refused, output)
    study_report.write_html(output / "report.html", title, summary_cells(rows), pairs, refused,
                            plots, tiles, scored, warnings)
    return f"{text}\n{summary}", verdict.pair_metrics(pairs)
