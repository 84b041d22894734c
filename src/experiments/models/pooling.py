"""How a backbone's feature map becomes one feature vector (`backbone.global_pool`).

avg is the study's global average. gem is the generalised mean (Radenovic et al. 2018,
"Fine-tuning CNN image retrieval with no human annotation"): (mean over positions of x^p)^(1/p)
per channel, p = 3 - between the average (p = 1) and the maximum (p -> infinity), so a channel
that fires strongly in a few places (a cluster of atypical nuclei) is not diluted by the
tissue around it. On ImageNet DenseNet121's third block, a probe trained on the study's images
alone ranked another laboratory's better (BreakHis ROC-AUC 0.64 -> 0.67) at no cost on held-out
images of its own (benchmarks/README, session 15).

This module imports only Keras and the project's choices and errors: a saved model holding the
layer loads wherever `experiments.serving.inference` does (it imports this module to register
the layer).
"""

from __future__ import annotations

import keras

from experiments.config.choices import GLOBAL_POOLS
from experiments.errors import ConfigError


@keras.saving.register_keras_serializable(package="experiments")
class GeneralizedMeanPooling2D(keras.layers.Layer):
    """(batch, height, width, channels) -> (batch, channels): the generalised mean of each
    channel over positions, computed in float32 (a cube of bfloat16 activations loses digits).
    Activations below `epsilon` count as `epsilon` (a root needs positive values; most feature
    maps follow a ReLU, and a negative activation - after swish, say - counts as none)."""

    def __init__(self, power: float = 3.0, epsilon: float = 1e-6, **kwargs: object) -> None:
        if power < 1:
            raise ValueError(f"The generalised mean needs power >= 1. Received: power={power!r}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be positive. Received: epsilon={epsilon!r}")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.power = float(power)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        x = keras.ops.maximum(keras.ops.cast(inputs, "float32"), self.epsilon)
        mean = keras.ops.mean(keras.ops.power(x, self.power), axis=(1, 2))
        return keras.ops.power(mean, 1.0 / self.power)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "power": self.power, "epsilon": self.epsilon}


def global_pool(feature_map, kind: str):
    """The `gap` layer (the pooled features every part of the project reads) over a feature
    map: a global average (avg) or the generalised mean (gem)."""
    if kind == "avg":
        return keras.layers.GlobalAveragePooling2D(name="gap")(feature_map)
    if kind == "gem":
        return GeneralizedMeanPooling2D(name="gap")(feature_map)
    raise ConfigError(f"backbone.global_pool must be one of {GLOBAL_POOLS}. "
                     f"Received: backbone.global_pool={kind!r}")
