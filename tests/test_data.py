"""Scanning, splitting and decoding image folders."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import data as data_lib
from experiments.demo import ensure_demo_dataset

from .conftest import write_image


def test_split_is_disjoint_stratified_and_seeded(image_folder):
    splits = data_lib.make_splits(image_folder, None, 0.25, 0.25, seed=3)
    assert splits.class_names == ("benign", "malignant")
    assert splits.sizes() == {"train": 12, "val": 6, "test": 6}
    all_files = splits.train.files + splits.val.files + splits.test.files
    assert len(set(all_files)) == 24
    for split in (splits.train, splits.val, splits.test):
        counts = split.class_counts(splits.class_names)
        assert counts["benign"] == counts["malignant"]
    again = data_lib.make_splits(image_folder, None, 0.25, 0.25, seed=3)
    assert again == splits
    other = data_lib.make_splits(image_folder, None, 0.25, 0.25, seed=4)
    assert other.test.files != splits.test.files


def test_labels_follow_class_folders(image_folder):
    splits = data_lib.make_splits(image_folder, None, 0.25, 0.25, seed=0)
    for split in (splits.train, splits.val, splits.test):
        for file, label in zip(split.files, split.labels, strict=True):
            assert f"/{splits.class_names[label]}/" in file


def test_test_root_is_the_test_split(image_folder, tmp_path):
    test_root = tmp_path / "held_out"
    for label in ("benign", "malignant"):
        for i in range(3):
            write_image(test_root / label / f"t{i}.png", seed=50 + i)
    splits = data_lib.make_splits(image_folder, test_root, 0.25, 0.0, seed=0)
    assert splits.sizes() == {"train": 18, "val": 6, "test": 6}
    assert all(f.startswith(str(test_root)) for f in splits.test.files)


def test_overlap_is_refused(image_folder):
    """The same image in train and test (here: test_root == root) must never pass."""
    with pytest.raises(ValueError, match="is in both the"):
        data_lib.make_splits(image_folder, image_folder, 0.25, 0.0, seed=0)


def test_test_root_with_other_classes_is_refused(image_folder, tmp_path):
    write_image(tmp_path / "t" / "benign" / "a.jpg")
    write_image(tmp_path / "t" / "normal" / "a.jpg")
    with pytest.raises(ValueError, match="differ from data.root classes"):
        data_lib.make_splits(image_folder, tmp_path / "t", 0.25, 0.0, seed=0)


@pytest.mark.parametrize(("mode", "ext"), [("L", "png"), ("RGBA", "png"), ("RGB", "tif"),
                                           ("RGB", "bmp"), ("L", "jpg"), ("RGB", "jpeg")])
def test_formats_and_modes_load_as_rgb(tmp_path, mode, ext):
    path = write_image(tmp_path / f"img.{ext}", mode=mode, size=50)
    image = data_lib.load_image(str(path), 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    if mode == "L":
        np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_unreadable_images_are_all_named(tmp_path):
    good = write_image(tmp_path / "good.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError) as info:
        data_lib.load_images([str(good), str(text), str(empty)], 32)
    message = str(info.value)
    assert "2 unreadable image(s)" in message
    assert str(text) in message and str(empty) in message and str(good) not in message


def test_missing_root_and_single_class_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        data_lib.scan_folder(tmp_path / "does-not-exist")
    write_image(tmp_path / "one" / "benign" / "a.jpg")
    with pytest.raises(ValueError, match="at least two"):
        data_lib.scan_folder(tmp_path / "one")


def test_hidden_files_and_other_extensions_are_ignored(image_folder):
    (image_folder / "benign" / ".DS_Store").write_bytes(b"\0\1")
    (image_folder / "benign" / "._benign_0.jpg").write_bytes(b"\0\1")
    (image_folder / "benign" / "readme.txt").write_text("hi")
    _, files, _ = data_lib.scan_folder(image_folder)
    assert len(files) == 24


def test_training_dataset_is_float_batches_with_one_hot_labels():
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    ds = data_lib.training_dataset(images, [0, 1] * 5, 2, 4, lambda x: x, seed=0)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.dtype.name == "float32" and y.shape == (4, 2)
    np.testing.assert_allclose(y.numpy().sum(axis=1), 1.0)


def test_demo_set_is_deterministic_and_reused(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo", images_per_class=10, size=48)
    files = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    assert len(files) == 20 and {f.parts[0] for f in files} == {"benign", "malignant"}
    first = (root / files[0]).read_bytes()
    stamp = (root / files[0]).stat().st_mtime_ns
    assert ensure_demo_dataset(root, 10, 48) == root
    assert (root / files[0]).stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = ensure_demo_dataset(tmp_path / "demo2", images_per_class=10, size=48)
    assert (other / files[0]).read_bytes() == first


def test_demo_refuses_to_overwrite_a_user_folder(image_folder):
    with pytest.raises(FileExistsError, match="not a demo set"):
        ensure_demo_dataset(image_folder, 10, 48)
