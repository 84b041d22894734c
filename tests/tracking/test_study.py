"""`experiment=compare_backbones`: one command, a multirun over backbones on the same repeated
folds, ending with the paired verdict and the self-contained study report on the parent run."""

from __future__ import annotations

import base64
import csv
import dataclasses
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.tracking import gallery, study_report, verdict
from tests.conftest import (
    SMALL,
    artifact_files,
    children_of,
    client_for,
    run_cli,
    the_parent,
)

STUDY = [*(o for o in SMALL if not o.startswith("backbone=")),  # the preset picks them
         "backbone.weights=null", "data.image_size=48", "cv.folds=2", "cv.repeats=1",
         "eval.bootstrap_resamples=200"]
# The preset with two small backbones in its own sweep, as `experiment=compare_backbones`
# sweeps its two (hydra.sweeper.params, not the command line).
SMALL_STUDY = """# @package _global_
defaults:
  - compare_backbones
hydra:
  sweeper:
    params:
      backbone: simplecnn,mobilenetv3large
"""


def study_command(tmp_path: Path, *overrides: str) -> list[str]:
    """The one command of a study, its preset the small one (written under tmp_path)."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "experiment" / "small_study.yaml").write_text(SMALL_STUDY)
    return ["--config-dir", str(tmp_path / "conf"), "experiment=small_study", *STUDY,
            *overrides, f"paths.root={tmp_path}"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The one-command study, run once for this module's tests: the backbones come from the
    preset's sweep, so the report must group by them all the same."""
    tmp_path = tmp_path_factory.mktemp("study")
    result = run_cli(study_command(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


def test_compare_backbones_ends_with_the_verdict_and_a_report_naming_every_backbone(study):
    tmp_path = study
    client = client_for(tmp_path)
    parent, experiment_id = the_parent(client, "compare_backbones")
    children = children_of(client, parent.info.run_id, experiment_id)
    assert sorted(c.data.params["backbone.name"] for c in children) == [
        "mobilenetv3large", "simplecnn"]
    # the same folds for both: one split seed, whatever the model seed
    assert len({c.data.tags["splits_sha256"] for c in children}) == 1
    pair = "mobilenetv3large_vs_simplecnn"
    for name in ("delta_roc_auc", "p_delong", "delta_accuracy", "p_mcnemar",
                 "p_corrected_roc_auc"):
        assert f"{name}__{pair}" in parent.data.metrics, sorted(parent.data.metrics)
    assert {"comparison/report.html", "comparison/roc_bands.png",
            "comparison/calibration.png"} <= artifact_files(client, parent.info.run_id)

    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    page = (sweep_dir / "comparison" / "report.html").read_text()
    for backbone in ("simplecnn", "mobilenetv3large"):
        assert f"backbone.name={backbone}" in page
    assert "backbone.name=mobilenetv3large - backbone.name=simplecnn: AUC" in page
    assert "(corrected t)" in page  # two cross-validations on the same folds
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 4 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n"
                                    for i in images)
    # nothing to run or fetch: self-contained
    assert "<script" not in page and not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    tiles = page.count("class='tile'")
    overlays = sorted((sweep_dir / "comparison" / "gallery").glob("*.png")) \
        if tiles else []
    assert len(overlays) == 2 * tiles  # every tile: both backbones' Grad-CAM
    # the preset logs no fold models (cv.fold_models=false): the refit model draws them
    assert page.count("Grad-CAM of the refit model (trained on every image") == 2 * tiles
    for child in children:
        folds = children_of(client, child.info.run_id, experiment_id)
        assert len(folds) == 3  # two folds and the refit
        assert [f for f in folds if "model_uri" in f.data.tags] == []
        assert child.data.tags["model_uri"].startswith("models:/m-")
    # here, not in a test of its own: under -n 2 a second test of the study would build it
    # again on the other worker (xdist's loadgroup does not group under pytest 9.2)
    check_an_ensemble_of_the_backbones_is_measured_out_of_fold(study, Path(tempfile.mkdtemp(
        dir=study)))


@pytest.fixture(scope="module")
def with_fold_models(tmp_path_factory):
    """One backbone's cross-validation of the study, its fold models logged."""
    tmp_path = tmp_path_factory.mktemp("fold_models")
    result = run_cli(study_command(tmp_path, "backbone=simplecnn", "cv.fold_models=true"),
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


def test_the_gallery_shows_the_grad_cam_of_the_fold_model_that_scored_the_image(
        with_fold_models):
    """An image two configurations decide differently gets, per configuration, the Grad-CAM
    of the fold model that had it in its test fold (loaded from MLflow), beside the pooled
    probability (here one cross-validation twice, the second's decisions flipped)."""
    client = client_for(with_fold_models)
    parent, experiment_id = the_parent(client, "compare_backbones")
    (cv,) = children_of(client, parent.info.run_id, experiment_id)
    runs = [(name, [cv]) for name in ("a", "b")]
    with tempfile.TemporaryDirectory() as folder:
        predictions = verdict.download_predictions(client, [r for _, (r,) in runs],
                                                   Path(folder))
        scored, refused = verdict.score_groups(client, runs, predictions)
        assert not refused and len(scored) == 2
        a, b = scored
        b = dataclasses.replace(b, decision=~a.decision)  # they disagree on every image
        (tile,) = gallery.gallery(client, [a, b], predictions, 1, Path(folder) / "m")
        with predictions[runs[0][1][0].info.run_id].open() as table:
            (row,) = [r for r in csv.DictReader(table) if r["file"] == tile.file]
    assert tile.file == a.files[int(np.argmax(np.abs(a.score - b.score)))]
    for panel, group in zip(tile.panels, (a, b), strict=True):
        assert panel.png is not None and panel.png[:8] == b"\x89PNG\r\n\x1a\n", panel.note
        assert panel.note.startswith("Grad-CAM of its fold model (repeat 1, fold ")
        assert panel.p_positive == pytest.approx(float(group.score[group.files.index(
            tile.file)]))
    fold = int(re.search(r"fold (\d+)\)", tile.panels[0].note).group(1))
    assert int(row["fold"]) == fold  # the model that scored it, not another fold's


def check_an_ensemble_of_the_backbones_is_measured_out_of_fold(study, tmp_path):
    """The study's cross-validations ensembled (`experiments.ensemble`): their refit models
    trained on every image, so the ensemble is measured on the mean of the members' logged
    out-of-fold predictions - by hand here - never by predicting those images again; its
    operating point comes from their pooled out-of-fold predictions (val_predictions.csv)."""
    from sklearn.metrics import roc_auc_score

    from experiments import ensemble

    uri = f"sqlite:///{study}/mlruns/mlflow.db"
    client = client_for(study)
    parent, experiment_id = the_parent(client, "compare_backbones")
    children = children_of(client, parent.info.run_id, experiment_id)
    logged = client.get_run(ensemble.ensemble_sweep(uri, parent.info.run_id))
    tables = []
    for child in children:
        assert "val_predictions.csv" in artifact_files(client, child.info.run_id)
        path = client.download_artifacts(child.info.run_id, "test_predictions.csv",
                                         str(tmp_path / child.info.run_id))
        with open(path) as handle:
            tables.append({r["file"]: r for r in csv.DictReader(handle)})
    assert tables[0].keys() == tables[1].keys()
    files = sorted(tables[0])
    mean = np.mean([[float(t[f]["p_malignant"]) for f in files] for t in tables], axis=0)
    truth = [tables[0][f]["label"] == "malignant" for f in files]
    assert logged.data.metrics["test_roc_auc"] == pytest.approx(roc_auc_score(truth, mean))
    assert logged.data.metrics["test_accuracy"] == pytest.approx(
        np.mean((mean > 0.5) == truth))
    assert "test_metrics" not in logged.data.tags  # measured, not declined


def test_an_ensemble_does_not_mix_cross_validations_with_single_runs():
    from types import SimpleNamespace

    from experiments import ensemble

    def member(tags: dict[str, str]) -> ensemble.Member:
        run = SimpleNamespace(data=SimpleNamespace(tags=tags, params={}))
        return ensemble.Member(run, None, None, None)  # type: ignore[arg-type]

    reason = ensemble.evaluate_on_shared_test(None, [member({"cv_folds": "2"}), member({})],
                                              None)  # type: ignore[arg-type]
    assert reason.startswith("none: the members mix cross-validations")


def test_disagreements_are_the_images_decided_differently_widest_spread_first():
    from experiments.tracking.verdict import Scored

    truth = np.array([True, False, True, False])
    a = Scored("a", ("w", "x", "y", "z"), truth, np.array([0.9, 0.6, 0.4, 0.1]),
               np.array([True, True, False, False]))
    b = Scored("b", ("w", "x", "y", "z"), truth, np.array([0.8, 0.2, 0.45, 0.3]),
               np.array([True, False, True, False]))
    assert gallery.disagreements([a, b], 5) == [1, 2]
    assert gallery.disagreements([a, b], 1) == [1]
    assert gallery.disagreements([a], 5) == []


def test_roc_band_holds_the_curve_and_narrows_with_more_images():
    rng = np.random.default_rng(0)

    def band_width(n: int) -> float:
        truth = rng.integers(0, 2, n).astype(bool)
        score = truth + rng.normal(0, 1, n)
        low, high = study_report.roc_band(truth, score, resamples=300)
        assert np.all(low <= high) and low[-1] == pytest.approx(1.0)
        return float(np.mean(high - low))

    assert band_width(400) < band_width(40)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_the_report_renders_in_a_headless_browser(study, tmp_path):
    """report.html as a person sees it: headless Chromium (no network) draws the page with its
    figures - a screenshot with the tables' text and the plots' colours, not a blank page."""
    (report,) = (study / "outputs" / "multirun").glob("*/*/comparison/report.html")
    screenshot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
                    f"--screenshot={screenshot}", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1280)
    ink = np.any(pixels < 200, axis=-1).mean()  # text, table rules, curves
    coloured = (np.ptp(pixels, axis=-1) > 60).mean()  # the plots' lines and bands
    assert ink > 0.01 and coloured > 0.002, (ink, coloured)
