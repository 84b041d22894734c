"""Per-image predictions and other evaluation tables as CSV files.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.evaluation.cohorts import decision_line, decisions
from experiments.evaluation.metrics import Predictions
from experiments.serving.inference import decide  # noqa: E402


def write_predictions(pred: Predictions, class_names: Sequence[str], path: Path,
                      final: Predictions | None = None, threshold: float | None = None,
                      positive: int = 1) -> Path:
    """One row per test image: file, label, predicted, p_<class> for every class; with `final`
    (after TTA/temperature) also final_p_<class> and, given a threshold, the decision at it;
    each image's group and source when known (`identity_columns`)."""
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
    names, identities = identity_columns(pred)
    return write_table(path, [*header, *names], [pred.files, *columns, *identities])


def identity_columns(pred: Predictions) -> tuple[list[str], list[tuple[str, ...]]]:
    """The `group` (patient) and `source` columns of the images whose predictions know them:
    what lets a reader of the table (`read_predictions`, an ensemble of runs) count patients
    and sources as the run did."""
    known = [(name, values) for name, values in (("group", pred.groups),
                                                 ("source", pred.sources))
             if values is not None]
    return [name for name, _ in known], [values for _, values in known]


def read_predictions(path: Path, class_names: Sequence[str], prefix: str = "p_") -> Predictions:
    """A predictions table (`write_predictions`, a cross-validation's out-of-fold table): the
    `prefix` probabilities, with groups and sources when the table has them."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or ())
        rows = list(reader)

    def column(name: str) -> tuple[str, ...] | None:
        return tuple(r[name] for r in rows) if name in fields else None
    return Predictions(tuple(r["file"] for r in rows),
                       np.array([list(class_names).index(r["label"]) for r in rows], int),
                       np.array([[float(r[f"{prefix}{c}"]) for c in class_names] for r in rows]),
                       column("group"), column("source"))


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


def write_patients(parts: Sequence[Predictions], class_names: Sequence[str], positive: int,
                   thresholds: Sequence[float | np.ndarray | None], path: Path) -> Path:
    """One row per patient (and class, as the patient-level metrics count it), so a reader can
    see which patients carry a patient-level error: its label, number of images, the mean
    p(positive) of its images (the score the patient-level metrics rank), the decision of that
    mean at the model's threshold (`thresholds`: one per part, a number or one per image, as
    a cross-validation's fold thresholds; None: 0.5 for two classes, as the patient-level
    metrics decide, else the most probable class), whether it is right,
    and the share of its images decided right (the patient's BreakHis recognition rate).
    Several parts (a cross-validation's repeats) add a `repeat` column."""
    repeated = len(parts) > 1
    header = [*(["repeat"] if repeated else []), "patient", "label", "n_images",
              f"p_{class_names[positive]}", "decision", "correct", "images_correct"]
    rows = []
    for number, (pred, threshold) in enumerate(zip(parts, thresholds, strict=True)):
        patients = pred.patients("write_patients")
        if threshold is None:
            threshold = decision_line(None, len(class_names))
        cuts = None if threshold is None else np.broadcast_to(
            np.asarray(threshold, dtype=float), (len(pred.labels),))
        for group, label, index in patients:
            cut = None if cuts is None else float(cuts[index[0]])
            mean = pred.probabilities[index].mean(axis=0, keepdims=True)
            decided = int(decisions(mean, positive, cut)[0])
            right = decisions(pred.probabilities[index], positive, cut) == label
            rows.append([*([number] if repeated else []), group, class_names[label],
                         len(index), f"{mean[0, positive]:.6f}", class_names[decided],
                         int(decided == label), f"{right.mean():.6f}"])
    return write_table(path, header, list(zip(*rows, strict=True)) if rows else
                       [[] for _ in header])
