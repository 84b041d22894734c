"""Classification metrics (scikit-learn) of a set of predictions, with bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from experiments.config.schema import EvalConfig as EvalSettings  # noqa: E402
from experiments.errors import ConfigError
from experiments.evaluation import (
    stats,  # noqa: E402
)


@dataclass(frozen=True)
class Predictions:
    files: tuple[str, ...]
    labels: np.ndarray  # (n,) int
    probabilities: np.ndarray  # (n, n_classes) float
    # Each image's group (patient, slide) when known: intervals then resample whole groups.
    groups: tuple[str, ...] | None = None
    # Each image's source (data.sources) when the run trained on several.
    sources: tuple[str, ...] | None = None

    def subset(self, index: np.ndarray) -> Predictions:
        def pick(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if values is None else tuple(values[i] for i in index)
        return Predictions(tuple(self.files[i] for i in index), self.labels[index],
                           self.probabilities[index], pick(self.groups), pick(self.sources))

    def patients(self, caller: str) -> list[tuple[str, int, np.ndarray]]:
        """(patient, label, its image indices) per patient and class, ordered by patient: the
        unit every patient-level number counts (a patient with images of two classes is a
        row per class). `caller` names who asked, in the error without groups."""
        if self.groups is None:
            raise ValueError(f"{caller} needs each image's group. Received: groups=None")
        groups = np.asarray(self.groups)
        return [(g, y, np.flatnonzero((groups == g) & (self.labels == y)))
                for g, y in sorted({(g, int(y)) for g, y in zip(groups, self.labels,
                                                                 strict=True)})]


def positive_index(class_names: Sequence[str], positive_class: str | None) -> int:
    """Index of the class whose recall is the sensitivity; default: the last class by name."""
    if positive_class is None:
        return len(class_names) - 1
    if positive_class not in class_names:
        raise ConfigError(f"data.positive_class must be one of {list(class_names)}. "
                          f"Received: data.positive_class={positive_class!r}")
    return list(class_names).index(positive_class)


def classification_metrics(pred: Predictions, positive: int,
                           prefix: str = "test_") -> dict[str, float]:
    """<prefix>* metrics. Two classes: precision/recall/F1 of the positive class, specificity =
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
    return {f"{prefix}{k}": float(v) for k, v in out.items()}


def interval_metrics(pred: Predictions, positive: int, settings: EvalSettings, prefix: str,
                     threshold: float = 0.5) -> dict[str, float]:
    """Point estimates and bootstrap interval bounds: <prefix><metric>, _ci_low, _ci_high
    (resampling patients, not images, when the predictions know each image's group)."""
    groups = None if pred.groups is None else np.asarray(pred.groups)
    intervals = stats.bootstrap_intervals(pred.labels, pred.probabilities, positive, threshold,
                                          settings.bootstrap_resamples, settings.confidence,
                                          settings.seed, groups)
    out = {}
    for name, (point, low, high) in intervals.items():
        out.update({f"{prefix}{name}": point, f"{prefix}{name}_ci_low": low,
                    f"{prefix}{name}_ci_high": high})
    return out
