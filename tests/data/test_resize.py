"""Non-square images keep their shape: `data.resize=crop` (the default) scales the shorter side
and keeps the centre square, in training, caches, predict and serving; models saved before it
keep squashing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from experiments import predict
from experiments.data import folders, image_store
from experiments.data.decode import load_image
from experiments.run import run
from experiments.serving.inference import ModelInfo
from tests.conftest import all_runs, client_for


def striped(path, width: int = 90, height: int = 30):
    """Left third red, middle blue, right third green: the centre square is all blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    pixels[:, :third, 0] = 255
    pixels[:, third:2 * third, 2] = 255
    pixels[:, 2 * third:, 1] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_crop_keeps_the_centre_square_and_squash_keeps_everything(tmp_path):
    path = striped(tmp_path / "wide.png")
    cropped = load_image(path, 16, resize="crop")
    assert cropped.shape == (16, 16, 3)
    assert (cropped[..., 2] > 200).all() and (cropped[..., :2] < 50).all()  # all blue
    squashed = load_image(path, 16, resize="squash")
    assert squashed[:, 0, 0].min() > 200 and squashed[:, -1, 1].min() > 200  # red .. green
    with pytest.raises(ValueError, match="data.resize"):
        load_image(path, 16, resize="pad")


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_every_image_cache_crops(tmp_path, cache):
    files = [str(striped(tmp_path / f"w{i}.png")) for i in range(2)]
    images, invalid = folders.load_images(files, 16, cache=cache,
                                          cache_folder=tmp_path / "cache", resize="crop")
    assert not invalid
    assert (np.asarray(images)[..., 2] > 200).all()
    squash_key = image_store.cache_key(files, 16, True)
    assert image_store.cache_key(files, 16, True, "crop") != squash_key


def test_a_model_predicts_the_crop_it_trained_on_and_old_models_squash(tmp_path, make_config):
    run(make_config("trainer.epochs=1", "eval.tta=none", "mlflow.experiment_name=crop"))
    (finished,) = all_runs(client_for(tmp_path), "crop")
    predictor = predict.load_predictor(finished.info.run_id,
                                       f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert predictor.info.resize == "crop"
    wide = striped(tmp_path / "wide.png", 96, 32)
    square = tmp_path / "centre.png"
    Image.open(wide).crop((32, 0, 64, 32)).save(square)  # the centre square itself
    (p_wide,), (p_square,) = predictor.score([wide]), predictor.score([square])
    assert p_wide["p_malignant"] == pytest.approx(p_square["p_malignant"], abs=1e-5)

    info = tmp_path / "model_info.json"
    info.write_text(json.dumps({"class_names": ["a", "b"], "image_size": 32}))
    assert ModelInfo.read(info).resize == "squash"


def test_a_half_resolution_copy_at_twice_the_mpp_predicts_like_the_original(tmp_path,
                                                                             make_config):
    run(make_config("trainer.epochs=2", "eval.tta=none", "data.mpp=0.5",
                    "mlflow.experiment_name=mpp"))
    (finished,) = all_runs(client_for(tmp_path), "mpp")
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    predictor = predict.load_predictor(finished.info.run_id, uri)
    assert predictor.info.input_mpp == pytest.approx(0.5 * 48 / 32)  # demo tiles 48 -> 32 px
    originals = sorted((tmp_path / ".cache" / "demo").rglob("*.jpg"))[::7]
    assert len(originals) >= 5
    copies = []
    for path in originals:
        half = tmp_path / "half" / f"{path.stem}.png"
        half.parent.mkdir(exist_ok=True)
        Image.open(path).resize((24, 24), Image.Resampling.LANCZOS).save(half)
        copies.append(half)
    as_trained = [r["p_malignant"] for r in predictor.score(originals)]
    stated = [r["p_malignant"] for r in predictor.score(originals, mpp=0.5)]
    halves = [r["p_malignant"] for r in predictor.score(copies, mpp=1.0)]
    np.testing.assert_allclose(stated, as_trained, atol=1e-5)  # its own scale: unchanged
    np.testing.assert_allclose(halves, as_trained, atol=0.15)
    # served: an `mpp` column per row (a number: the signature refuses text); a negative one
    # is that row's error
    import mlflow.pyfunc
    import pandas as pd

    served = mlflow.pyfunc.load_model(finished.data.tags["model_uri"])
    out = served.predict(pd.DataFrame({"image": [copies[0].read_bytes()] * 2,
                                       "mpp": [1.0, -2.0]}))
    assert out["p_malignant"][0] == pytest.approx(halves[0], abs=1e-4)
    assert "mpp must be positive" in out["error"][1]


def test_mpp_for_a_model_that_does_not_know_its_scale_is_refused(tmp_path, make_config):
    run(make_config("trainer.epochs=1", "eval.tta=none", "mlflow.experiment_name=nompp"))
    (finished,) = all_runs(client_for(tmp_path), "nompp")
    predictor = predict.load_predictor(finished.info.run_id,
                                       f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (row,) = predictor.score([striped(tmp_path / "w.png")], mpp=0.25)
    assert "data.mpp" in row["error"]
