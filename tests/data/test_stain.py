"""Stain normalisation: fitted on training images only, and it removes stain variation."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from experiments.data import stain
from experiments.data.folders import read_folder
from experiments.data.transforms import hed_jitter
from experiments.errors import DataError
from experiments.serving.export import deliverable
from experiments.serving.inference import load_model as load_checkpoint
from tests.conftest import SHARED_TRAIN, prepare

H_AND_E = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
H_AND_E = H_AND_E / np.linalg.norm(H_AND_E, axis=1, keepdims=True)


def beer_lambert_tiles(n: int = 12, size: int = 32, seed: int = 0) -> np.ndarray:
    """Per-pixel hematoxylin and eosin amounts (smooth random fields), as RGB (uint8)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.2, (n, size // 8, size // 8, 2))
    amounts = coarse.repeat(8, axis=1).repeat(8, axis=2) + rng.uniform(0, 0.2, (n, size, size, 2))
    return amounts


def render(amounts: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A lab's staining: each image's H and E amounts scaled by its own factors."""
    density = np.einsum("nhws,ns,sc->nhwc", amounts, scale, H_AND_E)
    return np.clip(np.round(256 * np.exp(-density) - 1), 0, 255).astype(np.uint8)


def two_labs(amounts: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (render(amounts, rng.uniform(0.6, 1.4, (len(amounts), 2))),
            render(amounts, rng.uniform(0.6, 1.4, (len(amounts), 2))))


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b).mean())


@pytest.mark.parametrize(("method", "ratio"), [("reinhard", 0.6), ("macenko", 0.3)])
def test_normalisation_removes_stain_variation(method, ratio):
    """The same tissue stained by two labs: normalised, the two copies nearly agree."""
    amounts = beer_lambert_tiles()
    first, second = two_labs(amounts)
    layer = stain.fit(method, render(amounts, np.ones((len(amounts), 2))))
    a, b = stain.apply(layer, first), stain.apply(layer, second)
    assert a.shape == first.shape and a.dtype == np.uint8
    assert difference(a, b) < ratio * difference(first, second)
    if method == "macenko":  # it finds the stain vectors the tissue was made of
        np.testing.assert_allclose(np.reshape(layer.target[:6], (2, 3)), H_AND_E, atol=0.1)


@pytest.mark.parametrize("method", stain.METHODS)
def test_images_without_tissue_pass_unchanged_and_the_rest_is_normalised_as_alone(method):
    """A blank (glass-only) tile and one with a few dark pixels, in training and in a batch to
    predict: no error (a blank tile's own Macenko estimate is undefined), they pass unchanged
    (Reinhard would colour glass like tissue), and the tissue beside them is normalised
    exactly as without them, by a target fitted on the tissue alone."""
    tissue = render(beer_lambert_tiles(4), np.ones((4, 2)))
    blank = np.full((2, 32, 32, 3), 255, np.uint8)
    blank[1, :2, :2] = 30  # 4 tissue pixels: too few to estimate stains from
    mixed = np.concatenate([blank[:1], tissue[:2], blank[1:], tissue[2:]])
    layer = stain.fit(method, mixed)
    np.testing.assert_allclose(layer.target, stain.fit(method, tissue).target, atol=1e-5)
    normalised = stain.apply(layer, mixed)
    np.testing.assert_array_equal(normalised[[0, 3]], blank)
    np.testing.assert_array_equal(normalised[[1, 2, 4, 5]], stain.apply(layer, tissue))
    served = tf.function(layer)(tf.constant(mixed, tf.float32))  # as inside a logged model
    np.testing.assert_array_equal(served.numpy()[[0, 3]], blank)


@pytest.mark.parametrize("method", stain.METHODS)
def test_training_images_without_any_tissue_name_the_method(method):
    with pytest.raises(DataError, match=f"(?i){method}.*no tissue"):
        stain.fit(method, np.full((3, 32, 32, 3), 255, np.uint8))


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="../shared/data/biopsy-seed absent")
@pytest.mark.parametrize("method", stain.METHODS)
def test_normalisation_on_real_biopsies(method):
    """Real tissue recoloured as by two labs (HED jitter): normalised copies come closer."""
    images = read_folder(SHARED_TRAIN, 64)[1].images[::4]
    copies = [np.round(np.concatenate([
        hed_jitter(tf.constant(images[i:i + 1], tf.float32), 0.3, 0.1,
                   tf.constant([lab * 1000 + i, 1])).numpy() for i in range(len(images))
    ])).astype(np.uint8) for lab in (0, 1)]
    layer = stain.fit(method, images)
    assert difference(*(stain.apply(layer, c) for c in copies)) < 0.6 * difference(*copies)


def test_reinhard_matches_the_target_lab_statistics():
    tiles = render(beer_lambert_tiles(20), np.random.default_rng(2).uniform(0.6, 1.4, (20, 2)))
    layer = stain.fit("reinhard", tiles[:10])
    mean, std = stain.lab_statistics(tf.constant(stain.apply(layer, tiles[10:]), tf.float32))
    np.testing.assert_allclose(np.median(mean.numpy(), axis=0), layer.target[:3], atol=2.5)
    np.testing.assert_allclose(np.median(std.numpy(), axis=0), layer.target[3:], atol=2.5)


# The prepared model is compiled but never trained, so its optimizer's variables were never
# built; loading the saved network says so (a trained run's model does not).
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer:UserWarning")
def test_normaliser_is_fitted_on_training_images_only_and_travels_with_the_model(
        make_config, tmp_path):
    cfg = make_config("data.stain_normalization=macenko")
    prepared = prepare(cfg)
    unnormalized = prepare(make_config()).splits
    expected = stain.fit("macenko", unnormalized.train.images)
    np.testing.assert_allclose(prepared.stain.target, expected.target, rtol=1e-5)
    everything = np.concatenate([unnormalized.train.images, unnormalized.val.images,
                                 unnormalized.test.images])
    assert not np.allclose(stain.fit("macenko", everything).target, expected.target)
    np.testing.assert_array_equal(prepared.splits.test.images,
                                  stain.apply(expected, unnormalized.test.images))
    # The exported model takes raw images and normalises them itself.
    exported = deliverable(prepared.model, 32, None, prepared.stain)
    exported.save(tmp_path / "m.keras")
    loaded = load_checkpoint(tmp_path / "m.keras")
    raw = unnormalized.test.images[:4].astype(np.float32)
    np.testing.assert_allclose(loaded.predict(raw, verbose=0),
                               prepared.model.predict(prepared.splits.test.images[:4]
                                                      .astype(np.float32), verbose=0),
                               atol=2e-3)


def test_unknown_method_names_the_key():
    with pytest.raises(ValueError, match="data.stain_normalization.*'vahadane'"):
        stain.fit("vahadane", np.zeros((1, 8, 8, 3), np.uint8))
