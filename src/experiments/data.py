"""Image folders -> checked file lists -> a seeded, stratified, disjoint split -> tf.data.

The split is decided here and only here. The test split is fixed by the seed, never overlaps
train or validation (`check_disjoint` enforces it), and is read once, after training.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Split:
    """Files and integer labels (indices into `class_names`) of one split."""

    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    def class_counts(self, class_names: Sequence[str]) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.labels, dtype=int), minlength=len(class_names))
        return {name: int(n) for name, n in zip(class_names, counts, strict=True)}


@dataclass(frozen=True)
class Splits:
    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def scan_folder(root: str | Path) -> tuple[tuple[str, ...], list[str], list[int]]:
    """Class names (sorted subfolder names), files and labels of an image folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder does not exist: {root} (set data.root)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p))
    if len(class_dirs) < 2:
        raise ValueError(f"{root} must hold one subfolder per class, at least two; found "
                         f"{[p.name for p in class_dirs]}")
    files: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(
            str(p) for p in class_dir.rglob("*")
            if p.is_file() and not _is_hidden(p) and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not found:
            raise ValueError(f"Class folder {class_dir} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(found)
        labels.extend([label] * len(found))
    return tuple(p.name for p in class_dirs), files, labels


def _split_off(files: list[str], labels: list[int], fraction: float,
               seed: int) -> tuple[list[str], list[int], list[str], list[int]]:
    """Stratified, seeded split: (rest, part) where part holds `fraction` of the images."""
    rest_f, part_f, rest_l, part_l = train_test_split(
        files, labels, test_size=fraction, stratify=labels, random_state=seed)
    return rest_f, rest_l, part_f, part_l


def make_splits(root: str | Path, test_root: str | Path | None, val_fraction: float,
                test_fraction: float, seed: int) -> Splits:
    """Train/val/test splits: test from `test_root` when given, else a stratified part of root.

    Fractions are of all images under `root`; the split depends only on the files and the seed.
    """
    class_names, files, labels = scan_folder(root)
    if test_root is not None:
        test_classes, test_files, test_labels = scan_folder(test_root)
        if test_classes != class_names:
            raise ValueError(f"data.test_root classes {list(test_classes)} differ from "
                             f"data.root classes {list(class_names)}")
        pool_f, pool_l = files, labels
        val_share = val_fraction
    else:
        pool_f, pool_l, test_files, test_labels = _split_off(files, labels, test_fraction, seed)
        val_share = val_fraction / (1.0 - test_fraction)
    train_f, train_l, val_f, val_l = _split_off(pool_f, pool_l, val_share, seed)
    splits = Splits(class_names, Split(tuple(train_f), tuple(train_l)),
                    Split(tuple(val_f), tuple(val_l)), Split(tuple(test_files), tuple(test_labels)))
    check_disjoint(splits)
    return splits


def check_disjoint(splits: Splits) -> None:
    """Raise if any image (by resolved path) sits in more than one split."""
    seen: dict[str, str] = {}
    for name in ("train", "val", "test"):
        for file in getattr(splits, name).files:
            key = os.path.realpath(file)
            if key in seen:
                raise ValueError(f"{file} is in both the {seen[key]} and the {name} split")
            seen[key] = name


def write_split_table(splits: Splits, path: Path) -> Path:
    """file, split, label for every image: which image was used for what, for auditing."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "split", "label"])
        for name in ("train", "val", "test"):
            split = getattr(splits, name)
            for file, label in zip(split.files, split.labels, strict=True):
                writer.writerow([file, name, splits.class_names[label]])
    return path


def load_image(path: str, image_size: int) -> np.ndarray:
    """Decode any supported image to RGB uint8 (grayscale, palette and RGBA converted) and
    resize it to (image_size, image_size)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (image_size, image_size))  # fast JPEG downscale while decoding
            rgb = image.convert("RGB")
            if rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: cannot read image ({error})") from error


def load_images(files: Sequence[str], image_size: int, workers: int | None = None) -> np.ndarray:
    """Decode and resize every file once (in threads: PIL releases the GIL while decoding).

    All bad files are reported in one error, so a user fixes the folder in one pass.
    """
    out = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    errors: list[str] = []

    def load(index: int) -> None:
        try:
            out[index] = load_image(files[index], image_size)
        except ValueError as error:
            errors.append(str(error))

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2)) as pool:
        list(pool.map(load, range(len(files))))
    if errors:
        raise ValueError(f"{len(errors)} unreadable image(s):\n  " + "\n  ".join(sorted(errors)))
    return out


def one_hot(labels: Sequence[int], n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.asarray(labels, dtype=int)]


def training_dataset(images: np.ndarray, labels: Sequence[int], n_classes: int, batch_size: int,
                     augment: Callable[[tf.Tensor], tf.Tensor], seed: int) -> tf.data.Dataset:
    """Shuffled (each epoch), batched, augmented float32 batches for `fit`."""
    ds = tf.data.Dataset.from_tensor_slices((images, one_hot(labels, n_classes)))
    ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (augment(tf.cast(x, tf.float32)), y),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(images: np.ndarray, labels: Sequence[int] | None, n_classes: int,
                       batch_size: int) -> tf.data.Dataset:
    """Unshuffled, unaugmented float32 batches (labels one-hot when given)."""
    if labels is None:
        ds = tf.data.Dataset.from_tensor_slices(images)
        ds = ds.batch(batch_size).map(lambda x: tf.cast(x, tf.float32))
    else:
        ds = tf.data.Dataset.from_tensor_slices((images, one_hot(labels, n_classes)))
        ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    return ds.prefetch(tf.data.AUTOTUNE)
