"""Frozen-backbone features: cached once, reused by runs and folds, invalidated when anything
that changes them changes; the head trained on them is the head the image path trains; the
linear probe and k-NN log the test contract."""

from __future__ import annotations

import logging
import os

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from experiments.data import decode, pipeline
from experiments.data.image_store import file_key
from experiments.models import features
from experiments.run import run
from experiments.serving.inference import MODEL_FILE, load_model
from experiments.serving.views import predict_probabilities
from experiments.training import frozen as frozen_lib
from experiments.training.loop import TrainPlan, train
from tests.conftest import all_runs, client_for, prepare, read_csv

FROZEN = ["finetune=frozen", "augmentation=dihedral", "trainer.precision=float32"]


def test_features_are_computed_once_then_read_by_runs_and_folds(tmp_path, make_config):
    run(make_config(*FROZEN, "mlflow.experiment_name=cache"))
    run(make_config(*FROZEN, "mlflow.experiment_name=cache"))
    first, second = all_runs(client_for(tmp_path), "cache")
    assert first.data.metrics["features_computed"] == 40  # every demo image, once
    assert second.data.metrics["features_computed"] == 0
    assert second.data.metrics["features_reused"] == 40
    assert list((tmp_path / ".cache" / "features").glob("*.npz"))  # on disk for others
    features._MEMORY.clear()  # a new process: the disk cache serves
    run(make_config(*FROZEN, "cv.folds=2", "mlflow.experiment_name=folds"))
    folds = [r for r in all_runs(client_for(tmp_path), "folds") if "cv_fold" in r.data.tags]
    assert [r.data.metrics["features_computed"] for r in folds] == [0, 0]
    assert all(r.data.metrics["features_reused"] == 40 for r in folds)


def test_cache_keys_change_with_whatever_changes_a_feature(tmp_path):
    base = dict(backbone="resnet50", weights="imagenet", seed=1, image_size=224,
                precision="float32", stain_target=None)
    key = features.model_key(**base)
    assert features.model_key(**{**base, "seed": 2}) == key  # imagenet weights: seed-free
    for change in ({"backbone": "densenet201"}, {"image_size": 192}, {"weights": None},
                   {"precision": "mixed_bfloat16"}, {"stain_target": [1.0, 2.0]}):
        assert features.model_key(**{**base, **change}) != key, change
    random = {**base, "weights": None}
    assert features.model_key(**{**random, "seed": 2}) != features.model_key(**random)

    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    cache = features.FeatureCache("k", tmp_path / "cache")
    calls = []

    def compute(images: np.ndarray, views: int) -> np.ndarray:
        calls.append(len(images))
        return np.ones((len(images), views, 4), np.float32) * len(calls)

    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    cache.get([str(image)], pixels, 1, compute)
    cache.get([str(image)], pixels, 1, compute)
    assert calls == [1]
    image.write_bytes(b"changed")  # another file content (size, time): computed anew
    os.utime(image, ns=(1, 1))
    assert cache.get([str(image)], pixels, 1, compute)[0, 0, 0] == 2
    cache.get([str(image)], pixels, 8, compute)  # other views: their own entries
    assert calls == [1, 1, 1]
    cache.get([str(image)], pixels, 8, compute, [0.5])  # rescaled (a source's mpp): its own
    assert calls == [1, 1, 1, 1]
    assert file_key(str(image), None) == file_key(str(image))


def test_fewer_views_are_read_from_a_cache_of_more(tmp_path):
    """The views are ordered (plain, dihedral, zoomed out): 8 or 1 views of an image whose 16
    are cached are their prefix, read from memory or disk, never computed again."""
    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    calls = []

    def compute(images: np.ndarray, views: int) -> np.ndarray:
        calls.append(views)
        return np.arange(views * 4, dtype=np.float32).reshape(1, views, 4)

    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    cache = features.FeatureCache("k", tmp_path / "cache")
    sixteen = cache.get([str(image)], pixels, 16, compute)
    np.testing.assert_array_equal(cache.get([str(image)], pixels, 8, compute), sixteen[:, :8])
    features._MEMORY.clear()  # a new process: from the 16-view file on disk
    np.testing.assert_array_equal(cache.get([str(image)], pixels, 1, compute), sixteen[:, :1])
    assert calls == [16]


def test_head_trained_on_features_equals_the_image_path_on_the_same_batches(tmp_path,
                                                                            make_config):
    """Dihedral-only augmentation, dropout off: both paths see the same batches in the same
    views, so they end with the same head (within float tolerance)."""
    cfg = make_config(*FROZEN, "trainer.epochs=2")
    settings = OmegaConf.to_object(cfg)
    heads = []
    for path in ("images", "features"):
        keras.backend.clear_session()
        prepared = prepare(cfg)
        prepared.model.get_layer("dropout").rate = 0.0
        out = tmp_path / path
        if path == "images":
            splits = prepared.splits
            train_ds = pipeline.training_dataset(splits.train.images, splits.train.labels, 2,
                                                 8, prepared.augment, settings.trainer.seed)
            val_ds = pipeline.evaluation_dataset(splits.val.images, splits.val.labels, 2, 8)
            train(prepared.model, train_ds, val_ds,
                  TrainPlan(2, prepared.callbacks, out / "b", verbose=0))
        else:
            cached = frozen_lib.split_features(settings, prepared, 8)
            head = features.head_model(prepared.model)
            head.compile(optimizer=prepared.model.optimizer, loss=prepared.model.loss)
            train_ds = features.head_dataset(cached["train"], prepared.splits.train.labels, 2, 8,
                                             settings.trainer.seed, draw_views=True)
            head.fit(train_ds, epochs=2, verbose=0, shuffle=False)
        heads.append([w.numpy() for w in prepared.model.get_layer("predictions").weights]
                     + [w.numpy() for w in prepared.model.get_layer("head_bn").weights])
    for exact, cached in zip(*heads, strict=True):
        np.testing.assert_allclose(cached, exact, rtol=1e-4, atol=1e-5)


