"""BatchNormalization as one fused TensorFlow op (FusedBatchNormV3, oneDNN on CPU).

Keras 3's BatchNormalization casts bfloat16 activations to float32, computes the batch moments
and the normalisation as separate element-wise ops and casts back: on a 2-core CPU that is a
quarter of a ResNet50 bf16 training step and almost half of a DenseNet201 one, outside oneDNN
(benchmarks/bf16_step.py). TensorFlow's fused op does the same arithmetic in one kernel,
forward and backward, in bfloat16 with float32 statistics. `fuse_batchnorm` swaps it in for the
4-D, channels-last BatchNormalization layers of a model; the layers, their weights and the saved
model stay standard Keras (a loaded model normalises with Keras' own code, to the same numbers).
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf


def _fused_call(self: keras.layers.BatchNormalization, inputs, training=None, mask=None):
    if mask is not None or len(inputs.shape) != 4:
        return keras.layers.BatchNormalization.call(self, inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
    beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
    if training and self.trainable:
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC",
            is_training=True)[:3]
        # The op reports the unbiased variance for running averages; Keras tracks the biased.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum
                                + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum
                                    + variance * (1.0 - self.momentum))
    else:
        outputs = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, mean=tf.cast(self.moving_mean, tf.float32),
            variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon,
            data_format="NHWC", is_training=False)[0]
    return tf.cast(outputs, self.compute_dtype)


def fusable(layer: keras.layers.Layer) -> bool:
    """A plain channels-last BatchNormalization (no renorm, no cross-replica statistics)."""
    return (type(layer) is keras.layers.BatchNormalization and layer.axis in (-1, 3)
            and not getattr(layer, "renorm", False)
            and not getattr(layer, "synchronized", False)
            and keras.backend.backend() == "tensorflow")


def fuse_batchnorm(model: keras.Model) -> int:
    """Make every fusable BatchNormalization layer of `model` (nested models included) run as
    one fused op; returns how many. 2-D ones (e.g. a classifier head's) keep Keras' code."""
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if fusable(layer):
            layer.call = types.MethodType(_fused_call, layer)
            count += 1
    return count
