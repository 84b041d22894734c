"""Stain normalisation (`data.stain_normalization`): map every image's colours onto a target
fitted on the training images only.

reinhard: per-image mean and standard deviation of each CIELAB channel matched to the training
images' (Reinhard et al. 2001). macenko: per-image hematoxylin and eosin stain vectors and
concentrations by the SVD-plane method (Macenko et al. 2009), re-expressed with the training
images' stain vectors and concentration scale.

The layer works on RGB batches in [0, 255] and is serialisable, so the model a run logs carries
it in front of the classifier and `experiments.predict` applies it to raw images.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from experiments.config.choices import STAIN_METHODS
from experiments.data.image_store import ImageArray
from experiments.errors import ConfigError, DataError

METHODS = STAIN_METHODS
# sRGB (D65) -> XYZ, and the D65 white point.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.950456, 1.0, 1.088754])
_EPSILON = 216 / 24389  # CIE constants
_KAPPA = 24389 / 27
_BETA = 0.15  # optical density below which a pixel counts as background (Macenko)
_ALPHA = 1.0  # percentile of the extreme angles (Macenko)
_MIN_TISSUE_PIXELS = 50  # fewer: the image passes unchanged
# Stand-in stain vectors (Macenko et al. 2009's H&E reference) for an image without enough
# tissue, whose own estimate is undefined (NaN without a single tissue pixel): they keep the
# concentrations finite - the image passes unchanged anyway.
_FALLBACK_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], np.float32)
_FALLBACK_STAINS /= np.linalg.norm(_FALLBACK_STAINS, axis=1, keepdims=True)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"`data.stain_normalization` must be null or one of {METHODS}. "
                          f"Received: data.stain_normalization={method!r}")


def rgb_to_lab(rgb: tf.Tensor) -> tf.Tensor:
    """RGB in [0, 255] -> CIELAB (L in [0, 100])."""
    x = rgb / 255.0
    linear = tf.where(x > 0.04045, tf.pow((x + 0.055) / 1.055, 2.4), x / 12.92)
    xyz = tf.einsum("...c,dc->...d", linear, tf.constant(_XYZ_FROM_RGB, tf.float32))
    xyz = xyz / tf.constant(_WHITE, tf.float32)
    f = tf.where(xyz > _EPSILON, tf.pow(tf.maximum(xyz, 1e-12), 1 / 3), (_KAPPA * xyz + 16) / 116)
    fx, fy, fz = tf.unstack(f, axis=-1)
    return tf.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: tf.Tensor) -> tf.Tensor:
    """CIELAB -> RGB in [0, 255] (clipped to the gamut)."""
    lightness, a, b = tf.unstack(lab, axis=-1)
    fy = (lightness + 16) / 116
    f = tf.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = tf.where(f ** 3 > _EPSILON, f ** 3, (116 * f - 16) / _KAPPA)
    xyz = xyz * tf.constant(_WHITE, tf.float32)
    linear = tf.einsum("...c,dc->...d", xyz,
                       tf.constant(np.linalg.inv(_XYZ_FROM_RGB), tf.float32))
    linear = tf.clip_by_value(linear, 0.0, 1.0)
    x = tf.where(linear > 0.0031308, 1.055 * tf.pow(linear, 1 / 2.4) - 0.055, 12.92 * linear)
    return tf.clip_by_value(x * 255.0, 0.0, 255.0)


def lab_statistics(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image mean and standard deviation of L, a, b: two (n, 3) tensors."""
    lab = rgb_to_lab(images)
    mean, variance = tf.nn.moments(lab, axes=[1, 2])
    return mean, tf.sqrt(variance + 1e-6)


def _masked_percentile(values: tf.Tensor, mask: tf.Tensor, q: float) -> tf.Tensor:
    """Per-row q-th percentile (nearest rank) of values where mask: (n, p) -> (n,)."""
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    ordered = tf.sort(tf.where(mask, values, tf.fill(tf.shape(values), np.inf)), axis=1)
    rank = tf.cast(tf.round(q / 100 * tf.cast(tf.maximum(count - 1, 0), tf.float32)), tf.int32)
    return tf.gather(ordered, rank, batch_dims=1)


