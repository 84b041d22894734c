"""Test-split evaluation: predictions, metrics (scikit-learn) and figures (matplotlib)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402


@dataclass(frozen=True)
class Predictions:
    files: tuple[str, ...]
    labels: np.ndarray  # (n,) int
    probabilities: np.ndarray  # (n, n_classes) float


def load_checkpoint(path: str | Path) -> keras.Model:
    """Load a saved `.keras` model with Keras' safe mode on (no arbitrary code)."""
    return keras.saving.load_model(str(path), safe_mode=True)


def predict(model: keras.Model, data, files: Sequence[str], labels: Sequence[int]) -> Predictions:
    probabilities = np.asarray(model.predict(data, verbose=0), dtype=np.float64)
    if probabilities.shape[0] != len(files):
        raise RuntimeError(f"Got {probabilities.shape[0]} predictions for {len(files)} files")
    return Predictions(tuple(files), np.asarray(labels, dtype=int), probabilities)


def positive_index(class_names: Sequence[str], positive_class: str | None) -> int:
    """Index of the class whose recall is the sensitivity; default: the last class by name."""
    if positive_class is None:
        return len(class_names) - 1
    if positive_class not in class_names:
        raise ValueError(f"data.positive_class must be one of {list(class_names)}. "
                         f"Received: data.positive_class={positive_class!r}")
    return list(class_names).index(positive_class)


def classification_metrics(pred: Predictions, positive: int) -> dict[str, float]:
    """test_* metrics. Two classes: precision/recall/F1 of the positive class, specificity =
    recall of the other, ROC-AUC of p(positive). More classes: macro averages, one-vs-rest AUC."""
    y, p = pred.labels, pred.probabilities
    n_classes = p.shape[1]
    y_hat = p.argmax(axis=1)
    one_hot = np.eye(n_classes)[y]
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    if n_classes == 2:
        loss = -np.mean(one_hot * np.log(clipped) + (1 - one_hot) * np.log(1 - clipped))
        truth, guess = (y == positive).astype(int), (y_hat == positive).astype(int)
        out = {
            "precision": skm.precision_score(truth, guess, zero_division=0),
            "recall": skm.recall_score(truth, guess, zero_division=0),
            "specificity": skm.recall_score(1 - truth, 1 - guess, zero_division=0),
            "f1": skm.f1_score(truth, guess, zero_division=0),
            "roc_auc": skm.roc_auc_score(truth, p[:, positive]),
        }
    else:
        loss = -np.mean(np.sum(one_hot * np.log(clipped), axis=1))
        cm = skm.confusion_matrix(y, y_hat, labels=range(n_classes))
        negatives = cm.sum() - cm.sum(axis=1)
        true_negatives = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
        out = {
            "precision": skm.precision_score(y, y_hat, average="macro", zero_division=0),
            "recall": skm.recall_score(y, y_hat, average="macro", zero_division=0),
            "specificity": float(np.mean(true_negatives / np.maximum(negatives, 1))),
            "f1": skm.f1_score(y, y_hat, average="macro", zero_division=0),
            "roc_auc": skm.roc_auc_score(y, p, multi_class="ovr", labels=range(n_classes)),
        }
    out["accuracy"] = skm.accuracy_score(y, y_hat)
    out["loss"] = loss
    return {f"test_{k}": float(v) for k, v in out.items()}


def write_predictions(pred: Predictions, class_names: Sequence[str], path: Path) -> Path:
    """One row per test image: file, label, predicted, p_<class> for every class."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "predicted", *[f"p_{c}" for c in class_names]])
        for file, label, probs in zip(pred.files, pred.labels, pred.probabilities, strict=True):
            writer.writerow([file, class_names[label], class_names[int(probs.argmax())],
                             *[f"{v:.6f}" for v in probs]])
    return path


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
                   path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    targets = [positive] if len(class_names) == 2 else range(len(class_names))
    for index in targets:
        skm.RocCurveDisplay.from_predictions(
            pred.labels == index, pred.probabilities[:, index], name=class_names[index], ax=ax)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_title("test ROC curve")
    return _save(fig, path)


def write_report(pred: Predictions, class_names: Sequence[str], positive: int,
                 history: dict[str, list[float]], best_epoch: int, folder: Path) -> list[Path]:
    """Predictions table and the four figures, written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_predictions(pred, class_names, folder / "test_predictions.csv"),
        plot_curve(history, "loss", best_epoch, folder / "loss_curve.png"),
        plot_curve(history, "accuracy", best_epoch, folder / "accuracy_curve.png"),
        plot_confusion_matrix(pred, class_names, folder / "confusion_matrix.png"),
        plot_roc_curve(pred, class_names, positive, folder / "roc_curve.png"),
    ]
