"""Reporting like a paper: intervals, operating point, calibration, TTA, Grad-CAM."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from experiments.config.choices import TTA_VIEWS, views_to_cache
from experiments.data.transforms import tta_view
from experiments.evaluation import stats
from experiments.evaluation.gradcam import gradcam, last_feature_layer, pick_examples
from experiments.models.classifier import build_classifier
from experiments.serving.inference import apply_temperature
from experiments.serving.views import predict_probabilities


def noisy_scores(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and two-class probabilities from a fair but imperfect scorer."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n_per_class)
    score = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.001, 0.999)
    return labels, np.stack([1 - score, score], axis=1)


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_more_data():
    widths = []
    for n in (20, 500):
        labels, probs = noisy_scores(n)
        intervals = stats.bootstrap_intervals(labels, probs, positive=1, n_resamples=1000)
        assert set(intervals) == {"accuracy", "roc_auc", "sensitivity", "specificity"}
        for point, low, high in intervals.values():
            assert low <= point <= high
        widths.append({k: high - low for k, (_, low, high) in intervals.items()})
    for name in widths[0]:
        assert widths[1][name] < 0.75 * widths[0][name], name
    from sklearn.metrics import roc_auc_score
    assert intervals["roc_auc"][0] == pytest.approx(roc_auc_score(labels, probs[:, 1]))


def test_patient_intervals_of_few_patients_cover_the_population_value():
    """8 patients of 10 images, each patient with an accuracy of its own (Beta(6, 3), mean
    2/3): the plain percentile bootstrap's 95% interval held the population's accuracy in 86%
    of these 300 cohorts, the expanded one in 95%."""
    rng = np.random.default_rng(0)
    labels, groups = np.repeat([0, 1], 40), np.repeat(np.arange(8), 10)
    held = []
    for trial in range(300):
        correct = rng.random(80) < np.repeat(rng.beta(6, 3, 8), 10)
        p = np.where(correct == (labels == 1), 0.8, 0.2)
        _, low, high = stats.bootstrap_intervals(labels, np.stack([1 - p, p], axis=1), 1,
                                                 n_resamples=200, seed=trial,
                                                 groups=groups)["accuracy"]
        held.append(low <= 2 / 3 <= high)
    assert np.mean(held) >= 0.92
    # a hundred images: hardly wider than the plain 95% percentiles
    assert 0.95 < 1 - 2 * stats.expanded_tail(0.95, 100, 2) < 0.96
    assert 1 - 2 * stats.expanded_tail(0.95, 16, 2) > 0.975  # 16 patients


def test_bootstrap_is_seeded_and_keeps_class_counts():
    labels, probs = noisy_scores(15)
    first = stats.bootstrap_intervals(labels, probs, 1, n_resamples=200, seed=3)
    assert first == stats.bootstrap_intervals(labels, probs, 1, n_resamples=200, seed=3)
    index = stats.stratified_resamples(labels, 50, seed=0)
    assert (labels[index].sum(axis=1) == 15).all()


def test_thresholds_chosen_on_validation():
    labels, probs = noisy_scores(100)
    score = probs[:, 1]
    assert stats.choose_threshold(labels, score, "fixed", fixed=0.3) == 0.3
    youden = stats.choose_threshold(labels, score, "youden")
    rates = stats.rates_at_threshold(labels, score, youden)
    for other in np.linspace(0.05, 0.95, 19):  # Youden's J is the best sum on this data
        others = stats.rates_at_threshold(labels, score, other)
        assert (rates["sensitivity"] + rates["specificity"]
                >= others["sensitivity"] + others["specificity"] - 1e-9)
    strict = stats.choose_threshold(labels, score, "target_sensitivity", target_sensitivity=0.95)
    assert stats.rates_at_threshold(labels, score, strict)["sensitivity"] >= 0.95
    assert strict <= youden
    with pytest.raises(ValueError, match="eval.threshold"):
        stats.choose_threshold(labels, score, "median")


def test_temperature_scaling_calibrates_overconfident_predictions():
    labels, probs = noisy_scores(300, seed=1)
    overconfident = apply_temperature(probs, 0.25)  # sharpened: same ranking, worse ECE
    before = stats.reliability_bins(labels, overconfident).ece
    temperature = stats.fit_temperature(labels, overconfident)
    after = stats.reliability_bins(labels, apply_temperature(overconfident,
                                                             temperature)).ece
    assert temperature > 2 and after < 0.5 * before
    np.testing.assert_array_equal(np.argsort(overconfident[:, 1]),
                                  np.argsort(apply_temperature(overconfident, 3)[:, 1]))


def test_temperature_never_sharpens_a_model_on_a_separable_validation_split():
    """Every validation image right: the likelihood keeps improving as the temperature falls,
    so an unbounded fit sharpens the model as far as it may (the old fit: 0.05, and a served
    image at p = 1e-120). The fit stays at >= 1 there; one mistake makes it a real fit again."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    confident = np.where(labels[:, None] == np.arange(2), 0.8, 0.2)  # all right, p = 0.8
    assert stats.fit_temperature(labels, confident) == pytest.approx(1.0, abs=1e-3)
    sharpened = apply_temperature(confident, stats.TEMPERATURE_BOUNDS[0])
    assert sharpened[:, 1].max() > 1 - 1e-11  # what the unbounded fit would have served
    wrong = confident.copy()
    wrong[0] = wrong[0, ::-1]  # one mistake in 40: a free fit, inside the bounds - the one
    # that makes p(right) = 39/40, i.e. T = logit(0.8) / logit(0.975) = 0.38
    assert stats.fit_temperature(labels, wrong) == pytest.approx(
        np.log(4) / np.log(39), abs=0.01)


