"""cv.cascade's estimate: each fold's test images answered by its home model where the home
model's referral accepts them, else by its all-source model; the home model's temperature from
home images only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments.config.schema import EvalConfig
from experiments.evaluation.evaluate import Evaluation
from experiments.evaluation.metrics import Predictions
from experiments.orchestration import cascading
from experiments.orchestration.oof import Fold, operating_point
from experiments.serving.cascade import Cascade, load_folder
from experiments.serving.inference import Predictor
from experiments.training.callbacks import TrainResult
from tests.serving.test_cascade import saved_model

FILES = ("a", "b", "c", "d", "e", "f")
LABELS = np.array([0, 1, 0, 1, 0, 1])
SOURCES = ("main", "main", "main", "main", "bh", "bh")


def fold(p: np.ndarray, referred: np.ndarray | None = None, number: int = 1) -> Fold:
    pred = Predictions(FILES, LABELS, np.stack([1 - p, p], axis=1), None, SOURCES)
    evaluation = Evaluation({}, pred, None, pred, pred, pred, 0.5, referred=referred)
    return Fold(1, number, evaluation, TrainResult({}, 1, 0.0, "val_loss", False, None), None)


def test_each_test_image_is_answered_by_the_home_model_where_it_accepts_it():
    fallback = fold(np.array([0.6, 0.4, 0.6, 0.4, 0.3, 0.7]))  # wrong on 4 home images
    home = fold(np.array([0.1, 0.9, 0.2, 0.3, 0.9, 0.1]),  # wrong on d and on both bh
                referred=np.array([False, False, False, True, True, True]))
    (cascade,) = cascading.cascade_folds([fallback], [home], positive=1)
    answered = cascade.evaluation.test.probabilities[:, 1]
    np.testing.assert_allclose(answered, [0.1, 0.9, 0.2, 0.4, 0.3, 0.7])
    assert cascade.evaluation.metrics["test_accuracy"] == pytest.approx(5 / 6)
    metrics = cascading.cascade_metrics([cascade], [fallback], 1,
                                        EvalConfig(seed=0, bootstrap_resamples=100))
    assert metrics["test_accuracy"] == pytest.approx(5 / 6)
    assert metrics["fallback_test_accuracy"] == pytest.approx(2 / 6)
    assert metrics["test_answered_by_first"] == pytest.approx(3 / 6)
    assert metrics["test_source_main_answered_by_first"] == pytest.approx(3 / 4)
    assert metrics["test_source_bh_answered_by_first"] == 0.0
    assert metrics["test_source_main_accuracy"] == pytest.approx(3 / 4)
    assert metrics["fallback_test_source_bh_accuracy"] == 1.0


def test_a_home_model_tested_on_other_images_cannot_be_routed():
    fallback = fold(np.full(6, 0.5))
    home = fold(np.full(6, 0.5), referred=np.zeros(6, bool))
    shuffled = dataclasses.replace(home, evaluation=dataclasses.replace(
        home.evaluation, test=home.evaluation.test.subset([1, 0, 2, 3, 4, 5])))
    with pytest.raises(RuntimeError, match="different images"):
        cascading.cascade_folds([fallback], [shuffled], positive=1)
    with pytest.raises(RuntimeError, match="no out-of-distribution referral"):
        cascading.cascade_folds([fallback], [fold(np.full(6, 0.5))], positive=1)


def test_the_home_models_temperature_is_fitted_on_home_images_only():
    """The home model is sure and right on its own images and sure and wrong on the other
    source's: fitted on all of them the temperature would flatten it; on its own, sharpen."""
    p = np.array([0.1, 0.9, 0.1, 0.45, 0.99, 0.01])  # d: a near miss
    settings = EvalConfig(seed=0, threshold="fixed")
    own, _ = operating_point([fold(p)], 1, settings, source="main")
    everything = Predictions(FILES, LABELS, np.stack([1 - p, p], axis=1), None, ("main",) * 6)
    as_home = dataclasses.replace(fold(p), evaluation=dataclasses.replace(
        fold(p).evaluation, plain=everything))
    mixed, _ = operating_point([as_home], 1, settings, source="main")
    assert own < 1.0 < mixed


def test_a_model_folder_with_a_fallback_is_a_cascade(tmp_path):
    saved_model(tmp_path / "model", seed=0, reference=True)
    assert isinstance(load_folder(tmp_path / "model"), Predictor)
    saved_model(tmp_path / "model" / "fallback", seed=1, reference=False)
    loaded = load_folder(tmp_path / "model")
    assert isinstance(loaded, Cascade) and loaded.info == loaded.first.info


@pytest.mark.parametrize(("home_temperature", "fitted"), [(True, True), (None, False),
                                                          (False, False)])
def test_the_home_model_fits_its_temperature_per_cv_home_temperature(tmp_path, home_temperature,
                                                                    fitted):
    """experiment=transfer_multisource: no temperature for the all-source model
    (eval.temperature_scaling=false), one for the home model (cv.home_temperature=true),
    fitted on its folds' out-of-fold predictions of the home images and recorded as the home
    runs' param; null follows eval.temperature_scaling."""
    from experiments.config.instantiate import components
    from experiments.config.validation import validated
    from tests.conftest import compose_config

    chosen = "null" if home_temperature is None else str(home_temperature).lower()
    cfg = compose_config(tmp_path, ["experiment=transfer_multisource", "data.root=/x",
                                    "data.sources.second.root=/y",
                                    f"cv.home_temperature={chosen}"])
    settings, parts = validated(cfg), components(cfg)
    assert not settings.eval.temperature_scaling
    home, home_parts = cascading.home_settings(settings, parts)
    assert home.eval.temperature_scaling is fitted
    assert home_parts.params["eval.temperature_scaling"] is fitted
    assert dataclasses.replace(home, eval=settings.eval) == settings  # nothing else changes
    near_miss = fold(np.array([0.1, 0.9, 0.1, 0.45, 0.99, 0.01]))  # sure and right: sharpen
    temperature, _ = operating_point([near_miss], 1, home.eval, source="main")
    assert (temperature < 0.9) is fitted and (temperature == 1.0) is not fitted
