"""Test-time BatchNorm adaptation (AdaBN, Li et al. 2016): a new laboratory's stain and
scanner shift the statistics of every feature map; re-estimating each BatchNormalization
layer's mean and variance on unlabeled images of that laboratory - and changing nothing else -
is the standard remedy that needs no labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import keras
import numpy as np
import tensorflow as tf


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


@contextmanager
def statistics_mode(model: keras.Model) -> Iterator[list[keras.layers.BatchNormalization]]:
    """Inside: every BatchNormalization layer updates its moving statistics when called in
    training mode (also those of frozen backbones), and dropout is off (it would inflate the
    variances the head's BatchNormalization sees). Restored on exit."""
    layers = batchnorm_layers(model)
    dropouts = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
                if isinstance(layer, keras.layers.Dropout)]
    saved = [(layer, layer.momentum, layer.trainable) for layer in layers]
    rates = [(layer, layer.rate) for layer in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        for layer in layers:
            layer.trainable = True
        yield layers
    finally:
        for layer, momentum, trainable in saved:
            layer.momentum, layer.trainable = momentum, trainable
        for layer, rate in rates:
            layer.rate = rate


def adapt_batchnorm(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> int:
    """Replace every BatchNormalization layer's moving mean and variance by those of `images`
    (uint8, the model's input): the running average of the batch statistics, each layer seeing
    the layers before it already normalised with the new images' batch statistics. Weights,
    gammas and betas are untouched. Returns how many layers were adapted."""
    if len(images) < 2:
        raise ValueError(f"AdaBN needs at least 2 images. Received: {len(images)}")
    with statistics_mode(model) as layers:
        for step, start in enumerate(range(0, len(images), batch_size)):
            batch = np.asarray(images[start:start + batch_size])
            if len(batch) < 2 and step > 0:
                break  # a batch of one has no variance
            for layer in layers:
                layer.momentum = step / (step + 1)  # the running mean of batch statistics
            model(tf.convert_to_tensor(batch, tf.float32), training=True)
    return len(layers)
