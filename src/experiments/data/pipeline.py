"""tf.data pipelines over decoded images: seeded, augmented training batches and evaluation
batches, read by index from memory or the disk cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from experiments.data.augment import NoAugmentation
from experiments.data.decode import load_image  # noqa: F401  (data.load_image, for callers)
from experiments.data.image_store import LazyImages
from experiments.data.patches import random_crops


def one_hot(labels: Sequence[int] | np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.asarray(labels, dtype=int)]


def image_label_slices(images: np.ndarray | LazyImages,
                       labels: Sequence[int] | np.ndarray | None,
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


def evaluation_dataset(images: np.ndarray | LazyImages, labels: Sequence[int] | np.ndarray,
                       n_classes: int, batch_size: int) -> tf.data.Dataset:
    """Unshuffled, unaugmented float32 batches with one-hot labels."""
    ds = image_label_slices(images, labels, n_classes).batch(batch_size)
    if isinstance(images, LazyImages):
        ds = ds.map(lambda x, y: read_batch(images, x, y))
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(tf.data.AUTOTUNE)
