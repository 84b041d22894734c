"""Bad input fails before training with one clear message, or is skipped and recorded."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest
from PIL import Image

from experiments.data import decode, folders
from experiments.run import run
from tests.conftest import all_runs, artifact_files, client_for, read_csv, write_image


def corrupt_folder(root):
    """A valid two-class folder plus every kind of bad file a hand-made folder collects."""
    for label, offset in (("benign", 0), ("malignant", 100)):
        for i in range(10):
            write_image(root / label / f"{label}_{i}.jpg", seed=offset + i)
    good = (root / "benign" / "benign_0.jpg").read_bytes()
    bad = {
        root / "benign" / "truncated.jpg": good[: len(good) // 3],
        root / "benign" / "random.jpg": np.random.default_rng(0).bytes(2000),
        root / "malignant" / "text.jpg": b"this is a text file, not a JPEG\n",
        root / "malignant" / "empty.png": b"",
    }
    for path, content in bad.items():
        path.write_bytes(content)
    write_image(root / "malignant" / "tiny.png", size=8)  # smaller than the 32 px input
    os.symlink(root / "nowhere.jpg", root / "benign" / "dangling.jpg")  # unreadable path
    (root / "benign" / ".DS_Store").write_bytes(b"\0")
    (root / "benign" / "._benign_1.jpg").write_bytes(b"\0")
    return sorted([*map(str, bad), str(root / "malignant" / "tiny.png"),
                   str(root / "benign" / "dangling.jpg")])


def test_every_bad_file_is_listed_before_training(tmp_path, make_config):
    bad = corrupt_folder(tmp_path / "images")
    cfg = make_config("data=folder", f"data.root={tmp_path / 'images'}",
                      "mlflow.experiment_name=bad")
    with pytest.raises(ValueError) as info:
        run(cfg)
    message = str(info.value)
    assert "6 invalid image file(s)" in message and "data.on_invalid=skip" in message
    for file in bad:
        assert file in message
    assert "smaller than data.image_size=32" in message
    assert ".DS_Store" not in message and "._benign_1" not in message
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db") \
        .get_experiment_by_name("bad") is None  # nothing started


def test_skip_leaves_bad_files_out_and_records_them(tmp_path, make_config):
    bad = corrupt_folder(tmp_path / "images")
    cfg = make_config("data=folder", f"data.root={tmp_path / 'images'}", "data.on_invalid=skip",
                      "trainer.epochs=1", "mlflow.experiment_name=skip")
    run(cfg)
    client = client_for(tmp_path)
    (finished,) = all_runs(client, "skip")
    assert finished.data.params["n_skipped"] == "6"
    assert "skipped_files.csv" in artifact_files(client, finished.info.run_id)
    rows = read_csv(client, finished.info.run_id, "skipped_files.csv", tmp_path / "dl")
    assert sorted(r["file"] for r in rows) == bad
    assert all(r["reason"] for r in rows)
    splits = read_csv(client, finished.info.run_id, "splits.csv", tmp_path / "dl")
    assert len(splits) == 20 and not {r["file"] for r in splits} & set(bad)


def test_upscaling_can_be_allowed(tmp_path):
    path = write_image(tmp_path / "small.png", size=20)
    with pytest.raises(ValueError, match="smaller than data.image_size=32"):
        decode.load_image(str(path), 32, allow_upscale=False)
    assert decode.load_image(str(path), 32, allow_upscale=True).shape == (32, 32, 3)


def test_class_with_no_valid_images(tmp_path):
    write_image(tmp_path / "d" / "benign" / "a.jpg")
    (tmp_path / "d" / "malignant").mkdir()
    (tmp_path / "d" / "malignant" / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="No valid images left in class folder.*malignant"):
        folders.read_folder(tmp_path / "d", 32, on_invalid="skip")
    (tmp_path / "d" / "malignant" / "x.jpg").unlink()
    with pytest.raises(ValueError, match="malignant holds no images"):
        folders.read_folder(tmp_path / "d", 32)


def test_test_root_with_other_classes_is_refused(image_folder, tmp_path, make_config):
    write_image(tmp_path / "t" / "benign" / "a.jpg")
    write_image(tmp_path / "t" / "normal" / "a.jpg")
    cfg = make_config("data=folder", f"data.root={image_folder}",
                      f"data.test_root={tmp_path / 't'}", "data.test_fraction=0")
    with pytest.raises(ValueError, match=r"classes \['benign', 'normal'\] differ"):
        run(cfg)


def test_missing_data_root_names_it(tmp_path, make_config):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        run(make_config("data=folder", f"data.root={tmp_path / 'no-such-folder'}"))


def test_very_large_image_loads_downscaled(tmp_path):
    """10000x10000 px: under Pillow's bomb limit it decodes (JPEG at reduced scale)."""
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (10000, 10000), (200, 120, 180)).save(path, quality=50)
    image = decode.load_image(str(path), 64)
    assert image.shape == (64, 64, 3)
    np.testing.assert_allclose(image.mean(axis=(0, 1)), (200, 120, 180), atol=3)


def test_decompression_bomb_limit_stays_on_with_a_clear_message(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", size=300)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300x300 is over twice the limit
    with pytest.raises(ValueError, match="decompression-bomb limit"):
        decode.load_image(str(path), 32)


def small_folder(root, per_class: int):
    for label, offset in (("benign", 0), ("malignant", 100)):
        for i in range(per_class):
            write_image(root / label / f"{label}_{i}.jpg", seed=offset + i)
    return root


@pytest.mark.parametrize(("overrides", "message"), [
    ([], r"eval.ood_coverage=0.95 .* needs 10 or more; this run trains on 4\. .*"
         r"eval.ood_coverage=null"),
    (["finetune=linear_probe", "eval.ood_coverage=null", "cv.folds=2",
      "data.val_fraction=0.25"], r"finetune=linear_probe .* 2 or more images of each class"),
])
def test_a_training_split_too_small_fails_before_any_run_opens(tmp_path, make_config,
                                                                overrides, message):
    """The referral's reference and the probe's choice of C are cross-validated on the
    training split: too few images is one clear message before training, and no MLflow run
    (a cross-validation's fold would otherwise fail after its parent opened)."""
    folder = small_folder(tmp_path / "images", per_class=4)
    with pytest.raises(ValueError, match=message):
        run(make_config("data=folder", f"data.root={folder}", "mlflow.experiment_name=small",
                        *overrides))
    assert client_for(tmp_path).get_experiment_by_name("small") is None or not all_runs(
        client_for(tmp_path), "small")