def test_dihedral_tta_of_a_rotation_invariant_model_equals_its_plain_prediction():
    """Per-pixel 1x1 convolutions and global pooling see the same pixels in every view."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 1, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    plain = predict_probabilities(model, images, 4, "none")
    np.testing.assert_allclose(predict_probabilities(model, images, 4, "dihedral"), plain,
                               atol=1e-5)
    # ... and a model that sees orientation does change under TTA.
    oriented = build_classifier("simplecnn", None, True, 16, 2)
    assert not np.allclose(predict_probabilities(oriented, images, 4, "dihedral"),
                           predict_probabilities(oriented, images, 4, "none"), atol=1e-6)


@pytest.mark.parametrize("n", [3, 40])  # eager (a request's few images) and traced (a folder)
def test_each_tta_averages_exactly_its_views(n):
    """rot90_zoom is views 0, 1, 8 and 9 of `tta_view` (not the first four): each TTA's mean
    is the mean of the model on its views, computed one by one."""
    model = build_classifier("simplecnn", None, True, 16, 2)
    images = np.random.default_rng(1).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    one_by_one = np.stack([model.predict(tta_view(tf.constant(images, tf.float32), v),
                                         verbose=0) for v in range(24)])
    for tta, views in TTA_VIEWS.items():
        np.testing.assert_allclose(predict_probabilities(model, images, 8, tta),
                                   one_by_one[list(views)].mean(axis=0), atol=1e-5)
    assert TTA_VIEWS["rot90_zoom"] == (0, 1, 8, 9)
    assert [views_to_cache(t) for t in ("none", "dihedral", "rot90_zoom",
                                        "rot90_multiscale")] == [1, 8, 16, 24]


@pytest.mark.parametrize(("backbone", "size"), [("simplecnn", 32), ("mobilenetv3large", 48)])
def test_gradcam_returns_a_map_of_the_image_size(backbone, size):
    model = build_classifier(backbone, None, True, size, 2)
    images = np.random.default_rng(1).uniform(0, 255, (3, size, size, 3))
    heatmaps = gradcam(model, images)
    assert heatmaps.shape == (3, size, size)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0 + 1e-6
    assert last_feature_layer(model, size).name == model.layers[2].name  # the backbone


def test_gradcam_of_a_stain_normalising_model_is_that_of_its_network():
    """The served model is stain normalisation in front of the network: its Grad-CAM is the
    network's on the normalised image (the network's last feature map), not a map of the
    stain layer's output."""
    from experiments.data import stain
    from experiments.serving import export

    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    network = build_classifier("simplecnn", None, True, 32, 2)
    layer = stain.fit("reinhard", images.astype(np.uint8))
    served = export.deliverable(network, 32, None, layer)
    expected = gradcam(network, layer(images).numpy())
    np.testing.assert_allclose(gradcam(served, images), expected, atol=1e-4)
    assert expected.max() == pytest.approx(1.0)  # a real map, normalised to its peak


def test_gradcam_examples_cover_both_classes_and_mistakes():
    labels = np.array([0, 0, 0, 1, 1, 1])
    predicted = np.array([0, 0, 1, 1, 1, 0])
    chosen = pick_examples(labels, predicted, 4)
    assert len(chosen) == 4 and {2, 5} <= set(chosen)  # both mistakes shown
    assert set(labels[chosen]) == {0, 1}


def test_the_calibrated_ece_bound_holds_a_calibrated_model_and_not_a_confident_wrong_one():
    rng = np.random.default_rng(3)
    p = rng.beta(2, 2, size=150)  # 150 images, confidences across the range
    probabilities = np.stack([1 - p, p], axis=1)
    bound = stats.calibrated_ece_quantile(probabilities, 10, seed=0)
    # the same as drawing labels and binning with reliability_bins, by brute force
    drawn = [stats.reliability_bins((rng.random(150) < p).astype(int), probabilities).ece
             for _ in range(2000)]
    assert bound == pytest.approx(np.quantile(drawn, 0.95), abs=0.01)
    assert 0.05 < bound < 0.15  # far from 0 on 150 images
    # labels from the model's own probabilities stay under it about 95% of the time
    under = np.mean([stats.reliability_bins((rng.random(150) < p).astype(int),
                                            probabilities).ece <= bound for _ in range(400)])
    assert 0.9 <= under <= 0.99
    # a model sure of the wrong class is far over it
    wrong = np.stack([np.full(150, 0.95), np.full(150, 0.05)], axis=1)
    assert stats.reliability_bins(np.ones(150, int), wrong).ece > 0.9 > (
        stats.calibrated_ece_quantile(wrong))
    assert np.isnan(stats.calibrated_ece_quantile(np.empty((0, 2))))
    # three classes: labels drawn from each row's distribution
    three = rng.dirichlet([1, 1, 1], size=150)
    drawn3 = [stats.reliability_bins(np.array([rng.choice(3, p=row) for row in three]),
                                     three).ece for _ in range(300)]
    assert stats.calibrated_ece_quantile(three, seed=1) == pytest.approx(
        np.quantile(drawn3, 0.95), abs=0.02)
