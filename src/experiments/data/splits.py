"""Splits of the images: stratified and seeded train/validation/test splits and K folds, grouped by
patient when a group pattern names them, checked disjoint and written as `splits.csv`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from experiments.data.decode import load_image  # noqa: F401  (data.load_image, for callers)
from experiments.data.group_folds import group_kfold
from experiments.data.image_store import LazyImages
from experiments.errors import ConfigError, DataError


@dataclass(frozen=True)
class Split:
    """Files, integer labels (indices into `class_names`) and decoded uint8 images of a split;
    with `data.group_pattern`, each file's group (patient or slide id); with `data.sources`,
    each file's source (`main` for data.root)."""

    files: tuple[str, ...]
    labels: tuple[int, ...]
    images: np.ndarray | LazyImages = field(compare=False, repr=False)
    groups: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None
    # With a source's mpp (data.sources.<name>.mpp), each file's rescaling factor (its mpp
    # over the model input's; None: not rescaled): part of what its features are cached by.
    scales: tuple[float | None, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def class_counts(self, class_names: Sequence[str]) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.labels, dtype=int), minlength=len(class_names))
        return {name: int(n) for name, n in zip(class_names, counts, strict=True)}

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        index = np.asarray(indices, dtype=int)
        groups = None if self.groups is None else tuple(self.groups[i] for i in index)
        sources = None if self.sources is None else tuple(self.sources[i] for i in index)
        scales = None if self.scales is None else tuple(self.scales[i] for i in index)
        images = (self.images.subset(index) if isinstance(self.images, LazyImages)
                  else self.images[index])
        return Split(tuple(self.files[i] for i in index), tuple(self.labels[i] for i in index),
                     images, groups, sources, scales)

    def with_groups(self, pattern: str) -> Split:
        return dataclasses.replace(self, groups=group_ids(self.files, pattern))

    def files_of(self, source: str) -> tuple[str, ...]:
        """The files of one source (all of them when the split has no sources)."""
        if self.sources is None:
            return self.files
        return tuple(f for f, s in zip(self.files, self.sources, strict=True) if s == source)

    def strata(self) -> np.ndarray:
        """What splits and folds stratify on: the label, and the source when there are several
        (each split then holds every source in proportion)."""
        labels = np.asarray(self.labels, dtype=int)
        if self.sources is None:
            return labels
        _, source = np.unique(np.asarray(self.sources), return_inverse=True)
        return source * (labels.max(initial=0) + 1) + labels


def group_ids(files: Sequence[str], pattern: str, key: str = "data.group_pattern"
              ) -> tuple[str, ...]:
    """Each file's group from a regex searched in its file name: the first capture group if
    the pattern has one, else the whole match (e.g. `^(P\\d+)_` -> patient "P12"). Errors name
    the config `key`."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"`{key}` is not a valid regular expression ({error}). "
                          f"Received: {key}={pattern!r}") from error
    groups = []
    for file in files:
        match = compiled.search(Path(file).name)
        if match is None:
            raise DataError(f"{file}: file name does not match {key}={pattern!r} (every "
                            "image needs a group)")
        groups.append(match.group(1) if compiled.groups else match.group(0))
    return tuple(groups)


@dataclass(frozen=True)
class Splits:
    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _split_off(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified, seeded split: (rest, part) where part holds `fraction` of the images; with
    groups, whole groups go to one side (one fold of `group_kfold`, so `fraction` is
    approximate)."""
    indices = np.arange(len(split))
    try:
        if split.groups is None:
            rest, part = train_test_split(indices, test_size=fraction, stratify=split.strata(),
                                          random_state=seed)
        else:
            rest, part = next(stratified_kfold(split, max(2, round(1 / fraction)), seed))
    except ValueError as error:
        raise DataError(f"Cannot make a stratified split of {len(split)} images with fraction "
                        f"{fraction:.3f}: {error} (add images or change data.val_fraction / "
                        "data.test_fraction)") from error
    return split.subset(sorted(rest)), split.subset(sorted(part))