def optical_density(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(n, p, 3) optical density of RGB batches in [0, 255], and the (n, p) mask of tissue
    pixels (density over _BETA in every channel)."""
    density = tf.reshape(-tf.math.log((images + 1.0) / 256.0), [tf.shape(images)[0], -1, 3])
    return density, tf.reduce_min(density, axis=-1) > _BETA


def has_tissue(images: tf.Tensor) -> tf.Tensor:
    """(n,) whether each image has enough tissue pixels to be normalised; the others (a blank
    glass tile) pass unchanged - matched to tissue statistics, glass would come out stained."""
    _, mask = optical_density(images)
    return tf.reduce_sum(tf.cast(mask, tf.int32), axis=1) >= _MIN_TISSUE_PIXELS


def macenko_estimate(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per image: stain matrix (n, 2, 3) (rows H then E, unit optical-density vectors), 99th
    percentile concentrations (n, 2), concentrations (n, p, 2), and whether enough tissue
    pixels were found (n,)."""
    density, mask = optical_density(images)
    weight = tf.cast(mask, tf.float32)[..., None]
    count = tf.reduce_sum(weight, axis=1)  # (n, 1)
    mean = tf.reduce_sum(density * weight, axis=1, keepdims=True) / tf.maximum(count[:, None], 1)
    centered = (density - mean) * weight
    covariance = tf.einsum("npc,npd->ncd", centered, centered) / tf.maximum(count[:, None], 2)
    _, vectors = tf.linalg.eigh(covariance)
    plane = vectors[:, :, 1:]  # the two largest: (n, 3, 2)
    projected = tf.einsum("npc,nck->npk", density, plane)
    angle = tf.atan2(projected[..., 1], projected[..., 0])
    low = _masked_percentile(angle, mask, _ALPHA)
    high = _masked_percentile(angle, mask, 100 - _ALPHA)

    def vector(phi: tf.Tensor) -> tf.Tensor:
        v = tf.einsum("nck,nk->nc", plane, tf.stack([tf.cos(phi), tf.sin(phi)], axis=1))
        v = v * tf.sign(tf.reduce_sum(v, axis=1, keepdims=True) + 1e-12)  # optical density > 0
        return v / tf.maximum(tf.norm(v, axis=1, keepdims=True), 1e-12)

    first, second = vector(low), vector(high)
    hematoxylin_first = (first[:, 0] > second[:, 0])[:, None]  # H absorbs more red
    stains = tf.stack([tf.where(hematoxylin_first, first, second),
                       tf.where(hematoxylin_first, second, first)], axis=1)  # (n, 2, 3)
    enough = tf.squeeze(count, 1) >= _MIN_TISSUE_PIXELS
    stains = tf.where(enough[:, None, None], stains, tf.constant(_FALLBACK_STAINS))
    gram = tf.einsum("nsc,ntc->nst", stains, stains) + 1e-6 * tf.eye(2)
    concentrations = tf.einsum("npc,nsc,nst->npt", density, stains, tf.linalg.inv(gram))
    everything = tf.ones_like(concentrations[..., 0], dtype=tf.bool)
    max_concentration = tf.stack([_masked_percentile(concentrations[..., s], everything, 99.0)
                                  for s in range(2)], axis=1)
    return stains, max_concentration, concentrations, enough


@keras.saving.register_keras_serializable(package="experiments")
class StainNormalization(keras.layers.Layer):
    """Maps RGB batches in [0, 255] onto the fitted target colours (see module docstring)."""

    def __init__(self, method: str, target: list[float], **kwargs) -> None:
        super().__init__(**kwargs)
        check_method(method)
        self.method = method
        self.target = [float(v) for v in target]

    def call(self, images: tf.Tensor) -> tf.Tensor:
        images = tf.cast(images, tf.float32)
        target = tf.constant(self.target, tf.float32)
        if self.method == "reinhard":
            mean, std = lab_statistics(images)
            lab = rgb_to_lab(images)
            lab = ((lab - mean[:, None, None]) / std[:, None, None] * target[3:]
                   + target[:3])
            return tf.where(has_tissue(images)[:, None, None, None], lab_to_rgb(lab), images)
        stains, max_concentration, concentrations, enough = macenko_estimate(images)
        target_stains, target_max = tf.reshape(target[:6], [2, 3]), target[6:]
        scaled = concentrations / tf.maximum(max_concentration[:, None], 1e-6) * target_max
        density = tf.einsum("nps,sc->npc", scaled, target_stains)
        rgb = tf.clip_by_value(256.0 * tf.exp(-density) - 1.0, 0.0, 255.0)
        rgb = tf.reshape(rgb, tf.shape(images))
        return tf.where(enough[:, None, None, None], rgb, images)  # blank images pass

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "method": self.method, "target": self.target}


def _batches(images: ImageArray, size: int = 32) -> Iterator[tf.Tensor]:
    for start in range(0, len(images), size):
        yield tf.constant(images[start:start + size], tf.float32)


def fit(method: str, images: ImageArray) -> StainNormalization:
    """The normaliser whose target is the training images' typical stain (medians over
    images of the per-image estimates)."""
    check_method(method)
    if method == "reinhard":
        stats = [tf.concat(lab_statistics(batch), axis=1).numpy()[has_tissue(batch).numpy()]
                 for batch in _batches(images)]
        tissue = np.concatenate(stats)
        if len(tissue) == 0:
            raise DataError("Reinhard stain normalisation found no tissue (optical density > "
                            f"{_BETA}) in any training image; use data.stain_normalization="
                            "null")
        return StainNormalization(method, list(np.median(tissue, axis=0)), dtype="float32")
    stains, maxima = [], []
    for batch in _batches(images):
        s, m, _, enough = macenko_estimate(batch)
        stains.append(s.numpy()[enough.numpy()])
        maxima.append(m.numpy()[enough.numpy()])
    stains_all = np.concatenate(stains)
    if len(stains_all) == 0:
        raise DataError("Macenko stain normalisation found no tissue (optical density > "
                        f"{_BETA}) in any training image; use data.stain_normalization="
                        "reinhard or null")
    target_stains = np.median(stains_all, axis=0)
    target_stains /= np.linalg.norm(target_stains, axis=1, keepdims=True)
    target_max = np.median(np.concatenate(maxima), axis=0)
    return StainNormalization(method, [*target_stains.ravel(), *target_max], dtype="float32")


def apply(layer: StainNormalization, images: ImageArray) -> np.ndarray:
    """Normalise uint8 images once (before augmentation), in batches; uint8 out."""
    out = [np.round(layer(batch).numpy()).astype(np.uint8) for batch in _batches(images)]
    return np.concatenate(out) if out else np.array(images, np.uint8)
