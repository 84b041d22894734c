"""Image folders -> checked file lists -> a seeded, stratified, disjoint split -> tf.data.

The split is decided here and only here. The test split is fixed by the seed, never overlaps
train or validation (`check_disjoint` enforces it), and is read once, after training.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from experiments import image_store
from experiments.augment import NoAugmentation
from experiments.errors import ConfigError, DataError, MissingFileError
from experiments.image_store import LazyImages
from experiments.inference import load_image  # noqa: F401  (data.load_image, for callers)
from experiments.patches import random_crops

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
ON_INVALID = ("error", "skip")


@dataclass(frozen=True)
class Split:
    """Files, integer labels (indices into `class_names`) and decoded uint8 images of a split;
    with `data.group_pattern`, each file's group (patient or slide id)."""

    files: tuple[str, ...]
    labels: tuple[int, ...]
    images: np.ndarray | LazyImages = field(compare=False, repr=False)
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def class_counts(self, class_names: Sequence[str]) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.labels, dtype=int), minlength=len(class_names))
        return {name: int(n) for name, n in zip(class_names, counts, strict=True)}

    def subset(self, indices: Sequence[int]) -> Split:
        index = np.asarray(indices, dtype=int)
        groups = None if self.groups is None else tuple(self.groups[i] for i in index)
        images = (self.images.subset(index) if isinstance(self.images, LazyImages)
                  else self.images[index])
        return Split(tuple(self.files[i] for i in index), tuple(self.labels[i] for i in index),
                     images, groups)

    def with_groups(self, pattern: str) -> Split:
        return Split(self.files, self.labels, self.images, group_ids(self.files, pattern))


