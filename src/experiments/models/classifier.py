"""The study's classifier: backbone -> GAP -> Dropout(0.5) -> BatchNorm -> Dense(softmax)."""

from __future__ import annotations

import keras
import numpy as np

from experiments.errors import ConfigError, DataError
from experiments.models import external
from experiments.models.backbones import (
    affine_layer,
    build_backbone,
    cut_at,
    get_spec,
    preprocessing_layer,
)


def set_bn_momentum(model: keras.Model, momentum: float) -> int:
    """Set the moving-statistics momentum of every BatchNormalization layer; return how many."""
    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            count += 1
        elif isinstance(layer, keras.Model):
            count += set_bn_momentum(layer, momentum)
    return count


def build_classifier(backbone_name: str, weights: str | None, trainable: bool, image_size: int,
                     n_classes: int, bn_momentum: float | None = None,
                     dropout: float = 0.5, pooling: str = "cls",
                     feature_layer: str | None = None) -> keras.Model:
    """The classifier on raw RGB inputs in [0, 255]; preprocessing is part of the model.
    `pooling` applies to backbones that output tokens (`experiments.models.external`);
    `feature_layer` cuts the backbone at that layer (its feature map is pooled)."""
    if n_classes < 2:
        raise DataError(f"Need at least two classes. Received: n_classes={n_classes!r}")
    from_file = backbone_name in external.KINDS
    if from_file:
        if weights is None:
            raise ConfigError(f"A {backbone_name} backbone's weights are its file. Received: "
                              "backbone.weights=None")
        backbone, scale, offset = external.build(backbone_name, weights)
        external.check_input_size(backbone, image_size, backbone_name)
        preprocess = affine_layer(np.diag(scale), offset)
    else:
        backbone = build_backbone(backbone_name, weights, image_size)
        preprocess = preprocessing_layer(get_spec(backbone_name).preprocess_module)
    if feature_layer is not None:
        backbone = cut_at(backbone, feature_layer)
    if bn_momentum is not None:
        set_bn_momentum(backbone, bn_momentum)
    backbone.trainable = trainable
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # Preprocessing (mean/std arithmetic on 0-255 values) stays float32 under mixed precision.
    x = preprocess(inputs)
    # A frozen backbone also keeps its BatchNorm layers in inference mode.
    x = backbone(external.network_input(backbone, x) if from_file else x,
                 training=None if trainable else False)
    x = (external.pooled(x, backbone, image_size, pooling) if from_file
         else keras.layers.GlobalAveragePooling2D(name="gap")(x))
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"{backbone_name}_classifier")


def compile_classifier(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                       n_classes: int, jit_compile: bool = False,
                       label_smoothing: float = 0.0) -> None:
    """Binary cross-entropy on one-hot labels for two classes (the study), categorical above.
    Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer itself."""
    loss = (keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing) if n_classes == 2
            else keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing))
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile,
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
