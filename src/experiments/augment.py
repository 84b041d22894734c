"""Training-time augmentation, applied to batches inside the tf.data pipeline.

Each augmenter maps a float32 batch of RGB pixels in [0, 255] with shape (n, h, w, 3) to a batch of
the same shape, dtype and range. Only the training pipeline calls them; validation, test and
prediction images are never augmented.
"""

from __future__ import annotations

import keras
import tensorflow as tf

FILL_MODES = ("reflect", "wrap", "constant", "nearest")


class NoAugmentation:
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        return images


class StudyAugmentation:
    """The study's augmentation: random zoom, rotation and horizontal/vertical flips."""

    def __init__(self, zoom: float, rotation_degrees: float, horizontal_flip: bool,
                 vertical_flip: bool, fill_mode: str, seed: int) -> None:
        if not 0 <= zoom < 1:
            raise ValueError(f"`augmentation.zoom` must be in [0, 1). Received: zoom={zoom!r}")
        if not 0 <= rotation_degrees <= 180:
            raise ValueError("`augmentation.rotation_degrees` must be in [0, 180]. "
                             f"Received: rotation_degrees={rotation_degrees!r}")
        if fill_mode not in FILL_MODES:
            raise ValueError(f"`augmentation.fill_mode` must be one of {FILL_MODES}. "
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

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        for layer in self._layers:
            images = layer(images, training=True)
        return images


class HistologyAugmentation:
    """The 8 dihedral views (exact 90-degree rotations and flips) plus mild colour jitter.

    Random draws are stateless and keyed on a per-batch seed, so runs repeat exactly.
    """

    def __init__(self, brightness: float, contrast: float, hue: float, seed: int) -> None:
        for key, value, high in (("brightness", brightness, 1.0), ("contrast", contrast, 1.0),
                                 ("hue", hue, 0.5)):
            if not 0 <= value < high:
                raise ValueError(f"`augmentation.{key}` must be in [0, {high}). "
                                 f"Received: {key}={value!r}")
        self.brightness = brightness
        self.contrast = contrast
        self.hue = hue
        self._seeds = tf.random.Generator.from_seed(seed)

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        seeds = self._seeds.make_seeds(tf.shape(images)[0])
        return tf.map_fn(self._augment_one, (images, tf.transpose(seeds)),
                         fn_output_signature=tf.float32)

    def _augment_one(self, item: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        image, seed = item
        image = image / 255.0
        k = tf.random.stateless_uniform([], seed, 0, 4, dtype=tf.int32)
        image = tf.image.rot90(image, k)
        image = tf.image.stateless_random_flip_left_right(image, seed + 1)
        if self.brightness:
            image = tf.image.stateless_random_brightness(image, self.brightness, seed + 2)
        if self.contrast:
            image = tf.image.stateless_random_contrast(image, 1 - self.contrast,
                                                       1 + self.contrast, seed + 3)
        if self.hue:
            image = tf.image.stateless_random_hue(image, self.hue, seed + 4)
        return tf.clip_by_value(image, 0.0, 1.0) * 255.0
