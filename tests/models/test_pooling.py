"""backbone.global_pool: the generalised mean against its formula, in a saved model, in the
feature cache's key, and its mistakes."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from experiments.errors import ConfigError
from experiments.models import features
from experiments.models.classifier import build_classifier
from experiments.models.pooling import GeneralizedMeanPooling2D, global_pool
from experiments.serving.inference import load_model as load_checkpoint


def feature_map(seed: int = 0) -> np.ndarray:
    """Post-ReLU activations: mostly small, a few zeros, a few large."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(0.5, 1.0, (2, 5, 7, 3)), 0).astype("float32")


def test_gem_is_the_generalised_mean_between_average_and_maximum():
    x = feature_map()
    clipped = np.maximum(x, 1e-6)
    gem = np.asarray(GeneralizedMeanPooling2D()(x))
    np.testing.assert_allclose(gem, np.mean(clipped ** 3, axis=(1, 2)) ** (1 / 3), rtol=1e-5)
    average = np.asarray(GeneralizedMeanPooling2D(power=1.0)(x))
    np.testing.assert_allclose(average, clipped.mean(axis=(1, 2)), rtol=1e-5)
    steep = np.asarray(GeneralizedMeanPooling2D(power=64.0)(x))
    assert np.all(average < gem) and np.all(gem < steep)
    # p -> infinity is the maximum: at p = 64 over 35 positions, within 35^(-1/64) (6%)
    assert np.all(steep <= x.max(axis=(1, 2)) + 1e-6)
    assert np.all(steep >= x.max(axis=(1, 2)) * 35 ** (-1 / 64) - 1e-6)


def test_gem_computes_in_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = GeneralizedMeanPooling2D()
        out = layer(keras.ops.cast(feature_map(), "bfloat16"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert layer.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


def test_a_gem_classifier_saves_and_reloads_in_safe_mode_with_same_predictions(tmp_path):
    model = build_classifier("simplecnn", None, True, 32, 2, global_pool="gem")
    assert isinstance(model.get_layer("gap"), GeneralizedMeanPooling2D)
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    path = tmp_path / "gem.keras"
    model.save(path)
    reloaded = load_checkpoint(path)  # safe_mode=True: the layer is registered, not code
    assert isinstance(reloaded.get_layer("gap"), GeneralizedMeanPooling2D)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    average = build_classifier("simplecnn", None, True, 32, 2)
    assert isinstance(average.get_layer("gap"), keras.layers.GlobalAveragePooling2D)


def test_cached_features_of_one_pooling_are_never_read_for_the_other():
    base = dict(backbone="densenet121", weights=None, seed=1, image_size=224,
                precision="float32", stain_target=None, resize="crop",
                feature_layer="pool4_relu")
    assert features.model_key(**base, global_pool="avg") == features.model_key(**base)
    assert features.model_key(**base, global_pool="gem") != features.model_key(**base)


def test_pooling_mistakes_name_what_is_wrong():
    with pytest.raises(ConfigError, match=r"backbone.global_pool.*Received: "
                                          r"backbone.global_pool='max'"):
        global_pool(keras.Input((4, 4, 3)), "max")
    with pytest.raises(ValueError, match="Received: power=0.5"):
        GeneralizedMeanPooling2D(power=0.5)
    with pytest.raises(ValueError, match="Received: epsilon=0"):
        GeneralizedMeanPooling2D(epsilon=0)
