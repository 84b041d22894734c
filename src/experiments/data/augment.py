"""Training-time augmentation, applied to batches inside the tf.data pipeline.

Each augmenter maps a float32 batch of RGB pixels in [0, 255] with shape (n, h, w, 3) to a batch of
the same shape, dtype and range, and its `mix` maps (images, one-hot labels) to mixed ones (mixup,
CutMix; unchanged unless configured). Only the training pipeline calls them (`training=True`);
with `training=False` they return their input unchanged, so validation, test and prediction
images are never augmented.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from experiments.data.transforms import (
    color_jitter,
    cutmix,
    dihedral_views,
    hed_jitter,
    mixup,
    random_blur,
    random_dihedral,
    random_resized_crop,
    random_scale,
)
from experiments.errors import ConfigError

FILL_MODES = ("reflect", "wrap", "constant", "nearest")


class NoAugmentation:
    """The augmenter protocol: `augment(images, training, seed)` and `augment.mix(images,
    labels, training, seed)`; `seed` is the batch's stateless seed (shape [2]) that the
    training pipeline draws, so parallel batches stay deterministic and vary per epoch."""

    def __call__(self, images: tf.Tensor, training: bool = True,
                 seed: tf.Tensor | None = None) -> tf.Tensor:
        return images

    def mix(self, images: tf.Tensor, labels: tf.Tensor, training: bool = True,
            seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        return images, labels


class StudyAugmentation(NoAugmentation):
    """The study's augmentation: random zoom, rotation and horizontal/vertical flips."""

    def __init__(self, zoom: float, rotation_degrees: float, horizontal_flip: bool,
                 vertical_flip: bool, fill_mode: str, seed: int) -> None:
        if not 0 <= zoom < 1:
            raise ConfigError(f"`augmentation.zoom` must be in [0, 1). Received: zoom={zoom!r}")
        if not 0 <= rotation_degrees <= 180:
            raise ConfigError("`augmentation.rotation_degrees` must be in [0, 180]. "
                              f"Received: rotation_degrees={rotation_degrees!r}")
        if fill_mode not in FILL_MODES:
            raise ConfigError(f"`augmentation.fill_mode` must be one of {FILL_MODES}. "
                              f"Received: fill_mode={fill_mode!r}")
        layers: list[keras.layers.Layer] = []
        flip = {(True, True): "horizontal_and_vertical", (True, False): "horizontal",
                (False, True): "vertical"}.get((horizontal_flip, vertical_flip))
        if flip:
            layers.append(keras.layers.RandomFlip(flip, seed=seed))
        if rotation_degrees:
            layers.append(keras.layers.RandomRotation(rotation_degrees / 360.0,
                                                      fill_mode=fill_mode, seed=seed + 1))
        if zoom:
            # Keras' zoom factor is the fraction of size added (negative) or removed (positive):
            # (-zoom, zoom) matches ImageDataGenerator(zoom_range=zoom).
            layers.append(keras.layers.RandomZoom((-zoom, zoom), fill_mode=fill_mode,
                                                  seed=seed + 2))
        self._layers = layers

    def __call__(self, images: tf.Tensor, training: bool = True,
                 seed: tf.Tensor | None = None) -> tf.Tensor:
        if not training:
            return images
        for layer in self._layers:  # Keras' seeded layers keep their own random state
            images = layer(images, training=True)
        return images


def _check_range(key: str, value: float, low: float, high: float, *,
                 high_inclusive: bool = False) -> None:
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ConfigError(f"`augmentation.{key}` must be in [{low}, {high}{bracket}. "
                          f"Received: {key}={value!r}")


