"""AdaBN: only BatchNorm statistics change, to the new images'; the adapted model is logged as
a new run and model version with the folder's fingerprint; eval.external can adapt a cohort."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from experiments import adapt as adapt_cli
from experiments import predict
from experiments.models.adapt import adapt_batchnorm
from experiments.run import run
from tests.conftest import all_runs, client_for, write_image


def small_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.get_layer("conv").trainable = False  # a frozen backbone's layers adapt too
    model.get_layer("bn").trainable = False
    return model


def test_only_batchnorm_statistics_change_to_those_of_the_new_images():
    model = small_model()
    images = np.random.default_rng(0).uniform(100, 200, (40, 8, 8, 3)).astype(np.float32)
    before = {w.path: np.array(w) for w in model.weights}
    assert adapt_batchnorm(model, images, batch_size=40) == 2
    changed = {w.path for w in model.weights if not np.allclose(np.array(w), before[w.path])}
    assert changed == {"bn/moving_mean", "bn/moving_variance", "head_bn/moving_mean",
                       "head_bn/moving_variance"}
    conv = np.asarray(model.get_layer("conv")(images))
    np.testing.assert_allclose(model.get_layer("bn").moving_mean, conv.mean(axis=(0, 1, 2)),
                               rtol=1e-4)
    np.testing.assert_allclose(model.get_layer("bn").moving_variance, conv.var(axis=(0, 1, 2)),
                               rtol=1e-3)
    assert not model.get_layer("bn").trainable and model.get_layer("dropout").rate == 0.5
    assert model.get_layer("bn").momentum == pytest.approx(0.99)


def test_batches_average_to_the_statistics_of_all_images():
    images = np.random.default_rng(1).uniform(0, 255, (48, 8, 8, 3)).astype(np.float32)
    whole, batched = small_model(), small_model()
    adapt_batchnorm(whole, images, batch_size=48)
    adapt_batchnorm(batched, images, batch_size=16)
    np.testing.assert_allclose(batched.get_layer("bn").moving_mean,
                               whole.get_layer("bn").moving_mean, rtol=1e-4)


def test_adapt_logs_a_new_version_and_eval_external_adapts_a_cohort(tmp_path, make_config):
    for i in range(6):  # another "laboratory": noise tiles, nothing like the demo set
        write_image(tmp_path / "lab" / ("benign" if i % 2 else "malignant") / f"x{i}.png",
                    size=48, seed=900 + i)
    run(make_config("trainer.epochs=1", "eval.tta=none", "mlflow.experiment_name=adapt",
                    f"+eval.external.lab.root={tmp_path / 'lab'}",
                    "+eval.external.lab.adapt=true"))
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (source,) = all_runs(client_for(tmp_path), "adapt")
    assert {"ext_lab_accuracy", "ext_lab_adabn_accuracy"} <= set(source.data.metrics)

    adapted_id = adapt_cli.adapt(source.info.run_id, str(tmp_path / "lab"), uri,
                                 register_as="lab_model")
    client = MlflowClient(uri)
    adapted = client.get_run(adapted_id)
    assert adapted.data.tags["adapted_from"] == source.info.run_id
    assert len(adapted.data.tags["adaptation_sha256"]) == 64
    assert adapted.info.experiment_id == source.info.experiment_id
    (version,) = client.search_model_versions("name = 'lab_model'")
    assert version.run_id == adapted_id
    files = sorted((tmp_path / "lab").rglob("*.png"))
    original = predict.load_predictor(source.info.run_id, uri)
    new = predict.load_predictor(adapted_id, uri)
    p_old = [r["p_malignant"] for r in original.score(files)]
    p_new = [r["p_malignant"] for r in new.score(files)]
    assert not np.allclose(p_old, p_new)  # the statistics moved
    assert new.info.threshold == original.info.threshold and new.ood is None
    # the same folder elsewhere has the same fingerprint
    assert adapt_cli.folder_fingerprint(files) == adapted.data.tags["adaptation_sha256"]