def test_frozen_run_with_random_augmentation_says_why_it_trains_on_images(make_config,
                                                                          caplog):
    with caplog.at_level(logging.INFO, logger="experiments"):
        run(make_config("finetune=frozen", "augmentation=hed", "trainer.epochs=1",
                        "mlflow.experiment_name=slow"))
    assert "trains on images, not on cached features" in caplog.text


def test_linear_probe_logs_the_test_contract_and_its_model_is_the_regression(tmp_path,
                                                                             make_config):
    run(make_config("finetune=linear_probe", "trainer.precision=float32",
                    "mlflow.experiment_name=probe"))
    client = client_for(tmp_path)
    (finished,) = all_runs(client, "probe")
    metrics = finished.data.metrics
    for prefix in ("test_", "test_tta_", "knn_test_"):
        for name in ("accuracy", "roc_auc"):
            assert (metrics[f"{prefix}{name}_ci_low"] <= metrics[f"{prefix}{name}"]
                    <= metrics[f"{prefix}{name}_ci_high"])
    assert metrics["probe_C"] > 0 and metrics["knn_k"] >= 1
    # The saved classifier (images in) predicts what the regression on cached features did.
    model = load_model(tmp_path / "out" / "model" / MODEL_FILE)
    rows = read_csv(client, finished.info.run_id, "test_predictions.csv", tmp_path / "dl")
    images = np.stack([decode.load_image(r["file"], 32) for r in rows]).astype("float32")
    expected = np.array([[float(r["p_benign"]), float(r["p_malignant"])] for r in rows])
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=1e-4)


@pytest.mark.parametrize(("tta", "cached"), [("dihedral_zoom", 16), ("rot90_zoom", 16),
                                             ("rot90_multiscale", 24)])
def test_a_probe_with_zoomed_views_trains_on_every_cached_view(tmp_path, make_config, tta,
                                                                cached):
    """A TTA with zoomed views: 16 views cached per image (the dihedral ones, then at half
    the magnification; 24: then at twice it), the probe trained on all, and the TTA metrics
    what the saved model gives on the images with that TTA's views (16, 4 or 6)."""
    run(make_config("finetune=linear_probe", "augmentation=dihedral", f"eval.tta={tta}",
                    "trainer.precision=float32", "mlflow.experiment_name=zoom"))
    assert list((tmp_path / ".cache" / "features").glob(f"*-{cached}views.npz"))
    (finished,) = all_runs(client_for(tmp_path), "zoom")
    rows = read_csv(client_for(tmp_path), finished.info.run_id, "test_predictions.csv",
                    tmp_path / "dl")
    images = np.stack([decode.load_image(r["file"], 32) for r in rows])
    truth = [r["label"] == "malignant" for r in rows]
    model = load_model(tmp_path / "out" / "model" / MODEL_FILE)
    with_views = predict_probabilities(model, images, 8, tta)[:, 1]
    assert roc_auc_score(truth, with_views) == pytest.approx(
        finished.data.metrics["test_tta_roc_auc"], abs=1e-9)
    other = "dihedral" if tta == "dihedral_zoom" else "dihedral_zoom"
    assert not np.allclose(with_views, predict_probabilities(model, images, 8, other)[:, 1],
                           atol=1e-6)


@pytest.fixture(autouse=True)
def _fresh_feature_cache():
    features._MEMORY.clear()
    yield
    features._MEMORY.clear()


def test_two_stage_trains_its_head_only_stage_on_cached_features(tmp_path, make_config):
    run(make_config("finetune=two_stage", "finetune.head_epochs=1", "trainer.epochs=3",
                    "augmentation=dihedral", "mlflow.experiment_name=two_stage"))
    client = client_for(tmp_path)
    (finished,) = all_runs(client, "two_stage")
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics["features_computed"] == 40  # the head-only stage's features
    for name in ("loss", "val_loss", "lr"):  # both stages in one curve
        steps = [m.step for m in client.get_metric_history(finished.info.run_id, name)]
        assert sorted(steps) == [1, 2, 3], name
    lrs = {m.step: m.value for m in client.get_metric_history(finished.info.run_id, "lr")}
    assert lrs[2] == pytest.approx(lrs[1] * 0.1)  # the second stage's learning rate


def test_a_gem_probes_referral_features_are_cached_apart_and_read_by_folds_and_refit(
        tmp_path, make_config, monkeypatch):
    """A GeM head's cache holds GeM features, the referral measures the average of the map:
    those are cached apart, each image's computed once - no fold, refit or second run passes
    the images through the backbone again for its referral."""
    from experiments.serving import export

    passes = []
    real = export.pooled_features
    monkeypatch.setattr(export, "pooled_features",
                        lambda *args, **kwargs: passes.append(1) or real(*args, **kwargs))
    cfg = make_config("finetune=linear_probe", "backbone.global_pool=gem", "eval.tta=none",
                      "augmentation=dihedral", "cv.folds=2", "cv.refit=true",
                      "mlflow.experiment_name=gem")
    before = features.COUNTS["computed"]
    run(cfg)
    assert features.COUNTS["computed"] - before == 2 * 40  # the head's, the referral's
    assert not passes
    assert len(list((tmp_path / ".cache" / "features").glob("*-1views.npz"))) == 1
    runs = all_runs(client_for(tmp_path), "gem")
    assert all("test_referred" in r.data.metrics for r in runs if "cv_fold" in r.data.tags)
    before = features.COUNTS["computed"]
    run(cfg)
    assert features.COUNTS["computed"] == before
