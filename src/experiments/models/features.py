"""Frozen-backbone features: computed once per image (and per dihedral view), cached in memory and
on disk, and the head trained on them instead of on images.

With `finetune=frozen` the backbone never changes, so its pooled features of an image are the
same in every epoch; only the head (Dropout -> BatchNorm -> Dense) learns. When the training
augmentation is dihedral-only (or none), the 8 dihedral views are exact and few: the features
of each view are computed once and an epoch costs a pass over a small matrix. The cache lives
in memory (folds of a cross-validation, jobs of an in-process sweep) and on disk under
`<paths.cache_dir>/features` (other processes, later runs), keyed by everything that changes a
feature - backbone, its weights, input size, precision, stain normalisation - and, per image,
its path, size and modification time (and its rescaling, for a source with an mpp).
Augmentations that change pixels at random (HED jitter, crops, colour, the study's zoom and
rotation) cannot be cached: those runs take the exact path and say so. The trained head sits in
the same full model as on the exact path, so evaluation, TTA, predict, Grad-CAM and serving do
not change.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from experiments.config.choices import CACHED_VIEW_COUNTS, TTA_VIEWS
from experiments.data.augment import NoAugmentation, TissueAugmentation
from experiments.data.image_store import ImageArray, file_key, scale_of
from experiments.data.pipeline import batch_seeds, one_hot
from experiments.data.transforms import dihedral_views, tta_view
from experiments.models import external
from experiments.models.backbones import weights_provenance

CACHE_VERSION = 1
# Per-process counts of images whose features were computed or found in a cache.
COUNTS = {"computed": 0, "memory": 0, "disk": 0}
# "<model key>-<views>" -> image key -> ((views, C) features, "memory" or "disk")
_MEMORY: dict[str, dict[str, tuple[np.ndarray, str]]] = {}


def training_views(augment: object) -> tuple[int | None, str]:
    """How many views of each training image the head needs (1: none; 8: dihedral-only), or
    None and why the features cannot be cached."""
    if type(augment) is NoAugmentation:
        return 1, ""
    if isinstance(augment, TissueAugmentation) and augment.dihedral_only:
        return 8, ""
    return None, (f"{type(augment).__name__} changes pixels at random (crops, stain or colour "
                  "jitter, zoom, rotation): every epoch sees new images. Use "
                  "augmentation=dihedral or none for the cached fast path")


def feature_model(classifier: keras.Model) -> keras.Model:
    """Raw image -> the classifier's pooled backbone features (its `gap` layer)."""
    return keras.Model(classifier.input, classifier.get_layer("gap").output)


def head_model(classifier: keras.Model) -> keras.Model:
    """Pooled features -> probabilities through the classifier's own head layers (shared:
    training it trains the classifier's head)."""
    width = int(classifier.get_layer("gap").output.shape[-1])
    inputs = keras.Input((width,), name="features")
    x = inputs
    for name in ("dropout", "head_bn", "predictions"):
        x = classifier.get_layer(name)(x)
    return keras.Model(inputs, x, name="head")


@dataclass(frozen=True)
class FeatureCache:
    """Where features of one frozen backbone live: memory, and files under `folder` (one per
    number of views)."""

    key: str  # the model's identity (backbone, weights, size, precision, stain)
    folder: Path | None

    def path(self, views: int) -> Path | None:
        return None if self.folder is None else self.folder / f"{self.key}-{views}views.npz"

    def _store(self, views: int) -> dict[str, tuple[np.ndarray, str]]:
        """image key -> (its (views, C) features, where they came from: "disk" or "memory")."""
        name = f"{self.key}-{views}"
        if name not in _MEMORY:
            _MEMORY[name] = {}
            path = self.path(views)
            if path is not None and path.is_file():
                with np.load(path) as saved:
                    _MEMORY[name].update(
                        (k, (np.asarray(f), "disk"))
                        for k, f in zip(saved["keys"].tolist(), saved["features"], strict=True))
        return _MEMORY[name]

    def _save(self, store: dict[str, tuple[np.ndarray, str]], views: int) -> None:
        path = self.path(views)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, suffix=".partial.npz")
        os.close(handle)
        keys = list(store)
        np.savez(staging, keys=np.array(keys), features=np.stack([store[k][0] for k in keys]))
        os.replace(staging, path)  # atomic: a reader never sees half a file

    def _borrow(self, store: dict[str, tuple[np.ndarray, str]], keys: Sequence[str],
                views: int) -> None:
        """Put into `store` the images a cache of more views holds, as their first `views`
        views: the views are ordered (plain, the dihedral ones, zoomed out, zoomed in), so the
        smaller set is a prefix - a backbone study of 8 views reads what transfer_cpu's 24
        computed."""
        for larger in CACHED_VIEW_COUNTS:
            wanted = [key for key in keys if key not in store]
            if larger <= views or not wanted:
                continue
            other = self._store(larger)
            store.update((key, (other[key][0][:views], other[key][1]))
                         for key in wanted if key in other)

    def get(self, files: Sequence[str], images: ImageArray, views: int,
            compute: Callable[[np.ndarray, int], np.ndarray],
            scales: Sequence[float | None] | None = None) -> np.ndarray:
        """(n, views, C) features of `images` (whose files are `files`, each rescaled by its
        `scales` entry when given), computing only the images the cache does not hold, and
        saving them."""
        store = self._store(views)
        keys = [file_key(f, scale_of(scales, i)) for i, f in enumerate(files)]
        self._borrow(store, keys, views)
        missing = [i for i, k in enumerate(keys) if k not in store]
        for key in keys:
            if key in store:
                COUNTS[store[key][1]] += 1
        if missing:
            fresh = compute(images[missing], views)
            store.update((keys[i], (f, "memory")) for i, f in zip(missing, fresh, strict=True))
            COUNTS["computed"] += len(missing)
            self._save(store, views)
        return np.stack([store[k][0] for k in keys])