def make_splits(class_names: tuple[str, ...], pool: Split, test: Split | None,
                val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Train/val/test: test is `test` when given (data.test_root), else a stratified part of
    pool. Fractions are of all images in pool; the split depends only on the files and seed."""
    if test is None:
        pool, test = _split_off(pool, test_fraction, seed)
        val_fraction = val_fraction / (1.0 - test_fraction)
    train, val = _split_off(pool, val_fraction, seed)
    splits = Splits(class_names, train, val, test)
    check_disjoint(splits)
    return splits


def stratified_kfold(split: Split, n_splits: int,
                     seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rest, part) index pairs of a seeded, shuffled stratified K-fold; whole groups stay
    together when the split has groups (`group_kfold`: scikit-learn's StratifiedGroupKFold
    hardly moves patients between seeds)."""
    indices = np.arange(len(split))
    if split.groups is None:
        return StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(
            indices, split.strata())
    return iter(group_kfold(split.strata(), split.groups, n_splits, seed))


def make_folds(class_names: tuple[str, ...], pool: Split, folds: int, val_fraction: float,
               seed: int) -> list[Splits]:
    """Stratified K-fold cross-validation: fold k tests on the k-th part and trains/validates
    on the rest (validation `val_fraction` of all images, carved from the rest). Whole groups
    stay together when the pool has groups. Seeded; every image is tested exactly once."""
    relative_val = val_fraction / (1.0 - 1.0 / folds)
    if not 0 < relative_val < 1:
        raise ConfigError(f"`data.val_fraction` leaves no training images with cv.folds={folds}. "
                          f"Received: data.val_fraction={val_fraction!r}")
    try:
        parts = list(stratified_kfold(pool, folds, seed))
    except ValueError as error:
        raise DataError(f"Cannot make {folds} stratified folds of {len(pool)} images: {error} "
                        "(lower cv.folds or add images)") from error
    out = []
    for rest_index, test_index in parts:
        train, val = _split_off(pool.subset(rest_index), relative_val, seed)
        splits = Splits(class_names, train, val, pool.subset(test_index))
        check_disjoint(splits)
        out.append(splits)
    return out


def source_folds(class_names: tuple[str, ...], pool: Split, val_fraction: float,
                 seed: int) -> list[tuple[str, Splits]]:
    """Leave-one-source-out: per source (by name), a fold testing on all its images and
    training/validating on the other sources' (validation `val_fraction` of them, whole
    patients, every source and class in proportion)."""
    if pool.sources is None or len(set(pool.sources)) < 2:
        raise ConfigError("cv.leave_source_out needs images of two or more sources "
                          "(data.sources)")
    sources = np.asarray(pool.sources)
    out = []
    for name in sorted(set(pool.sources)):
        test = pool.subset(np.flatnonzero(sources == name))
        missing = [c for c, n in test.class_counts(class_names).items() if n == 0]
        if missing:
            raise DataError(f"Source {name!r} has no images of class(es) {missing}: leaving it "
                            "out cannot be scored as a test fold (cv.leave_source_out)")
        train, val = _split_off(pool.subset(np.flatnonzero(sources != name)), val_fraction,
                                seed)
        splits = Splits(class_names, train, val, test)
        check_disjoint(splits)
        out.append((name, splits))
    return out


def check_disjoint(splits: Splits) -> None:
    """Raise if any image (by resolved path), or any group, sits in more than one split."""
    seen: dict[str, str] = {}
    seen_groups: dict[str, str] = {}
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        for file in split.files:
            key = os.path.realpath(file)
            if key in seen:
                raise DataError(f"{file} is in both the {seen[key]} and the {name} split")
            seen[key] = name
        for group in set(split.groups or ()):
            if seen_groups.setdefault(group, name) != name:
                raise DataError(f"Group {group!r} (data.group_pattern) is in both the "
                                f"{seen_groups[group]} and the {name} split")


def splits_sha256(splits: Splits) -> str:
    """A fingerprint of which image went where (split, class, class folder / file name), the
    same wherever the image folder lives: runs with equal fingerprints were trained, validated
    and tested on the same images, so their predictions can be paired image by image."""
    rows = sorted(f"{name}\t{splits.class_names[label]}\t{'/'.join(Path(file).parts[-2:])}"
                  for name in ("train", "val", "test")
                  for file, label in zip(getattr(splits, name).files,
                                         getattr(splits, name).labels, strict=True))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def folds_sha256(folds: Sequence[tuple[int, int, Splits]]) -> str:
    """The fingerprint of a (repeated) cross-validation: every (repeat, fold, splits)."""
    return hashlib.sha256("\n".join(f"{repeat}\t{number}\t{splits_sha256(splits)}"
                                     for repeat, number, splits in folds).encode()).hexdigest()


def write_split_table(splits: Splits, path: Path) -> Path:
    """file, split, label, group, source and scale for every image: which image was used for
    what, and by how much it was rescaled (a source's mpp; empty: not rescaled), which is what
    decodes it again as the run did (`read_scales`)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "split", "label", "group", "source", "scale"])
        for name in ("train", "val", "test"):
            split = getattr(splits, name)
            groups = split.groups or ("",) * len(split)
            sources = split.sources or ("main",) * len(split)
            scales = split.scales or (None,) * len(split)
            for file, label, group, source, scale in zip(split.files, split.labels, groups,
                                                         sources, scales, strict=True):
                writer.writerow([file, name, splits.class_names[label], group, source,
                                 "" if scale is None else str(float(scale))])
    return path


def read_scales(path: Path) -> dict[str, float] | None:
    """file -> its rescaling factor, from a logged splits.csv (`write_split_table`; files
    decoded as they are left out); None for a table written before it had the column."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if "scale" not in (reader.fieldnames or ()):
            return None
        return {row["file"]: float(row["scale"]) for row in reader if row["scale"]}
