"""Labeled folders named in a config: `eval.external`, the cohorts of other sources
(laboratories, scanners, magnifications) a run's final model is scored on after training,
never used to train, select or calibrate it; and `data.sources`, more sources trained on
beside data.root.

On the command line a cohort is a folder, or a folder with options:

    +eval.external.breakhis=/data/breakhis-100x
    +eval.external.breakhis.root=/data/breakhis-100x \
        '+eval.external.breakhis.group_pattern=SOB_[BM]_([^-]+-\\d+-[^-]+)-'

(the values are untyped in the schema because OmegaConf cannot add a key to a dictionary of
dataclasses from the command line; `external_cohorts` checks them as strictly as a schema
would, when the config is converted, before any image is read).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from experiments.config.checks import require
from experiments.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9_]+$")  # cohort names are part of metric names
MAIN_SOURCE = "main"  # the source name of data.root's images


@dataclass(frozen=True)
class ExternalCohort:
    """A labeled folder with the training classes' subfolders (all or some of them)."""

    name: str
    root: str
    # A regex searched in each file name giving its patient (first capture group): patient-
    # level metrics, and intervals that resample patients. null: every image on its own.
    group_pattern: str | None = None
    # A regex searched in each image's path below `root`: only matching images are scored.
    include_pattern: str | None = None
    # eval.external only: also score the cohort with the model's BatchNorm statistics adapted
    # to the cohort's own images (AdaBN, no labels used), logged as cohort <name>_adabn.
    adapt: bool = False
    # Micrometres per pixel of this folder's images: rescaled to the model's input scale
    # (needs data.mpp, data.root's). null: decoded like data.root's images.
    mpp: float | None = None


OPTIONS = ("root", "group_pattern", "include_pattern", "adapt", "mpp")
SOURCE_OPTIONS = ("root", "group_pattern", "include_pattern", "mpp")  # data.sources


def external_cohorts(external: Mapping[str, object],
                     where: str = "eval.external") -> tuple[ExternalCohort, ...]:
    """The folders of `where` (name -> folder, or name -> {root, group_pattern,
    include_pattern, mpp, and for eval.external adapt}), in name order; a bad name, key or
    value is a ConfigError naming it."""
    cohorts = []
    for name, value in sorted(external.items()):
        key = f"{where}.{name}"
        require(isinstance(name, str) and bool(NAME.match(name)),
                f"`{where}` names become metric names (ext_<name>_accuracy, "
                f"test_source_<name>_accuracy): use letters, digits and _. Received: {key}")
        if isinstance(value, str):
            value = {"root": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{key}` must be a folder or a mapping with keys "
                              f"{OPTIONS if where == 'eval.external' else SOURCE_OPTIONS}. "
                              f"Received: {key}={value!r}")
        allowed = OPTIONS if where == "eval.external" else SOURCE_OPTIONS
        unknown = sorted(set(value) - set(allowed))
        require(not unknown, f"`{key}` takes the keys {allowed}. Received: "
                f"{', '.join(f'{key}.{k}' for k in unknown)}")
        require(isinstance(value.get("root"), str) and bool(value.get("root")),
                f"`{key}.root` must be set to a labeled folder. Received: "
                f"{key}.root={value.get('root')!r}")
        for option in ("group_pattern", "include_pattern"):
            pattern = value.get(option)
            require(pattern is None or isinstance(pattern, str),
                    f"`{key}.{option}` must be a regex or null. Received: "
                    f"{key}.{option}={pattern!r}")
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as error:
                    require(False, f"`{key}.{option}` is not a valid regular expression "
                            f"({error}). Received: {key}.{option}={pattern!r}")
        adapt = value.get("adapt", False)  # data.sources have no such key (checked above)
        require(isinstance(adapt, bool), f"`{key}.adapt` must be true or false. Received: "
                f"{key}.adapt={adapt!r}")
        mpp = value.get("mpp")
        require(mpp is None or (isinstance(mpp, (int, float)) and not isinstance(mpp, bool)
                                and mpp > 0),
                f"`{key}.mpp` must be a positive number or null. Received: {key}.mpp={mpp!r}")
        cohorts.append(ExternalCohort(name, str(value["root"]), value.get("group_pattern"),
                                      value.get("include_pattern"), adapt,
                                      None if mpp is None else float(mpp)))
    return tuple(cohorts)
