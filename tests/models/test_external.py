"""Backbones from files: a KerasHub preset (a tiny randomly initialised DINOv2 saved with
`save_to_preset`, never a download) and a saved Keras feature extractor run through the
frozen-feature paths, predict and serving like any backbone; their pooling and failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments import predict
from experiments.data import decode
from experiments.errors import ConfigError, MissingFileError
from experiments.evaluation import gradcam
from experiments.models import external, features
from experiments.models.classifier import build_classifier
from experiments.run import run
from experiments.serving.inference import MODEL_FILE, load_model
from tests.conftest import all_runs, client_for, read_csv

keras_hub = pytest.importorskip("keras_hub")
import keras  # noqa: E402

HIDDEN = 16
# The small test config sets backbone.weights=null; these backbones' weights are their files.
WEIGHTS_FROM_PRESET, WEIGHTS_FROM_PATH = ("backbone.weights=${backbone.preset}",
                                          "backbone.weights=${backbone.path}")


def tiny_preset(folder, size: int = 32, registers: int = 1):
    """A 1-layer DINOv2 on 8-px patches (16 patches + class + register tokens) and its image
    converter, saved as a KerasHub preset folder."""
    keras_hub.models.DINOV2Backbone(
        patch_size=8, num_layers=1, hidden_dim=HIDDEN, num_heads=2, intermediate_dim=32,
        num_register_tokens=registers, image_shape=(size, size, 3),
        position_embedding_shape=(size, size, 3)).save_to_preset(str(folder))
    keras_hub.layers.DINOV2ImageConverter(
        image_size=(size, size), scale=[1 / 255 / 0.229, 1 / 255 / 0.224, 1 / 255 / 0.225],
        offset=[-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]).save_to_preset(str(folder))
    return folder


def tiny_keras_file(path, size: int = 32):
    """A small CNN feature extractor with its own preprocessing, saved as .keras."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    keras.Model(inputs, keras.layers.Conv2D(12, 3)(x)).save(path)
    return path


@pytest.fixture(autouse=True)
def _fresh_feature_cache():
    features._MEMORY.clear()
    yield
    features._MEMORY.clear()


def test_token_pooling_takes_the_class_token_and_the_mean_of_the_patches(tmp_path):
    preset = tiny_preset(tmp_path / "preset", registers=2)
    network, scale, offset = external.load_preset(str(preset))
    np.testing.assert_allclose(scale, [1 / 255 / 0.229, 1 / 255 / 0.224, 1 / 255 / 0.225])
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    tokens = np.asarray(network({"images": images * scale + offset}))
    assert tokens.shape == (3, 1 + 2 + 16, HIDDEN)
    expected = {"cls": tokens[:, 0], "mean": tokens[:, 3:].mean(axis=1),
                "cls_mean": np.concatenate([tokens[:, 0], tokens[:, 3:].mean(axis=1)], axis=1)}
    for pooling, want in expected.items():
        classifier = build_classifier("keras_hub", str(preset), False, 32, 2, pooling=pooling)
        got = features.feature_model(classifier).predict(images, verbose=0)
        np.testing.assert_allclose(got, want, atol=1e-4)
        # tokens have no spatial map: evaluation skips Grad-CAM, a direct call says why
        assert not gradcam.has_feature_map(classifier)
        assert gradcam.save_overlays(classifier, images, ["a", "b", "c"], np.array([0, 1, 0]),
                                     np.full((3, 2), 0.5), ["a", "b"], 2, tmp_path) == []
        with pytest.raises(ValueError, match="pools tokens"):
            gradcam.gradcam(classifier, images)


