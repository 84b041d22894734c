"""The study's classifier: backbone -> GAP -> Dropout(0.5) -> BatchNorm -> Dense(softmax)."""

from __future__ import annotations

import functools
from collections.abc import Callable

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
    weights_provenance,
)
from experiments.models.pooling import global_pool as global_pool_layer

# The last frozen pretrained backbone built, by what makes it (`shared_backbone`).
_SHARED: dict[tuple, tuple[keras.Model, keras.layers.Layer]] = {}


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
                     feature_layer: str | None = None, share_frozen: bool = False,
                     head_seed: int | None = None, global_pool: str = "avg") -> keras.Model:
    """The classifier on raw RGB inputs in [0, 255]; preprocessing is part of the model.
    `pooling` applies to backbones that output tokens (`experiments.models.external`);
    `feature_layer` cuts the backbone at that layer (its feature map is pooled as
    `global_pool` says: avg or gem, `experiments.models.pooling`).
    `share_frozen`: a frozen pretrained backbone that nothing will train (finetune=frozen or
    linear_probe) is built once and shared by the classifiers built after it with the same
    architecture, weights, size, cut and precision - the folds of a cross-validation and its
    refit (`shared_backbone`). `head_seed` seeds the head's initialisation on its own, so a
    shared backbone does not change it."""
    if n_classes < 2:
        raise DataError(f"Need at least two classes. Received: n_classes={n_classes!r}")
    from_file = backbone_name in external.KINDS
    if from_file and weights is None:
        raise ConfigError(f"A {backbone_name} backbone's weights are its file. Received: "
                          "backbone.weights=None")
    make = functools.partial(new_backbone, backbone_name, weights, image_size,
                             feature_layer, bn_momentum, trainable)
    backbone, preprocess = (shared_backbone(backbone_name, weights, image_size, feature_layer,
                                            bn_momentum, make)
                            if share_frozen and not trainable and weights is not None
                            else make())
    if head_seed is not None:
        keras.utils.set_random_seed(head_seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # Preprocessing (mean/std arithmetic on 0-255 values) stays float32 under mixed precision.
    x = preprocess(inputs)
    # A frozen backbone also keeps its BatchNorm layers in inference mode.
    x = backbone(external.network_input(backbone, x) if from_file else x,
                 training=None if trainable else False)
    x = (external.pooled(x, backbone, image_size, pooling, global_pool) if from_file
         else global_pool_layer(x, global_pool))
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"{backbone_name}_classifier")


def new_backbone(backbone_name: str, weights: str | None, image_size: int,
                 feature_layer: str | None, bn_momentum: float | None,
                 trainable: bool) -> tuple[keras.Model, keras.layers.Layer]:
    """A new backbone (cut at `feature_layer`) and the preprocessing layer in front of it."""
    if backbone_name in external.KINDS:
        backbone, scale, offset = external.build(backbone_name, str(weights))
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
    return backbone, preprocess


def shared_backbone(backbone_name: str, weights: str, image_size: int,
                    feature_layer: str | None, bn_momentum: float | None,
                    make: Callable[[], tuple[keras.Model, keras.layers.Layer]]
                    ) -> tuple[keras.Model, keras.layers.Layer]:
    """The frozen backbone (and its preprocessing) last built with these inputs, else a new
    one from `make`: building a DenseNet or ResNet and loading its weights takes seconds, five
    times in a 5-fold cross-validation whose folds only read its features. Keyed by the
    weights' sha256 (a re-imported file builds anew) and the precision policy; only the last
    one is kept, so a sweep over backbones holds one at a time."""
    key = (backbone_name, weights_provenance(backbone_name, weights)["weights_sha256"],
           image_size, feature_layer, bn_momentum, keras.config.dtype_policy().name)
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = make()
    return _SHARED[key]


def compile_classifier(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                       n_classes: int, jit_compile: bool = False,
                       label_smoothing: float = 0.0) -> None:
    """Binary cross-entropy on one-hot labels for two classes (the study), categorical above.
    Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer itself."""
    loss = (keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing) if n_classes == 2
            else keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing))
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile,
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
