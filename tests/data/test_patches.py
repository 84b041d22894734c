"""Native-resolution patches: crops, the grid that covers an image, the whole-image model."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from experiments.data import patches
from experiments.evaluation.gradcam import gradcam
from experiments.models.classifier import build_classifier


def test_grid_covers_the_image_with_the_fewest_evenly_spaced_crops():
    assert patches.grid_offsets(256, 128) == [0, 128]
    assert patches.grid_offsets(250, 128) == [0, 122]
    assert patches.grid_offsets(300, 128) == [0, 86, 172]
    assert patches.grid_offsets(96, 96) == [0]
    with pytest.raises(ValueError, match="data.patch_size"):
        patches.grid_offsets(64, 96)


def test_random_crops_are_exact_pixels_at_seeded_positions():
    images = tf.reshape(tf.range(2 * 10 * 10 * 3, dtype=tf.float32), (2, 10, 10, 3))
    crops = patches.random_crops(images, 4, tf.constant([1, 2]))
    again = patches.random_crops(images, 4, tf.constant([1, 2]))
    np.testing.assert_array_equal(crops.numpy(), again.numpy())
    for image, crop in zip(images.numpy(), crops.numpy(), strict=True):
        top, left = np.argwhere(image[..., 0] == crop[0, 0, 0])[0]
        np.testing.assert_array_equal(crop, image[top:top + 4, left:left + 4])


def test_patch_model_of_a_constant_image_equals_its_single_crop_prediction():
    """Every crop of a constant image is the same, so the grid's mean is one crop's answer."""
    network = build_classifier("simplecnn", None, True, 32, 2)
    model = patches.with_patch_grid(network, 80, 32)  # a 3 x 3 grid
    assert len([la for la in model.layers if isinstance(la, keras.layers.Cropping2D)]) == 9
    image = np.full((1, 80, 80, 3), 137.0, np.float32)
    np.testing.assert_allclose(model.predict(image, verbose=0),
                               network.predict(image[:, :32, :32], verbose=0), atol=1e-6)
    # A general image: the mean of the grid crops' predictions.
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (2, 80, 80, 3)).astype(np.float32)
    crops = patches.grid_crops(image, 32)
    expected = network.predict(crops, verbose=0).reshape(2, 9, 2).mean(axis=1)
    np.testing.assert_allclose(model.predict(image, verbose=0), expected, atol=1e-5)
    assert patches.patch_network(model) is network and patches.patch_network(network) is None
    heatmaps = gradcam(model, image)  # stitched from the crops' maps
    assert heatmaps.shape == (2, 80, 80) and 0 <= heatmaps.min() and heatmaps.max() <= 1
