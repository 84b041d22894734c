"""Per-image predictions and other evaluation tables as CSV files.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from experiments.evaluation.metrics import Predictions
from experiments.serving.inference import decide  # noqa: E402


def write_predictions(pred: Predictions, class_names: Sequence[str], path: Path,
                      final: Predictions | None = None, threshold: float | None = None,
                      positive: int = 1) -> Path:
    """One row per test image: file, label, predicted, p_<class> for every class; with `final`
    (after TTA/temperature) also final_p_<class> and, given a threshold, the decision at it."""
    header = ["file", "label", "predicted", *[f"p_{c}" for c in class_names]]
    columns = [[class_names[label] for label in pred.labels], predicted_names(pred, class_names),
               *probability_columns(pred)]
    if final is not None:
        header += [f"final_p_{c}" for c in class_names]
        columns += probability_columns(final)
        if threshold is not None:
            header.append("decision_at_threshold")
            columns.append([class_names[i] for i in
                            decide(final.probabilities, positive, threshold)])
    return write_table(path, header, [pred.files, *columns])


def predicted_names(pred: Predictions, class_names: Sequence[str]) -> list[str]:
    return [class_names[int(i)] for i in pred.probabilities.argmax(axis=1)]


def probability_columns(pred: Predictions) -> list[list[str]]:
    return [[f"{v:.6f}" for v in column] for column in pred.probabilities.T]


def write_table(path: Path, header: Sequence[str], columns: Sequence[Sequence]) -> Path:
    """A CSV of equally long columns."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(zip(*columns, strict=True))
    return path
