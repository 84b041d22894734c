"""finetune=linear_probe's regression: C chosen by cross-validation on the training split (as
the refit chooses it), never on the validation split the operating point is fitted on."""

from __future__ import annotations

import dataclasses

import keras
import mlflow
import numpy as np
import pytest

from experiments.config.schema import EvalConfig
from experiments.data.splits import Split, Splits
from experiments.errors import ConfigError
from experiments.models.classifier import build_classifier
from experiments.training import probe
from experiments.training.build import Prepared

VIEWS = 2


def features(n: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, VIEWS, width) features of two classes a little apart, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = rng.normal(size=(n, VIEWS, width)) + labels[:, None, None] * 0.8
    return x.astype(np.float32), labels


def split(labels: np.ndarray, name: str) -> Split:
    return Split(tuple(f"{name}_{i}.png" for i in range(len(labels))), tuple(labels.tolist()),
                 np.zeros((len(labels), 32, 32, 3), np.uint8))


def prepared_probe(tmp_path, val_labels: np.ndarray, train_labels: np.ndarray) -> Prepared:
    classifier = build_classifier("simplecnn", None, True, 32, 2)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"),
                                                 monitor="val_loss")
    test_labels = np.arange(10) % 2
    splits = Splits(("benign", "malignant"), split(train_labels, "train"),
                    split(val_labels, "val"), split(test_labels, "test"))
    return Prepared(splits, 1, [], 32, "float32", classifier, [checkpoint], None, None, None,
                    None)


def head_weights(model: keras.Model) -> list[np.ndarray]:
    return [*model.get_layer("head_bn").get_weights(),
            *model.get_layer("predictions").get_weights()]


@pytest.fixture
def tracking(tmp_path):
    """A store of the test's own for the metrics the probe logs."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    yield
    mlflow.set_tracking_uri(before)


def test_the_regression_is_chosen_on_the_training_split_not_on_validation(tmp_path, tracking):
    """Two fits with the same training split and opposite validation labels write the same
    head, and it is the regression `search` finds on the training split alone."""
    width = int(build_classifier("simplecnn", None, True, 32, 2).get_layer("gap")
                .output.shape[-1])
    train, train_labels = features(40, width, seed=0)
    val, val_labels = features(12, width, seed=1)
    test, _ = features(10, width, seed=2)
    cached = {"train": train, "val": val, "test": test}
    settings = dataclasses.replace(EvalConfig(seed=0), bootstrap_resamples=100)
    heads = []
    for labels in (val_labels, 1 - val_labels):
        prepared = prepared_probe(tmp_path, labels, train_labels)
        with mlflow.start_run():
            result = probe.fit(prepared, cached, settings, seed=0)
        heads.append(head_weights(result.model))
    for a, b in zip(*heads, strict=True):
        np.testing.assert_array_equal(a, b)
    expected, mean, _ = probe.search(train, train_labels, 0, 1e-3, folds=5)
    np.testing.assert_allclose(heads[0][2], mean, rtol=1e-5)  # head_bn's moving mean
    coef = heads[0][4][:, 1] - heads[0][4][:, 0]  # softmax of (-w.z/2, w.z/2)
    np.testing.assert_allclose(coef, expected.coef_[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("labels", "groups", "folds"), [
    ([0] * 9 + [1] * 3, None, 3),
    ([0] * 20 + [1] * 20, None, 5),
    ([0] * 6 + [1] * 6, ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "f", "f"], 3),
])
def test_the_search_has_as_many_folds_as_the_rarest_class_allows(labels, groups, folds):
    assert probe.inner_folds(np.asarray(labels), groups) == folds


def test_a_class_with_one_patient_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"finetune=linear_probe .* 2 or more patients"):
        probe.inner_folds(np.array([0, 0, 1, 1]), ["a", "a", "b", "b"])
