"""Native-resolution patches (`data.patch_size`): train on random crops of images decoded at a
higher resolution, predict by averaging a grid of crops that covers the whole image.

Downscaling a 500 px biopsy to 96 px shrinks nuclei to a pixel or two; a 128 px crop of the
image decoded at 256 px keeps them four times larger at the cost of a smaller field of view per
step. The network (input `patch_size`) is trained on crops; the model that is evaluated, logged
and served takes the whole `image_size` image, cuts the same grid of crops with standard Keras
`Cropping2D` layers, runs the network on each and averages the probabilities, so predict and
MLflow serving need nothing extra.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from experiments.errors import ConfigError


def grid_offsets(image_size: int, patch_size: int) -> list[int]:
    """Top (or left) offsets of the fewest evenly spaced crops that cover one axis."""
    if not 0 < patch_size <= image_size:
        raise ConfigError(f"`data.patch_size` must be in (0, data.image_size]. Received: "
                          f"patch_size={patch_size!r}, image_size={image_size!r}")
    count = math.ceil(image_size / patch_size)
    if count == 1:
        return [0]
    step = (image_size - patch_size) / (count - 1)
    return [round(i * step) for i in range(count)]


def grid_positions(image_size: int, patch_size: int) -> list[tuple[int, int]]:
    """(top, left) of every crop of the grid, row by row."""
    offsets = grid_offsets(image_size, patch_size)
    return [(top, left) for top in offsets for left in offsets]


def grid_crops(images: np.ndarray, patch_size: int) -> np.ndarray:
    """(n, s, s, 3) -> (n * g, p, p, 3): every image's grid crops, image by image."""
    positions = grid_positions(images.shape[1], patch_size)
    crops = [images[:, top:top + patch_size, left:left + patch_size] for top, left in positions]
    return np.stack(crops, axis=1).reshape(-1, patch_size, patch_size, images.shape[-1])


def random_crops(images: tf.Tensor, patch_size: int, seed: tf.Tensor) -> tf.Tensor:
    """One patch_size crop per image at a random (stateless, seeded) integer position: exact
    pixels, no interpolation."""
    n, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    top = tf.random.stateless_uniform([n], seed, 0, height - patch_size + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([n], seed + 1, 0, width - patch_size + 1,
                                       dtype=tf.int32)
    rows = top[:, None] + tf.range(patch_size)[None, :]
    cols = left[:, None] + tf.range(patch_size)[None, :]
    images = tf.gather(images, rows, axis=1, batch_dims=1)
    return tf.gather(images, cols, axis=2, batch_dims=1)


def with_patch_grid(network: keras.Model, image_size: int, patch_size: int) -> keras.Model:
    """The whole-image model: image -> the grid's crops -> `network` on each -> mean of the
    probabilities. Standard layers only, so it saves, loads and serves like any model; float32
    whatever the training's dtype policy (bfloat16 would round the probabilities)."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    outputs = []
    for top, left in grid_positions(image_size, patch_size):
        crop = keras.layers.Cropping2D(
            ((top, image_size - patch_size - top), (left, image_size - patch_size - left)),
            name=f"patch_{top}_{left}", dtype="float32")(inputs)
        outputs.append(network(crop))
    averaged = outputs[0] if len(outputs) == 1 else keras.layers.Average(
        name="patch_average", dtype="float32")(outputs)
    return keras.Model(inputs, averaged, name=f"{network.name}_patches")


def patch_network(model: keras.Model) -> keras.Model | None:
    """The crop network inside a `with_patch_grid` model, else None."""
    if not any(isinstance(layer, keras.layers.Cropping2D) for layer in model.layers):
        return None
    found = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return found[0] if len(found) == 1 else None
