"""The H&E augmentations one by one: what each does, and that it is seeded."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from experiments.data.augment import TissueAugmentation
from experiments.data.transforms import (
    dihedral_view,
    hed_jitter,
    random_dihedral,
    random_scale,
    tta_view,
    tta_view_tensor,
    zoom_in,
    zoom_out,
)

BATCH = tf.random.uniform((6, 32, 32, 3), 0, 255, seed=3)
OPTIONS = {
    "dihedral": {"dihedral": True},
    "crop": {"crop_scale": 0.5},
    "multiscale": {"multiscale": True},
    "hed": {"hed_sigma": 0.1, "hed_bias": 0.05},
    "color": {"brightness": 0.1, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
    "blur": {"blur_sigma": 1.5, "blur_probability": 1.0},
    "randaugment": {"randaugment_ops": 2, "randaugment_magnitude": 0.5},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_augmentation_keeps_shape_dtype_range_and_repeats_with_its_seed(name):
    first = TissueAugmentation(seed=7, **OPTIONS[name])(BATCH)
    assert first.shape == BATCH.shape and first.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(first)) and float(tf.reduce_max(first)) <= 255.0
    assert not np.allclose(first.numpy(), BATCH.numpy())
    again = TissueAugmentation(seed=7, **OPTIONS[name])(BATCH)
    np.testing.assert_allclose(first.numpy(), again.numpy(), atol=1e-3)
    unchanged = TissueAugmentation(seed=7, **OPTIONS[name])(BATCH, training=False)
    np.testing.assert_array_equal(unchanged.numpy(), BATCH.numpy())


def test_dihedral_views_are_exact_and_all_eight_distinct():
    image = BATCH[:1]
    views = [dihedral_view(image, v).numpy() for v in range(8)]
    for v, view in enumerate(views):  # the same pixels, moved
        np.testing.assert_array_equal(np.sort(view, axis=None), np.sort(image.numpy(), axis=None))
        np.testing.assert_array_equal(random_dihedral(image, tf.constant([v])).numpy(), view)
    assert len({view.tobytes() for view in views}) == 8


def test_zoom_out_halves_the_magnification_in_the_centre_and_mirrors_the_rest():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.uniform(0, 255, (2, 8, 8, 3)), tf.float32)
    zoomed = zoom_out(image).numpy()
    assert zoomed.shape == (2, 8, 8, 3)
    # the centre 4 x 4: each pixel the mean of a 2 x 2 block of the original
    blocks = image.numpy().reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(zoomed[:, 2:6, 2:6], blocks, rtol=1e-5)
    np.testing.assert_allclose(zoomed[:, 1], zoomed[:, 3], rtol=1e-6)  # mirrored about row 2
    flat = tf.fill((1, 7, 7, 3), 90.0)  # odd sizes too; a uniform slide stays uniform
    np.testing.assert_allclose(zoom_out(flat).numpy(), 90.0, rtol=1e-5)


def test_zoom_in_doubles_the_magnification_of_the_centre():
    """The centre half, upsampled: a 2 x 2 block of a piecewise-constant image becomes 4 x 4
    (away from the edges, where bilinear interpolation mixes neighbours); uniform stays
    uniform; the corners of the original are outside the view."""
    blocks = np.kron(np.arange(16, dtype=np.float32).reshape(4, 4), np.ones((4, 4)))
    image = tf.constant(np.repeat(blocks[None, :, :, None], 3, axis=3))  # 16 x 16
    zoomed = zoom_in(image).numpy()[0, :, :, 0]
    assert zoomed.shape == (16, 16)
    np.testing.assert_allclose(zoomed[1:6, 1:6], 5.0)  # block (1, 1) of the original
    np.testing.assert_allclose(zoomed[10:15, 10:15], 10.0)  # block (2, 2)
    assert zoomed.min() >= 5.0 - 1e-5 and zoomed.max() <= 10.0 + 1e-5  # centre blocks only
    np.testing.assert_allclose(zoom_in(tf.fill((1, 7, 7, 3), 90.0)).numpy(), 90.0, rtol=1e-5)


def test_the_tta_views_are_the_dihedral_ones_then_the_same_zoomed_out_then_in():
    image = tf.constant(np.random.default_rng(1).uniform(0, 255, (1, 8, 8, 3)), tf.float32)
    for view in range(24):
        expected = dihedral_view(image, view % 8)
        if view >= 8:
            expected = zoom_in(expected) if view >= 16 else zoom_out(expected)
        np.testing.assert_allclose(tta_view(image, view).numpy(), expected.numpy())
        np.testing.assert_allclose(tta_view_tensor(image, tf.constant(view)).numpy(),
                                   expected.numpy())


def test_multiscale_shows_each_image_as_it_is_or_zoomed_out_or_in():
    """Each image is exactly one of the three test-time scales, and a batch holds all three."""
    images = tf.random.uniform((24, 16, 16, 3), 0, 255, seed=5)
    scaled = random_scale(images, tf.constant([1, 2], tf.int64)).numpy()
    candidates = [images.numpy(), zoom_out(images).numpy(), zoom_in(images).numpy()]
    chosen = [[np.allclose(s, c[i], atol=1e-4) for c in candidates]
              for i, s in enumerate(scaled)]
    assert all(sum(match) == 1 for match in chosen)
    assert {match.index(True) for match in chosen} == {0, 1, 2}
    augment = TissueAugmentation(seed=1, dihedral=True, multiscale=True)  # as training runs it:
    batches = tf.data.Dataset.from_tensor_slices(images).batch(10).map(augment)  # batch dim None
    assert [b.shape[0] for b in batches] == [10, 10, 4]


def test_hed_jitter_without_jitter_is_the_identity_and_moves_stains_otherwise():
    seed = tf.constant([1, 2])
    np.testing.assert_allclose(hed_jitter(BATCH, 0.0, 0.0, seed).numpy(), BATCH.numpy(),
                               atol=0.05)
    shifted = hed_jitter(BATCH, 0.0, 0.2, seed).numpy()
    assert np.abs(shifted - BATCH.numpy()).mean() > 1.0


def test_blur_only_smooths():
    """A blurred image has less high-frequency energy than the original."""
    blurred = TissueAugmentation(seed=1, blur_sigma=2.0, blur_probability=1.0)(BATCH).numpy()
    def roughness(x):
        return np.abs(np.diff(x, axis=1)).mean()
    assert roughness(blurred) < 0.7 * roughness(BATCH.numpy())
    np.testing.assert_allclose(blurred.mean(), BATCH.numpy().mean(), rtol=0.02)


@pytest.mark.parametrize(("key", "value"), [("hed_sigma", 1.5), ("crop_scale", 0.0),
                                            ("hue", 0.7), ("randaugment_ops", -1)])
def test_out_of_range_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"augmentation.{key}.*Received: {key}={value}"):
        TissueAugmentation(seed=0, **{key: value})


@pytest.mark.parametrize("kind", ["mixup", "cutmix", "both"])
def test_label_mixing_keeps_shapes_mixes_labels_like_pixels_and_is_off_at_inference(kind):
    """Constant images (image i all value v_i): a mixed image's mean pixel tells the share of
    its partner's pixels, which must equal the share of the partner's label."""
    alphas = {"mixup": {"mixup_alpha": 0.4}, "cutmix": {"cutmix_alpha": 1.0},
              "both": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}}[kind]
    values = tf.constant([0.0, 40.0, 100.0, 160.0, 200.0, 250.0])
    images = tf.ones((6, 16, 16, 3)) * values[:, None, None, None]
    labels = tf.one_hot([0, 1, 0, 1, 1, 0], 2)
    augment = TissueAugmentation(seed=3, **alphas)
    mixed, mixed_labels = augment.mix(images, labels)
    assert mixed.shape == images.shape and mixed_labels.shape == labels.shape
    np.testing.assert_allclose(mixed_labels.numpy().sum(axis=1), 1.0, atol=1e-6)
    partner = values.numpy()[::-1]  # each image's partner: the reversed batch
    share = (mixed.numpy().mean(axis=(1, 2, 3)) - values.numpy()) / (partner - values.numpy())
    own = labels.numpy()
    # the label weight that moved from the image's own label to its partner's
    moved = np.where((own == labels.numpy()[::-1]).all(axis=1), np.nan,
                     1 - (mixed_labels.numpy() * own).sum(axis=1))
    keep = ~np.isnan(moved)
    np.testing.assert_allclose(share[keep], moved[keep], atol=1e-4)
    assert (share[keep] > 0).any()  # something was mixed
    same, same_labels = augment.mix(images, labels, training=False)
    np.testing.assert_array_equal(same.numpy(), images.numpy())
    np.testing.assert_array_equal(same_labels.numpy(), labels.numpy())
