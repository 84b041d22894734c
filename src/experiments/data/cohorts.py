"""Named labeled folders' files (`eval.external` cohorts, `data.sources`), each scanned
against the training classes before training starts, so a wrong folder fails in seconds, not
after the last epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from experiments.config.cohorts import ExternalCohort
from experiments.data.folders import scan_folder
from experiments.data.splits import group_ids
from experiments.errors import DataError


@dataclass(frozen=True)
class CohortFiles:
    """A cohort's images, their labels as indices of the training classes, and their groups
    (patients) when the cohort has a group pattern."""

    cohort: ExternalCohort
    files: tuple[str, ...]
    labels: np.ndarray
    groups: tuple[str, ...] | None


def scan_cohort(cohort: ExternalCohort, class_names: Sequence[str],
                where: str = "eval.external") -> CohortFiles:
    """The cohort's class subfolders must be training classes (some may be missing: a cohort
    of benign tissue only is a cohort); every image needs a group when a pattern is given.
    Errors name the config keys under `where`.<name>."""
    key = f"{where}.{cohort.name}"
    names, files, labels = scan_folder(cohort.root, cohort.include_pattern, min_classes=1,
                                       key=key)
    unknown = [name for name in names if name not in class_names]
    if unknown:
        raise DataError(f"{cohort.root} ({key}.root): class folder(s) {unknown} are not classes "
                        f"the model is trained on ({list(class_names)})")
    index = np.array([list(class_names).index(names[label]) for label in labels], dtype=int)
    groups = (None if cohort.group_pattern is None
              else group_ids(files, cohort.group_pattern, f"{key}.group_pattern"))
    return CohortFiles(cohort, tuple(files), index, groups)


def scan_cohorts(cohorts: Sequence[ExternalCohort],
                 class_names: Sequence[str]) -> list[CohortFiles]:
    return [scan_cohort(cohort, class_names) for cohort in cohorts]
