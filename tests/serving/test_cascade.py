"""A cascade (`experiments.predict ... fallback=...`): the first model answers what its
referral accepts, the fallback the rest."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc import scoring_server
from mlflow.tracking import MlflowClient
from PIL import Image

from experiments import adapt, cascade, predict
from experiments.errors import UserError
from experiments.serving import inference
from experiments.serving.cascade import Cascade
from experiments.serving.ood import fit_reference
from experiments.tracking import model_registry, records, store
from tests.serving.test_ood import tiny_classifier
from tests.serving.test_serving import strict_json

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


def logged_run(folder: Path, name: str) -> str:
    """A run whose logged model is the one saved in `folder`."""
    info = json.loads((folder / "model_info.json").read_text())
    if (folder / "ood.npz").is_file():
        info["ood"] = {"coverage": 0.9}
    with store.open_run("0", name, {}) as run_id:
        records.set_tags({"model_uri": model_registry.log_model(folder, info)})
    return run_id


def test_a_logged_cascade_predicts_and_serves_as_the_two_models_do(tmp_path, capsys):
    """experiments.cascade logs one MLflow model: predict (by run id) and the pyfunc model
    MLflow serves give the rows the two models give chained."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store.use_store(uri)
    first = saved_model(tmp_path / "first", seed=0, reference=True)
    fallback = saved_model(tmp_path / "fallback", seed=2, reference=True)
    runs = [logged_run(path.parent, name) for path, name in ((first, "a"), (fallback, "b"))]
    run_id = cascade.log_cascade(uri, *runs)
    files = image_folder(tmp_path / "images")
    expected = Cascade(inference.Predictor.load(first),
                       inference.Predictor.load(fallback)).score(files)
    loaded = predict.load_predictor(run_id, uri)
    assert isinstance(loaded, Cascade)
    served = mlflow.pyfunc.load_model(MlflowClient(uri).get_run(run_id).data.tags["model_uri"])
    out = served.predict(pd.DataFrame({"image": [f.read_bytes() for f in files] + ["x"]}))
    assert list(out.columns) == loaded.columns and out["answered_by"].iloc[-1] == ""
    assert out["error"].iloc[-1]  # an unreadable row is reported, not answered
    buffer = io.StringIO()  # as MLflow's server writes the answer: JSON, no bare NaN
    scoring_server.predictions_to_json(out, buffer)
    answered = strict_json(buffer.getvalue())["predictions"]
    assert answered[-1]["p_malignant"] is None and answered[-1]["ood_score"] is None
    assert all(r["fallback_ood_score"] is None for r in answered if r["answered_by"] == "first")
    assert all(isinstance(r["fallback_ood_score"], float) for r in answered
               if r["answered_by"] == "fallback")
    for rows in (loaded.score(files), out.iloc[:-1].to_dict("records")):
        assert [r["answered_by"] for r in rows] == [r["answered_by"] for r in expected]
        assert {"first", "fallback"} == {r["answered_by"] for r in rows}
        np.testing.assert_allclose([r["p_malignant"] for r in rows],
                                   [r["p_malignant"] for r in expected], atol=1e-6)
    # the tools that read a logged model take it as the cascade it is
    client = MlflowClient(uri)
    downloaded = model_registry.load_logged(client, client.get_run(run_id).data.tags[
        "model_uri"], tmp_path / "download")
    assert isinstance(downloaded, Cascade)
    assert downloaded.fallback.info == inference.Predictor.load(fallback).info
    # two models that cannot be chained are refused before anything is logged
    other = saved_model(tmp_path / "other", 1, reference=False, classes=("normal", "tumour"))
    with pytest.raises(UserError, match="same classes"):
        cascade.log_cascade(uri, runs[0], logged_run(other.parent, "c"))
    with pytest.raises(UserError, match="a cascade already"):
        cascade.log_cascade(uri, run_id, runs[1])
    with pytest.raises(SystemExit):
        predict.main([f"model={run_id}", f"fallback={fallback}", f"input={files[0]}",
                      f"output={tmp_path / 'never.csv'}", f"tracking_uri={uri}"])
    assert "a cascade already" in capsys.readouterr().err
    with pytest.raises(UserError, match="is a cascade of two models"):
        adapt.adapt(run_id, str(tmp_path / "images"), uri)
    assert len(MlflowClient(uri).search_runs(["0"])) == 4
    assert not (tmp_path / "never.csv").exists()