def test_keras_hub_linear_probe_runs_predicts_and_serves(tmp_path, make_config):
    preset = tiny_preset(tmp_path / "preset")
    run(make_config("backbone=keras_hub", f"backbone.preset={preset}", WEIGHTS_FROM_PRESET,
                    "backbone.pooling=cls_mean", "finetune=linear_probe",
                    "trainer.precision=float32", "mlflow.experiment_name=hub"))
    client = client_for(tmp_path)
    (finished,) = all_runs(client, "hub")
    assert finished.info.status == "FINISHED"
    assert finished.data.params["weights_source"] == f"keras_hub:{preset.resolve()}"
    assert finished.data.params["weights_sha256"] == external.fingerprint(str(preset))
    assert 0 <= finished.data.metrics["test_accuracy"] <= 1
    # The saved model (images in) predicts what the run scored; it loads with keras_hub.
    model = load_model(tmp_path / "out" / "model" / MODEL_FILE)
    assert model.get_layer("gap").output.shape[-1] == 2 * HIDDEN
    rows = read_csv(client, finished.info.run_id, "test_predictions.csv", tmp_path / "dl")
    images = np.stack([decode.load_image(r["file"], 32, resize="crop") for r in rows])
    np.testing.assert_allclose(model.predict(images.astype("float32"), verbose=0)[:, 1],
                               [float(r["p_malignant"]) for r in rows], atol=1e-4)
    # predict and the served MLflow model (its requirements name keras-hub) agree.
    predictor = predict.load_predictor(finished.info.run_id,
                                       f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    scored = predictor.score([r["file"] for r in rows[:2]])
    import mlflow.pyfunc

    model_uri = finished.data.tags["model_uri"]
    requirements = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text().split()
    assert any(line.startswith("keras-hub==") for line in requirements)
    served = mlflow.pyfunc.load_model(model_uri)
    out = served.predict(pd.DataFrame({"image": [Path(r["file"]).read_bytes()
                                                 for r in rows[:2]]}))
    np.testing.assert_allclose(out["p_malignant"], [s["p_malignant"] for s in scored],
                               atol=1e-5)


def test_keras_file_frozen_head_reads_cached_features(tmp_path, make_config):
    path = tiny_keras_file(tmp_path / "extractor.keras")
    for _ in range(2):
        run(make_config("backbone=keras_file", f"backbone.path={path}", WEIGHTS_FROM_PATH,
                        "finetune=frozen",
                        "augmentation=dihedral", "trainer.epochs=1",
                        "trainer.precision=float32", "mlflow.experiment_name=file"))
    first, second = all_runs(client_for(tmp_path), "file")
    assert {first.data.metrics["features_computed"],
            second.data.metrics["features_computed"]} == {40, 0}  # the second run reads them
    assert first.data.params["weights_source"] == f"keras_file:{path.resolve()}"


def test_missing_or_misfit_backbone_files_fail_clearly(tmp_path, make_config):
    with pytest.raises(MissingFileError, match="backbone.preset"):
        build_classifier("keras_hub", str(tmp_path / "nowhere"), False, 32, 2)
    with pytest.raises(MissingFileError, match="backbone.path"):
        build_classifier("keras_file", str(tmp_path / "model.h5"), False, 32, 2)
    preset = tiny_preset(tmp_path / "preset")
    with pytest.raises(ConfigError, match="data.image_size"):
        build_classifier("keras_hub", str(preset), False, 64, 2)
    (preset / "image_converter.json").unlink()
    with pytest.raises(ConfigError, match="image_converter.json"):
        build_classifier("keras_hub", str(preset), False, 32, 2)


def test_composition_needs_the_location_and_keeps_weights_on_it(tmp_path, make_config):
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="needs backbone.preset"):
        OmegaConf.to_object(make_config("backbone=keras_hub"))
    with pytest.raises(ValueError, match="backbone.weights"):
        OmegaConf.to_object(make_config("backbone=keras_file", "backbone.path=/x.keras",
                                        "backbone.weights=imagenet"))
    with pytest.raises(ValueError, match="backbone.pooling"):
        OmegaConf.to_object(make_config("backbone.pooling=max"))
