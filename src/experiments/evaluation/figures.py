"""Evaluation figures (matplotlib): training curves, confusion matrix, ROC curve, reliability
diagram, patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
from sklearn import metrics as skm  # noqa: E402

from experiments.evaluation import (
    stats,  # noqa: E402
)
from experiments.evaluation.metrics import Predictions

matplotlib.use("Agg")  # files only; never needs a display


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curve(history: dict[str, list[float]], metric: str, best_epoch: int, path: Path) -> Path:
    """Train and validation `metric` per epoch, with the selected epoch marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
        if key in history:
            epochs = range(1, len(history[key]) + 1)
            ax.plot(epochs, history[key], marker="o", markersize=3, label=label)
    ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(pred: Predictions, class_names: Sequence[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    skm.ConfusionMatrixDisplay.from_predictions(
        pred.labels, pred.probabilities.argmax(axis=1), labels=list(range(len(class_names))),
        display_labels=list(class_names), cmap="Blues", colorbar=False, ax=ax)
    ax.set_title("test confusion matrix")
    return _save(fig, path)


def plot_roc_curve(pred: Predictions, class_names: Sequence[str], positive: int,
                   path: Path, title: str = "test ROC curve") -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    targets = [positive] if len(class_names) == 2 else range(len(class_names))
    for index in targets:
        skm.RocCurveDisplay.from_predictions(
            pred.labels == index, pred.probabilities[:, index], name=class_names[index], ax=ax)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_title(title)
    return _save(fig, path)


def write_report(pred: Predictions, class_names: Sequence[str], positive: int,
                 history: dict[str, list[float]], best_epoch: int, folder: Path) -> list[Path]:
    """The four figures of the plain test predictions, written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    curves = [plot_curve(history, metric, best_epoch, folder / f"{metric}_curve.png")
              for metric in ("loss", "accuracy") if history.get(metric)]  # none: no epochs
    return [*curves,
            plot_confusion_matrix(pred, class_names, folder / "confusion_matrix.png"),
            plot_roc_curve(pred, class_names, positive, folder / "roc_curve.png")]


def plot_reliability(curves: dict[str, stats.ReliabilityBins], path: Path,
                     title: str = "test reliability diagram") -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, bins in curves.items():
        filled = bins.count > 0
        ax.plot(bins.confidence[filled], bins.accuracy[filled], marker="o",
                label=f"{name} (ECE {bins.ece:.3f})")
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
           title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_patients(pred: Predictions, class_names: Sequence[str], positive: int,
                  threshold: float | None, path: Path, title: str) -> Path | None:
    """Each patient of two or more images on a row, ordered by the mean p(positive) of its
    images: every image's probability as a dot and the mean as a bar, coloured by the
    patient's label, with the decision threshold when there is one - which patients a
    patient-level ROC-AUC turns on, and whether their images agree. None when fewer than two
    patients have two images (a patient of one image is its image) or without groups."""
    if pred.groups is None:
        return None
    patients = [p for p in pred.patients("plot_patients") if len(p[2]) >= 2]
    if len(patients) < 2:
        return None
    keys = [(g, y) for g, y, _ in patients]
    rows = [pred.probabilities[index, positive] for _, _, index in patients]
    order = np.argsort([r.mean() for r in rows], kind="stable")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.5, 1.8 + 0.28 * len(keys)))
    for position, index in enumerate(order):
        label = keys[index][1]
        colour = colours[label % len(colours)]
        ax.scatter(rows[index], np.full(len(rows[index]), position), s=10, alpha=0.5,
                   color=colour)
        ax.plot([rows[index].mean()] * 2, [position - 0.35, position + 0.35], color=colour,
                linewidth=2.5)
    if threshold is not None:
        ax.axvline(threshold, color="grey", linestyle="--", label="threshold")
    for label, name in enumerate(class_names):  # legend: one entry per class present
        if any(keys[i][1] == label for i in range(len(keys))):
            ax.plot([], [], color=colours[label % len(colours)], linewidth=2.5,
                    label=f"{name} patient (bar: mean)")
    ax.set_yticks(range(len(keys)), [keys[i][0] for i in order], fontsize=7)
    ax.set(xlim=(-0.02, 1.02), xlabel=f"p({class_names[positive]}) of each image")
    ax.set_title(title, pad=22)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3,
              frameon=False)  # above the axes: it never hides a patient
    return _save(fig, path)