def group_ids(files: Sequence[str], pattern: str) -> tuple[str, ...]:
    """Each file's group from a regex searched in its file name: the first capture group if
    the pattern has one, else the whole match (e.g. `^(P\\d+)_` -> patient "P12")."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"`data.group_pattern` is not a valid regular expression ({error}). "
                          f"Received: data.group_pattern={pattern!r}") from error
    groups = []
    for file in files:
        match = compiled.search(Path(file).name)
        if match is None:
            raise DataError(f"{file}: file name does not match data.group_pattern="
                            f"{pattern!r} (every image needs a group)")
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


@dataclass(frozen=True)
class Invalid:
    """A file left out of (or stopping) a run, and why."""

    file: str
    reason: str


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def scan_folder(root: str | Path, include_pattern: str | None = None
                ) -> tuple[tuple[str, ...], list[str], list[int]]:
    """Class names (sorted subfolder names), files and labels of an image folder.

    The class is the first folder level; images may sit any number of levels below it (e.g.
    BreakHis' `malignant/SOB/ductal_carcinoma/<patient>/200X/<image>.png`). Files are listed by
    extension; hidden files (`.DS_Store`, `._x`) are ignored silently; with `include_pattern`,
    only files whose path relative to `root` matches it (a regex, searched) are kept.
    """
    root = Path(root)
    try:
        include = None if include_pattern is None else re.compile(include_pattern)
    except re.error as error:
        raise ConfigError(f"`data.include_pattern` is not a valid regular expression ({error})."
                          f" Received: data.include_pattern={include_pattern!r}") from error
    if not root.is_dir():
        raise MissingFileError(f"Data folder does not exist: {root} (set data.root)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p))
    if len(class_dirs) < 2:
        raise DataError(f"{root} must hold one subfolder per class, at least two; found "
                        f"{[p.name for p in class_dirs]}")
    files: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(
            str(p) for p in class_dir.rglob("*")
            if not _is_hidden(p) and p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
            and (include is None or include.search(p.relative_to(root).as_posix()))
        )
        if not found:
            which = "" if include is None else f" matching data.include_pattern={include_pattern!r}"
            raise DataError(f"Class folder {class_dir} holds no images{which} "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(found)
        labels.extend([label] * len(found))
    return tuple(p.name for p in class_dirs), files, labels


def load_images(files: Sequence[str], image_size: int, allow_upscale: bool = True,
                cache: str = "memory", cache_folder: Path | None = None
                ) -> tuple[np.ndarray | LazyImages, list[Invalid]]:
    """Check every file (decoding it), keeping the decoded images as `cache` says (see
    `experiments.image_store`: memory, disk, none; auto picks by size). Returns the images of
    the readable files, in order, and every unreadable file with why."""
    mode = image_store.choose_mode(cache, len(files), image_size)
    if mode == "disk":
        if cache_folder is None:
            raise ConfigError("data.cache=disk needs a cache folder (paths.cache_dir)")
        stored, problems = image_store.disk_images(files, image_size, allow_upscale,
                                                   cache_folder)
    else:
        stored = (np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
                  if mode == "memory" else None)
        problems = image_store.decode_all(files, image_size, allow_upscale, stored)
    keep = [i for i in range(len(files)) if i not in problems]
    invalid = [Invalid(files[i], problems[i]) for i in sorted(problems)]
    if mode == "memory":
        return stored[keep], invalid
    source = stored if mode == "disk" else list(files)
    return LazyImages(source, image_size, np.asarray(keep, int), allow_upscale), invalid


def read_folder(root: str | Path, image_size: int, on_invalid: str = "error",
                allow_upscale: bool = True, report_dir: Path | None = None,
                include_pattern: str | None = None, cache: str = "memory",
                cache_folder: Path | None = None
                ) -> tuple[tuple[str, ...], Split, list[Invalid]]:
    """Scan and decode a class folder; every file is checked before any training starts.

    on_invalid="error" raises one error that summarises the bad files (how many per reason, a
    few of each) and, with `report_dir`, writes every one with its reason to
    `<report_dir>/invalid_files.csv`; "skip" leaves them out and returns them. A class left
    without valid images is an error either way.
    """
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"data.on_invalid must be one of {ON_INVALID}. "
                          f"Received: data.on_invalid={on_invalid!r}")
    class_names, files, labels = scan_folder(root, include_pattern)
    images, invalid = load_images(files, image_size, allow_upscale, cache, cache_folder)
    if invalid and on_invalid == "error":
        listing = None
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            listing = write_invalid_table(invalid, report_dir / INVALID_TABLE)
        where = f"; every one with its reason is listed in {listing}" if listing else ""
        raise DataError(f"{len(invalid)} invalid image file(s) under {root} (fix or remove "
                        f"them, or set data.on_invalid=skip{where}):\n{summarize_invalid(invalid)}")
    bad = {item.file for item in invalid}
    kept = [i for i, file in enumerate(files) if file not in bad]
    split = Split(tuple(files[i] for i in kept), tuple(labels[i] for i in kept), images)
    counts = split.class_counts(class_names)
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"No valid images left in class folder(s) {empty} under {root}")
    return class_names, split, invalid


INVALID_TABLE = "invalid_files.csv"
_LISTED = 10  # up to this many bad files, each is listed
_EXAMPLES = 3  # files named per reason in a summary
_REASONS = 8  # reasons shown in a summary


def summarize_invalid(invalid: Sequence[Invalid]) -> str:
    """A screenful about bad files: each file with its reason when there are few, else per
    kind of reason how many and a few of them."""
    if len(invalid) <= _LISTED:
        return "\n".join(f"  {item.file}: {item.reason}" for item in invalid)
    by_reason: dict[str, list[Invalid]] = {}
    for item in invalid:
        kind = re.sub(r"\b\d+x\d+ px\b", "WxH px", item.reason)  # sizes differ, reason same
        by_reason.setdefault(kind, []).append(item)
    lines = []
    for kind, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))[:_REASONS]:
        if len(items) == 1:
            lines.append(f"  {items[0].file}: {items[0].reason}")
            continue
        shown = ", ".join(Path(i.file).name for i in items[:_EXAMPLES])
        more = f" and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else ""
        reason = items[0].reason if len({i.reason for i in items}) == 1 else kind
        lines.append(f"  {len(items)} x {reason}\n      e.g. {shown}{more}")
    if len(by_reason) > _REASONS:
        lines.append(f"  ... and {len(by_reason) - _REASONS} other reasons")
    return "\n".join(lines)


def _split_off(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified, seeded split: (rest, part) where part holds `fraction` of the images; with
    groups, whole groups go to one side (one fold of a StratifiedGroupKFold, so `fraction` is
    approximate)."""
    indices = np.arange(len(split))
    try:
        if split.groups is None:
            rest, part = train_test_split(indices, test_size=fraction, stratify=split.labels,
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
    together when the split has groups."""
    indices = np.arange(len(split))
    if split.groups is None:
        return StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(
            indices, split.labels)
    return StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(
        indices, split.labels, split.groups)


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


def write_split_table(splits: Splits, path: Path) -> Path:
    """file, split, label for every image: which image was used for what, for auditing."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "split", "label", "group"])
        for name in ("train", "val", "test"):
            split = getattr(splits, name)
            groups = split.groups or ("",) * len(split)
            for file, label, group in zip(split.files, split.labels, groups, strict=True):
                writer.writerow([file, name, splits.class_names[label], group])
    return path


def write_invalid_table(invalid: Sequence[Invalid], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows((item.file, item.reason) for item in invalid)
    return path


def one_hot(labels: Sequence[int], n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.asarray(labels, dtype=int)]


def image_label_slices(images: np.ndarray | LazyImages, labels: Sequence[int] | None,
                       n_classes: int) -> tf.data.Dataset:
    """(image, one-hot label) elements; for images kept on disk or not at all, (index, label)
    elements whose batches `read_batch` turns into images."""
    items = np.arange(len(images)) if isinstance(images, LazyImages) else images
    if labels is None:
        return tf.data.Dataset.from_tensor_slices(items)
    return tf.data.Dataset.from_tensor_slices((items, one_hot(labels, n_classes)))


def read_batch(images: LazyImages, positions: tf.Tensor, labels: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of positions -> the uint8 images there (read from the disk cache or decoded)."""
    batch = tf.numpy_function(lambda p: images[p], [positions], tf.uint8)
    batch.set_shape([None, images.size, images.size, 3])
    return batch, labels


def batch_seeds(seed: int) -> tf.data.Dataset:
    """An endless stream of stateless batch seeds (shape [2]), fixed by `seed` and different
    in every epoch (every new iteration of the dataset)."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def training_dataset(images: np.ndarray | LazyImages, labels: Sequence[int], n_classes: int,
                     batch_size: int,
                     augment: NoAugmentation, seed: int,
                     patch_size: int | None = None) -> tf.data.Dataset:
    """Shuffled (each epoch), batched float32 batches for `fit`: cropped to random
    `patch_size` patches (native patches), augmented, then label-mixed (`augment.mix`:
    mixup, CutMix). Every batch draws from its own stateless seed."""
    ds = image_label_slices(images, labels, n_classes)
    ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = tf.data.Dataset.zip(ds.batch(batch_size), batch_seeds(seed))
    if isinstance(images, LazyImages):
        ds = ds.map(lambda batch, key: (read_batch(images, batch[0], batch[1]), key))

    def transform(batch: tuple[tf.Tensor, tf.Tensor], key: tf.Tensor):
        x, y = tf.cast(batch[0], tf.float32), batch[1]
        if patch_size is not None:
            x = random_crops(x, patch_size, key + 13)
        return augment.mix(augment(x, seed=key), y, seed=key)

    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(images: np.ndarray | LazyImages, labels: Sequence[int], n_classes: int,
                       batch_size: int) -> tf.data.Dataset:
    """Unshuffled, unaugmented float32 batches with one-hot labels."""
    ds = image_label_slices(images, labels, n_classes).batch(batch_size)
    if isinstance(images, LazyImages):
        ds = ds.map(lambda x, y: read_batch(images, x, y))
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(tf.data.AUTOTUNE)
