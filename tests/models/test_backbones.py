"""Backbone registry: weights resolution, offline errors, preprocessing inside the model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from experiments.errors import ConfigError
from experiments.models.backbones import (
    BACKBONES,
    build_backbone,
    get_spec,
    preprocessing_layer,
    resolve_image_size,
)
from experiments.models.classifier import build_classifier, set_bn_momentum
from experiments.serving.inference import load_model as load_checkpoint
from tests.conftest import SMALL, run_cli


def test_offline_imagenet_fails_before_training_naming_file_and_cache(tmp_path):
    """A machine without internet: an empty Keras cache and no route out."""
    keras_home = tmp_path / "keras_home"
    proxy = "http://127.0.0.1:9"  # discard port: every download is refused at once
    env = {"KERAS_HOME": str(keras_home), "HTTPS_PROXY": proxy, "https_proxy": proxy,
           "HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    result = run_cli([*SMALL, "backbone=resnet50", "backbone.weights=imagenet",
                      f"paths.root={tmp_path}"], cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 2  # a user error: one message, no traceback
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in result.stderr
    assert str(keras_home / "models") in result.stderr
    assert "backbone.weights=null" in result.stderr
    assert "Epoch 1" not in result.stdout and "MLflow run" not in result.stdout


def test_every_imagenet_backbone_names_its_weights_file():
    for name, spec in BACKBONES.items():
        assert spec.imagenet_file is None or spec.imagenet_file.endswith(".h5"), name
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_backbone("simplecnn", "imagenet", 32)


def test_weights_from_a_local_file(tmp_path):
    source = build_backbone("simplecnn", None, 32)
    path = tmp_path / "simplecnn.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("simplecnn", str(path), 32)
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        build_backbone("simplecnn", str(tmp_path / "missing.h5"), 32)


def test_image_size_defaults_and_minimum():
    assert resolve_image_size("densenet201", None) == 224
    assert resolve_image_size("xception", None) == 299
    with pytest.raises(ValueError, match="at least 71 px"):
        resolve_image_size("xception", 64)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_preprocess_layer_matches_the_keras_function(name):
    """A standard Dense layer reproduces every backbone's preprocess_input (caffe's BGR and mean,
    torch's mean/std, tf's [-1, 1], pass-through, /255), so saved models need no custom layer."""
    spec = get_spec(name)
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    if spec.preprocess_module == "identity":
        expected = x / 255.0
    else:
        expected = getattr(keras.applications, spec.preprocess_module).preprocess_input(x.copy())
    layer = preprocessing_layer(spec.preprocess_module)
    actual = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)
    assert not layer.trainable and layer.compute_dtype == "float32"


def test_saved_classifier_reloads_in_safe_mode_with_same_predictions(tmp_path):
    model = build_classifier("resnet50", None, True, 32, 2)
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = load_checkpoint(path)  # safe_mode=True
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_bn_momentum_reaches_every_backbone_batchnorm():
    model = build_classifier("simplecnn", None, True, 32, 2, bn_momentum=0.9)
    backbone = model.get_layer("simplecnn")
    momenta = {layer.momentum for layer in backbone.layers
               if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.9}
    assert set_bn_momentum(backbone, 0.8) == 8


def test_loading_keeps_keras_safe_mode_on(tmp_path):
    """A .keras file with a Lambda layer (arbitrary code) is refused, not executed."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ValueError, match="safe_mode"):
        load_checkpoint(path)


def test_feature_layer_cuts_the_backbone_there_and_grad_cam_maps_it():
    from experiments.evaluation.gradcam import gradcam
    from experiments.models import features

    model = build_classifier("simplecnn", None, False, 32, 2, feature_layer="block3_relu2")
    assert model.get_layer("gap").output.shape[-1] == 128  # block 3's channels, not 256
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert gradcam(model, images).shape == (2, 32, 32)
    keys = {features.model_key("simplecnn", None, 0, 32, "float32", None, "crop", None, layer)
            for layer in (None, "block3_relu2", "block2_relu2")}
    assert len(keys) == 3  # cached features of one cut are never read for another
    with pytest.raises(ConfigError, match="backbone.feature_layer.*block4_relu2.*"
                                          "Received: backbone.feature_layer='pool9'"):
        build_classifier("simplecnn", None, False, 32, 2, feature_layer="pool9")


def test_a_frozen_pretrained_backbone_is_built_once_and_the_head_is_seeded_alike(tmp_path):
    """Folds of a frozen or linear-probe cross-validation share one backbone (building it is
    seconds per fold); their heads start where a fresh build's would, and other weights, a
    trainable backbone or no weights build anew."""
    weights = tmp_path / "a.weights.h5"
    build_classifier("simplecnn", None, False, 32, 2).get_layer("simplecnn").save_weights(
        weights)

    def classifier(path=weights, trainable=False, seed=7):
        return build_classifier("simplecnn", str(path) if path else None, trainable, 32, 2,
                                share_frozen=True, head_seed=seed)

    first, second = classifier(), classifier()
    assert first.get_layer("simplecnn") is second.get_layer("simplecnn")
    for layer in ("head_bn", "predictions"):
        for a, b in zip(first.get_layer(layer).get_weights(),
                        second.get_layer(layer).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    unshared = build_classifier("simplecnn", str(weights), False, 32, 2, head_seed=7)
    np.testing.assert_array_equal(unshared.get_layer("predictions").get_weights()[0],
                                  first.get_layer("predictions").get_weights()[0])
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(first.predict(images, verbose=0),
                               unshared.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
    other = tmp_path / "b.weights.h5"
    build_classifier("simplecnn", None, False, 32, 2).get_layer("simplecnn").save_weights(other)
    assert classifier(other).get_layer("simplecnn") is not first.get_layer("simplecnn")
    assert classifier(trainable=True).get_layer("simplecnn") is not \
        first.get_layer("simplecnn")
    assert classifier(path=None).get_layer("simplecnn") is not \
        classifier(path=None).get_layer("simplecnn")
    saved = tmp_path / "second.keras"
    second.save(saved)  # a classifier sharing its backbone saves and loads like any other
    np.testing.assert_allclose(keras.saving.load_model(saved).predict(images, verbose=0),
                               second.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