class TissueAugmentation:
    """Augmentations that suit H&E tissue, each off at its neutral value, applied in order:
    random resized crop -> magnification (x1, x0.5 or x2) -> dihedral view -> HED stain
    jitter -> brightness/contrast/saturation/hue jitter -> gaussian blur -> RandAugment; then,
    with the labels, mixup or CutMix (`mix`).

    Every random draw is per image, stateless and keyed on the batch's seed (from the training
    pipeline; from one seeded generator when called without one), so a run repeats exactly
    (RandAugment: Keras' seeded layer, which picks its operations per batch).
    """

    def __init__(self, seed: int, dihedral: bool = False, crop_scale: float = 1.0,
                 multiscale: bool = False, hed_sigma: float = 0.0, hed_bias: float = 0.0,
                 brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0,
                 blur_sigma: float = 0.0, blur_probability: float = 0.5,
                 randaugment_ops: int = 0, randaugment_magnitude: float = 0.5,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> None:
        _check_range("crop_scale", crop_scale, 0.05, 1.0, high_inclusive=True)
        _check_range("hed_sigma", hed_sigma, 0.0, 1.0)
        _check_range("hed_bias", hed_bias, 0.0, 1.0)
        _check_range("brightness", brightness, 0.0, 1.0)
        _check_range("contrast", contrast, 0.0, 1.0)
        _check_range("saturation", saturation, 0.0, 1.0)
        _check_range("hue", hue, 0.0, 0.5)
        _check_range("blur_sigma", blur_sigma, 0.0, 10.0)
        _check_range("blur_probability", blur_probability, 0.0, 1.0, high_inclusive=True)
        _check_range("randaugment_ops", randaugment_ops, 0, 10, high_inclusive=True)
        _check_range("randaugment_magnitude", randaugment_magnitude, 0.0, 1.0,
                     high_inclusive=True)
        _check_range("mixup_alpha", mixup_alpha, 0.0, 10.0, high_inclusive=True)
        _check_range("cutmix_alpha", cutmix_alpha, 0.0, 10.0, high_inclusive=True)
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.dihedral = dihedral
        self.crop_scale = crop_scale
        self.multiscale = multiscale
        self.hed_sigma, self.hed_bias = hed_sigma, hed_bias
        self.brightness, self.contrast = brightness, contrast
        self.saturation, self.hue = saturation, hue
        self.blur_sigma, self.blur_probability = blur_sigma, blur_probability
        self._seeds = tf.random.Generator.from_seed(seed)
        self._randaugment = (keras.layers.RandAugment(
            value_range=(0, 255), num_ops=randaugment_ops, factor=randaugment_magnitude,
            seed=seed) if randaugment_ops else None)

    @property
    def dihedral_only(self) -> bool:
        """Only the 8 exact dihedral views: finitely many, exact images (cacheable)."""
        neutral = TissueAugmentation(seed=0, dihedral=True)
        return self.dihedral and all(
            getattr(self, key) == getattr(neutral, key)
            for key in ("crop_scale", "multiscale", "hed_sigma", "hed_bias", "brightness",
                        "contrast", "saturation", "hue", "blur_sigma", "mixup_alpha",
                        "cutmix_alpha")
        ) and self._randaugment is None

    def _seed(self, seed: tf.Tensor | None) -> tf.Tensor:
        return self._seeds.make_seeds(1)[:, 0] if seed is None else tf.cast(seed, tf.int64)

    def __call__(self, images: tf.Tensor, training: bool = True,
                 seed: tf.Tensor | None = None) -> tf.Tensor:
        if not training:
            return images
        images = tf.convert_to_tensor(images, tf.float32)
        seed = self._seed(seed)
        n = tf.shape(images)[0]
        if self.crop_scale < 1.0:
            images = random_resized_crop(images, self.crop_scale, seed + 1)
        if self.multiscale:
            images = random_scale(images, seed + 6)
        if self.dihedral:
            images = random_dihedral(images, dihedral_views(n, seed))
        if self.hed_sigma or self.hed_bias:
            images = hed_jitter(images, self.hed_sigma, self.hed_bias, seed + 3)
        if self.brightness or self.contrast or self.saturation or self.hue:
            images = color_jitter(images, self.brightness, self.contrast, self.saturation,
                                  self.hue, seed + 4)
        if self.blur_sigma and self.blur_probability:
            images = random_blur(images, self.blur_sigma, self.blur_probability, seed + 5)
        if self._randaugment is not None:
            images = self._randaugment(images, training=True)
        return tf.clip_by_value(images, 0.0, 255.0)

    def mix(self, images: tf.Tensor, labels: tf.Tensor, training: bool = True,
            seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Mixup or CutMix of each image with its partner in the reversed batch, labels mixed
        with the same coefficient as the pixels; unchanged when both are off."""
        if not training or not (self.mixup_alpha or self.cutmix_alpha):
            return images, labels
        seed = self._seed(seed) + 11
        if not self.cutmix_alpha:
            return mixup(images, labels, self.mixup_alpha, seed)
        if not self.mixup_alpha:
            return cutmix(images, labels, self.cutmix_alpha, seed)
        use_cutmix = tf.random.stateless_uniform([], seed + 7) < 0.5
        return tf.cond(use_cutmix, lambda: cutmix(images, labels, self.cutmix_alpha, seed),
                       lambda: mixup(images, labels, self.mixup_alpha, seed))


