"""A cascade (`experiments.predict ... fallback=...`): the first model answers what its
referral accepts, the fallback the rest."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import predict
from experiments.errors import UserError
from experiments.serving import inference
from experiments.serving.cascade import Cascade
from experiments.serving.ood import fit_reference
from tests.serving.test_ood import tiny_classifier

CLASSES = ("benign", "malignant")


def home_images(n: int, seed: int) -> np.ndarray:
    """The first model's own source: mid-grey noise."""
    return np.random.default_rng(seed).integers(90, 170, (n, 16, 16, 3)).astype(np.uint8)


def saved_model(folder: Path, seed: int, reference: bool,
                classes: tuple[str, ...] = CLASSES) -> Path:
    """A tiny classifier saved as a run's model (model.keras, model_info.json and, with
    `reference`, an ood.npz fitted on its features of home images)."""
    model = tiny_classifier(seed)
    info = {"class_names": list(classes), "image_size": 16, "positive_class": classes[-1],
            "tta": "none", "temperature": 1.0, "threshold": 0.5}
    path = inference.save_model(model, info, folder)
    if reference:
        features = inference.feature_extractor(model).predict(
            home_images(60, seed=1).astype("float32"), verbose=0)
        fit_reference(features, coverage=0.9, seed=0).save(folder / "ood.npz")
    return path


def image_folder(root: Path) -> list[Path]:
    """6 home images and 4 solid colours (nothing like them)."""
    root.mkdir()
    files = []
    for i, image in enumerate(home_images(6, seed=2)):
        files.append(root / f"home_{i}.png")
        Image.fromarray(image).save(files[-1])
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)]):
        files.append(root / f"solid_{i}.png")
        Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(files[-1])
    return files


def test_the_first_model_answers_what_it_accepts_and_the_fallback_the_rest(tmp_path):
    first = saved_model(tmp_path / "first", seed=0, reference=True)
    fallback = saved_model(tmp_path / "fallback", seed=1, reference=False)
    files = image_folder(tmp_path / "images")
    output = tmp_path / "cascade.csv"
    predict.main([f"model={first}", f"fallback={fallback}", f"input={tmp_path / 'images'}",
                  f"output={output}"])
    with output.open() as handle:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(handle)}
    alone = dict(zip([f.name for f in files], inference.Predictor.load(first).score(files),
                     strict=True))
    other = dict(zip([f.name for f in files], inference.Predictor.load(fallback).score(files),
                     strict=True))
    assert list(next(iter(rows.values()))) == [
        "file", "p_benign", "p_malignant", "predicted", "decision", "ood_score", "answered_by",
        "error"]
    by = {name: row["answered_by"] for name, row in rows.items()}
    assert {by[f"solid_{i}.png"] for i in range(4)} == {"fallback"}
    assert sum(by[f"home_{i}.png"] == "first" for i in range(6)) >= 4
    for name, row in rows.items():
        referred = alone[name]["decision"] == inference.REFER
        assert row["answered_by"] == ("fallback" if referred else "first")
        answer = other[name] if referred else alone[name]
        assert float(row["p_malignant"]) == pytest.approx(answer["p_malignant"], abs=1e-6)
        assert row["decision"] == answer["decision"]
        # the first model's score says why an image was handed over
        assert float(row["ood_score"]) == pytest.approx(alone[name]["ood_score"], abs=1e-5)


def test_a_fallback_with_its_own_reference_adds_its_score_and_may_refer(tmp_path):
    first = inference.Predictor.load(saved_model(tmp_path / "first", 0, reference=True))
    fallback = inference.Predictor.load(saved_model(tmp_path / "second", 2, reference=True))
    files = image_folder(tmp_path / "images")
    rows = Cascade(first, fallback).score(files)
    assert Cascade(first, fallback).columns[-3:] == [
        "fallback_ood_score", "answered_by", "error"]
    solid = rows[6:]
    assert all(r["answered_by"] == "fallback" for r in solid)
    assert [r["fallback_ood_score"] for r in solid] == pytest.approx(
        [r["ood_score"] for r in fallback.score(files[6:])], abs=1e-5)
    assert any(r["decision"] == inference.REFER for r in solid)  # nothing like its source
    assert all(np.isnan(r["fallback_ood_score"]) for r in rows if r["answered_by"] == "first")


def test_a_cascade_refuses_models_it_cannot_chain(tmp_path):
    first = saved_model(tmp_path / "first", 0, reference=True)
    plain = saved_model(tmp_path / "plain", 1, reference=False)
    other = saved_model(tmp_path / "other", 1, reference=False, classes=("normal", "tumour"))
    image_folder(tmp_path / "images")
    base = [f"input={tmp_path / 'images'}", f"output={tmp_path / 'out.csv'}"]
    with pytest.raises(UserError, match=r"same classes.*normal"):
        predict.main.__wrapped__([f"model={first}", f"fallback={other}", *base])
    with pytest.raises(UserError, match="needs an out-of-distribution reference"):
        predict.main.__wrapped__([f"model={plain}", f"fallback={first}", *base])
    assert not (tmp_path / "out.csv").exists()
