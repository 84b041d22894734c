"""Scanning, splitting and decoding image folders."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.data import decode as decode_lib
from experiments.data import folders as folders_lib
from experiments.data import pipeline
from experiments.data import splits as splits_lib
from experiments.data.augment import NoAugmentation
from experiments.data.demo import ensure_demo_dataset
from tests.conftest import write_image


def splits_of(root, test_root=None, val=0.25, test=0.25, seed=0, size=32):
    class_names, pool, _ = folders_lib.read_folder(root, size)
    held_out = None if test_root is None else folders_lib.read_folder(test_root, size)[1]
    return splits_lib.make_splits(class_names, pool, held_out, val, test, seed)


def test_split_is_disjoint_stratified_and_seeded(image_folder):
    splits = splits_of(image_folder, seed=3)
    assert splits.class_names == ("benign", "malignant")
    assert splits.sizes() == {"train": 12, "val": 6, "test": 6}
    all_files = splits.train.files + splits.val.files + splits.test.files
    assert len(set(all_files)) == 24
    for split in (splits.train, splits.val, splits.test):
        counts = split.class_counts(splits.class_names)
        assert counts["benign"] == counts["malignant"]
        assert split.images.shape == (len(split), 32, 32, 3)
    assert splits_of(image_folder, seed=3) == splits
    assert splits_of(image_folder, seed=4).test.files != splits.test.files


def test_images_and_labels_follow_their_files(image_folder):
    splits = splits_of(image_folder)
    for split in (splits.train, splits.val, splits.test):
        for file, label, image in zip(split.files, split.labels, split.images, strict=True):
            assert f"/{splits.class_names[label]}/" in file
            np.testing.assert_array_equal(image, decode_lib.load_image(file, 32))


def test_test_root_is_the_test_split(image_folder, tmp_path):
    test_root = tmp_path / "held_out"
    for label in ("benign", "malignant"):
        for i in range(3):
            write_image(test_root / label / f"t{i}.png", seed=50 + i)
    splits = splits_of(image_folder, test_root, test=0.0)
    assert splits.sizes() == {"train": 18, "val": 6, "test": 6}
    assert all(f.startswith(str(test_root)) for f in splits.test.files)


def test_overlap_is_refused(image_folder):
    """The same image in train and test (here: test_root == root) must never pass."""
    with pytest.raises(ValueError, match="is in both the"):
        splits_of(image_folder, image_folder, test=0.0)


@pytest.mark.parametrize(("mode", "ext"), [("L", "png"), ("RGBA", "png"), ("RGB", "tif"),
                                           ("RGB", "bmp"), ("L", "jpg"), ("RGB", "jpeg")])
def test_formats_and_modes_load_as_rgb(tmp_path, mode, ext):
    path = write_image(tmp_path / f"img.{ext}", mode=mode, size=50)
    image = decode_lib.load_image(str(path), 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    if mode == "L":
        np.testing.assert_array_equal(image[..., 0], image[..., 2])


@pytest.mark.parametrize("ext", ["tif", "png"])
def test_16_bit_images_keep_their_high_byte_not_a_white_clip(tmp_path, ext):
    """Pillow's convert("RGB") clips 16-bit pixels at 255 (a 16-bit grayscale image came out
    white); they read as their high byte, as Pillow reads 16-bit RGB TIFFs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels, low = (rng.integers(0, 256, (40, 40), dtype=np.uint16) for _ in range(2))
    Image.fromarray(pixels * 256 + low).save(tmp_path / f"deep.{ext}")  # high byte: pixels
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "eight.png")
    deep = decode_lib.load_image(str(tmp_path / f"deep.{ext}"), 32)
    np.testing.assert_array_equal(deep, decode_lib.load_image(str(tmp_path / "eight.png"), 32))
    assert 100 < deep.mean() < 155