def model_key(backbone: str, weights: str | None, seed: int, image_size: int, precision: str,
              stain_target: Sequence[float] | None, resize: str = "squash",
              pooling: str | None = None, feature_layer: str | None = None,
              global_pool: str = "avg") -> str:
    """The identity of a frozen feature extractor: what changes a feature changes the key
    (`pooling`: of a backbone's tokens; `feature_layer`: where the backbone is cut, None for
    its last block; `global_pool`: of a feature map)."""
    if weights is not None:  # the weights' identity is their content (also when imported)
        weights = weights_provenance(backbone, weights)["weights_sha256"]
    parts = {"version": CACHE_VERSION, "backbone": backbone, "weights": weights,
             # random initial weights are the seed's
             "seed": seed if weights is None else None, "image_size": image_size,
             "precision": precision, "keras": keras.__version__, "tensorflow": tf.__version__,
             "stain": None if stain_target is None else [round(v, 6) for v in stain_target],
             # squash: the key features cached before crop existed had
             **({} if resize == "squash" else {"resize": resize}),
             # token pooling: only backbones from files output tokens
             **({"pooling": pooling} if backbone in external.KINDS else {}),
             **({} if feature_layer is None else {"feature_layer": feature_layer}),
             # avg: the key features cached before global_pool existed had
             **({} if global_pool == "avg" else {"global_pool": global_pool})}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def compute_features(extractor: keras.Model, images: np.ndarray, views: int,
                     batch_size: int = 32) -> np.ndarray:
    """(n, views, C) pooled features of uint8 images, view v = `tta_view(image, v)` (the 8
    dihedral views, then the same at half the magnification, then at twice it)."""
    out = []
    for view in range(views):
        ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(
            lambda x, v=view: tta_view(tf.cast(x, tf.float32), v))
        out.append(np.asarray(extractor.predict(ds, verbose=0), np.float32))
    return np.stack(out, axis=1)


def head_dataset(features: np.ndarray, labels: Sequence[int], n_classes: int,
                 batch_size: int, seed: int, draw_views: bool) -> tf.data.Dataset:
    """Shuffled batches of (features, one-hot labels), the same batches as the image path
    (same shuffle, same per-batch seeds); with `draw_views`, each image in the dihedral view
    the image path's augmentation would have drawn."""
    ds = tf.data.Dataset.from_tensor_slices((features, one_hot(labels, n_classes)))
    ds = ds.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    ds = tf.data.Dataset.zip(ds.batch(batch_size), batch_seeds(seed))

    def pick(batch: tuple[tf.Tensor, tf.Tensor], key: tf.Tensor):
        x, y = batch
        if not draw_views:
            return x[:, 0], y
        return tf.gather(x, dihedral_views(tf.shape(x)[0], key), batch_dims=1), y

    return ds.map(pick).prefetch(tf.data.AUTOTUNE)


def evaluation_batches(features: np.ndarray, labels: Sequence[int], n_classes: int,
                       batch_size: int) -> tf.data.Dataset:
    """The plain view's features with one-hot labels (validation during training)."""
    return tf.data.Dataset.from_tensor_slices(
        (features[:, 0], one_hot(labels, n_classes))).batch(batch_size)


def head_probabilities(head: keras.Model, features: np.ndarray, tta: str) -> np.ndarray:
    """p(class) from cached features: the mean over eval.tta's views - the plain view, the 8
    dihedral views, or those and their zoomed-out copies (the same numbers the full model
    gives on the images, without the backbone)."""
    if len(features) == 0:
        return np.empty((0, int(head.output_shape[-1])))
    chosen = features[:, list(TTA_VIEWS[tta])]
    flat = chosen.reshape(-1, chosen.shape[-1])
    probs = np.asarray(head.predict(flat, batch_size=256, verbose=0), np.float64)
    return probs.reshape(len(features), chosen.shape[1], -1).mean(axis=1)