def test_32_bit_integer_and_float_images_are_refused_by_name(tmp_path):
    from PIL import Image

    good = write_image(tmp_path / "good.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 2**20, (40, 40), dtype=np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(rng.random((40, 40), dtype=np.float32)).save(tmp_path / "f.tif")
    files = [str(good), str(tmp_path / "i.tif"), str(tmp_path / "f.tif")]
    images, invalid = folders_lib.load_images(files, 32)
    assert images.shape == (1, 32, 32, 3)
    assert [bad.file for bad in invalid] == files[1:]
    assert invalid[0].reason.startswith("32-bit integer pixels (mode I) have no defined")
    assert invalid[1].reason.startswith("32-bit floating-point pixels (mode F) have no defined")


def test_unreadable_images_are_all_named(tmp_path):
    good = write_image(tmp_path / "good.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    images, invalid = folders_lib.load_images([str(good), str(text), str(empty)], 32)
    assert images.shape == (1, 32, 32, 3)
    assert [bad.file for bad in invalid] == [str(text), str(empty)]
    assert all(bad.reason for bad in invalid)


def test_missing_root_and_single_class_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        folders_lib.scan_folder(tmp_path / "does-not-exist")
    write_image(tmp_path / "one" / "benign" / "a.jpg")
    with pytest.raises(ValueError, match="at least 2"):
        folders_lib.scan_folder(tmp_path / "one")


def test_a_test_root_that_is_not_there_or_holds_one_class_names_its_key(image_folder, tmp_path,
                                                                       make_config):
    """The run's loader says data.test_root, not data.root (a resumed run, or a folder removed
    after `experiments.run` checked it, meets this check, not the early one)."""
    from omegaconf import OmegaConf

    from experiments.orchestration.single import load_run_data

    write_image(tmp_path / "one" / "benign" / "a.jpg")
    for test_root, says in ((tmp_path / "gone", "does not exist: .*gone .set data.test_root."),
                            (tmp_path / "one", "one .data.test_root. must hold one subfolder")):
        settings = OmegaConf.to_object(make_config(
            "data=folder", f"data.root={image_folder}", f"data.test_root={test_root}"))
        with pytest.raises((FileNotFoundError, ValueError), match=says):
            load_run_data(settings)


def test_hidden_files_and_other_extensions_are_ignored(image_folder):
    (image_folder / "benign" / ".DS_Store").write_bytes(b"\0\1")
    (image_folder / "benign" / "._benign_0.jpg").write_bytes(b"\0\1")
    (image_folder / "benign" / "readme.txt").write_text("hi")
    _, files, _ = folders_lib.scan_folder(image_folder)
    assert len(files) == 24


def test_training_dataset_is_float_batches_with_one_hot_labels():
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    ds = pipeline.training_dataset(images, [0, 1] * 5, 2, 4, NoAugmentation(), seed=0)
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


def _generate_then_read(root: str) -> int:
    """A job's view of the demo set: generate it (or find it), then decode every image."""
    from PIL import Image

    found = ensure_demo_dataset(root, images_per_class=30, size=64)
    files = sorted(found.rglob("*.jpg"))
    for file in files:
        with Image.open(file) as image:
            image.load()
    return len(files)


def test_jobs_that_start_together_share_one_demo_set(tmp_path):
    """Four processes ask for the same new demo set at once: one writes it, none sees it
    half-written or replaced while reading (the multi_worker test once did)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        counts = pool.map(_generate_then_read, [str(tmp_path / "demo")] * 4)
    assert counts == [60] * 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo-")]  # no staging


def test_demo_refuses_to_overwrite_a_user_folder(image_folder):
    with pytest.raises(FileExistsError, match="not a demo set"):
        ensure_demo_dataset(image_folder, 10, 48)


def synthetic_pool(per_class: int = 25, patients_per_class: int = 0) -> splits_lib.Split:
    """An in-memory pool: file names carry a patient id when patients_per_class > 0."""
    files, labels = [], []
    for label, name in enumerate(("benign", "malignant")):
        for i in range(per_class):
            patient = f"P{label}{i % patients_per_class:02d}_" if patients_per_class else ""
            files.append(f"/data/{name}/{patient}{name}_{i:03d}.jpg")
            labels.append(label)
    images = np.zeros((len(files), 4, 4, 3), dtype=np.uint8)
    return splits_lib.Split(tuple(files), tuple(labels), images)


def test_cv_folds_are_disjoint_stratified_and_seeded():
    pool = synthetic_pool(25)
    folds = splits_lib.make_folds(("benign", "malignant"), pool, 5, 0.2, seed=1)
    assert len(folds) == 5
    tested = [f for splits in folds for f in splits.test.files]
    assert sorted(tested) == sorted(pool.files)  # every image tested exactly once
    for splits in folds:
        assert splits.test.class_counts(splits.class_names) == {"benign": 5, "malignant": 5}
        assert not set(splits.test.files) & set(splits.train.files + splits.val.files)
        assert len(splits.val) == 10 and len(splits.train) == 30  # val: 0.2 of all images
        counts = splits.val.class_counts(splits.class_names)
        assert counts["benign"] == counts["malignant"]
    again = splits_lib.make_folds(("benign", "malignant"), pool, 5, 0.2, seed=1)
    assert [s.test.files for s in again] == [s.test.files for s in folds]
    other = splits_lib.make_folds(("benign", "malignant"), pool, 5, 0.2, seed=2)
    assert [s.test.files for s in other] != [s.test.files for s in folds]


def test_groups_never_straddle_a_split():
    """Patients (from the file name) stay whole in train/val/test and in every CV fold."""
    pool = synthetic_pool(40, patients_per_class=8).with_groups(r"^(P\d+)_")
    assert pool.groups[0] == "P000" and len(set(pool.groups)) == 16
    names = ("benign", "malignant")
    for splits in [splits_lib.make_splits(names, pool, None, 0.2, 0.2, seed=0),
                   *splits_lib.make_folds(names, pool, 4, 0.2, seed=0)]:
        sides = [set(getattr(splits, name).groups) for name in ("train", "val", "test")]
        assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2]
                                   or sides[1] & sides[2])
        for name in ("train", "val", "test"):  # both classes on every side
            assert min(getattr(splits, name).class_counts(names).values()) > 0
    mixed = splits_lib.Splits(names, pool.subset([0, 1]), pool.subset([8]), pool.subset([16]))
    with pytest.raises(ValueError, match="Group 'P000'"):
        splits_lib.check_disjoint(mixed)


def test_group_pattern_errors_name_the_file_or_the_pattern():
    pool = synthetic_pool(5)
    with pytest.raises(ValueError, match=r"benign_000.jpg: file name does not match "
                                         r"data.group_pattern='\^\(P\\\\d\+\)_'"):
        pool.with_groups(r"^(P\d+)_")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        pool.with_groups("(unclosed")


@pytest.mark.slow  # four small runs
def test_image_caches_train_and_evaluate_the_same(tmp_path, make_config):
    """data.cache=memory, disk and none give the same run; the disk cache is written once
    and reused by the next run."""
    from experiments.run import run
    from tests.conftest import all_runs, client_for, read_csv

    predictions = {}
    for mode in ("memory", "disk", "none", "disk"):
        run(make_config(f"data.cache={mode}", "augmentation=dihedral", "trainer.epochs=1",
                        "mlflow.experiment_name=cache"))
        latest = all_runs(client_for(tmp_path), "cache")[-1]
        rows = read_csv(client_for(tmp_path), latest.info.run_id, "test_predictions.csv",
                        tmp_path / f"dl_{mode}_{len(predictions)}")
        predictions[f"{mode}{len(predictions)}"] = [float(r["p_malignant"]) for r in rows]
        if mode == "disk" and len(predictions) == 2:
            (cached,) = (tmp_path / ".cache" / "images").glob("*.npy")
            written = cached.stat().st_mtime_ns
    np.testing.assert_allclose(predictions["disk1"], predictions["memory0"], atol=1e-5)
    np.testing.assert_allclose(predictions["none2"], predictions["memory0"], atol=1e-5)
    assert cached.stat().st_mtime_ns == written  # the second disk run read it


def test_lazy_images_index_like_an_array(tmp_path):
    from experiments.data.image_store import LazyImages, disk_images

    files = [str(write_image(tmp_path / f"{i}.png", size=12, seed=i)) for i in range(5)]
    stored, problems = disk_images(files, 8, True, tmp_path / "cache")
    assert not problems
    for lazy in (LazyImages(stored, 8), LazyImages(files, 8)):
        full = np.asarray(lazy)
        assert full.shape == (5, 8, 8, 3) and full.dtype == np.uint8
        view = lazy.subset([4, 1, 3])
        np.testing.assert_array_equal(np.asarray(view), full[[4, 1, 3]])
        np.testing.assert_array_equal(view[1:], full[[1, 3]])
        np.testing.assert_array_equal(view[0], full[4])
        assert len(view) == 3 and view.shape == (3, 8, 8, 3)


def test_split_fingerprints_name_the_same_split_wherever_the_folder_lives():
    pool = synthetic_pool(25)
    moved = splits_lib.Split(tuple(f.replace("/data/", "/elsewhere/data/") for f in pool.files),
                             pool.labels, pool.images)
    names = ("benign", "malignant")
    here = splits_lib.make_splits(names, pool, None, 0.2, 0.2, seed=0)
    there = splits_lib.make_splits(names, moved, None, 0.2, 0.2, seed=0)
    other = splits_lib.make_splits(names, pool, None, 0.2, 0.2, seed=1)
    assert splits_lib.splits_sha256(here) == splits_lib.splits_sha256(there)
    assert splits_lib.splits_sha256(here) != splits_lib.splits_sha256(other)
    folds = [(1, n, s) for n, s in enumerate(splits_lib.make_folds(names, pool, 5, 0.2, 1), 1)]
    assert len(splits_lib.folds_sha256(folds)) == 64
    assert splits_lib.folds_sha256(folds) != splits_lib.folds_sha256(folds[::-1])
