"""cv.folds=K end to end: a parent run with one child per fold and pooled out-of-fold results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from experiments.evaluation import stats
from experiments.evaluation.tables import read_predictions
from experiments.run import run
from experiments.tracking.comparison import find_runs, write_report
from tests.conftest import all_runs, artifact_files, client_for, read_csv, write_image


def test_cross_validation_pools_out_of_fold_predictions(tmp_path, make_config):
    for i in range(3):  # an external cohort, scored by the parent's model only
        write_image(tmp_path / "lab" / "malignant" / f"m{i}.png", seed=i)
    cfg = make_config("cv.folds=2", "trainer.epochs=1", "eval.gradcam_images=2",
                      "eval.bootstrap_resamples=200", "mlflow.experiment_name=cv",
                      f"+eval.external.lab={tmp_path / 'lab'}")
    best = run(cfg)
    assert 0.0 <= best <= 1.0
    client = client_for(tmp_path)
    runs = all_runs(client, "cv")
    parents = [r for r in runs if "cv_fold" not in r.data.tags]
    (parent,) = parents
    folds = sorted((r for r in runs if "cv_fold" in r.data.tags),
                   key=lambda r: r.data.tags["cv_fold"])
    assert [r.data.tags["cv_fold"] for r in folds] == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for fold in folds:
        assert fold.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert fold.data.tags["n_test"] == "20"  # half of the 40 demo images each
    assert parent.data.tags["cv_folds"] == "2"
    # the folds' fingerprints, recorded to pair runs on the same folds
    assert len({f.data.tags["splits_sha256"] for f in folds}) == 2
    assert len(parent.data.tags["splits_sha256"]) == 64

    metrics = parent.data.metrics
    for prefix in ("test_", "test_tta_"):
        for name in ("accuracy", "roc_auc", "sensitivity", "specificity"):
            assert (metrics[f"{prefix}{name}_ci_low"] <= metrics[f"{prefix}{name}"]
                    <= metrics[f"{prefix}{name}_ci_high"])
    assert 0 <= metrics["test_op_sensitivity"] <= 1
    assert metrics["ext_lab_n_images"] == 3 and "ext_lab_sensitivity_ci_low" in metrics
    assert not any(k.startswith("ext_") for f in folds for k in f.data.metrics)
    fold_accuracy = [f.data.metrics["test_accuracy"] for f in folds]
    assert metrics["cv_test_accuracy_mean"] == pytest.approx(sum(fold_accuracy) / 2)
    # Equal fold sizes: the pooled accuracy is the folds' mean.
    assert metrics["test_accuracy"] == pytest.approx(sum(fold_accuracy) / 2)

    oof = read_csv(client, parent.info.run_id, "test_predictions.csv", tmp_path / "dl")
    assert len(oof) == 40 and len({row["file"] for row in oof}) == 40
    for fold in folds:
        fold_tests = {r["file"] for r in read_csv(client, fold.info.run_id, "splits.csv",
                                                  tmp_path / fold.info.run_id)
                      if r["split"] == "test"}
        assert fold_tests == {r["file"] for r in oof if r["fold"] == fold.data.tags["cv_fold"]}
        trained = {r["file"] for r in read_csv(client, fold.info.run_id, "splits.csv",
                                               tmp_path / fold.info.run_id)
                   if r["split"] != "test"}
        assert not trained & fold_tests
    # the shipped temperature's calibration, nested: from the parent's own tables
    raw = read_predictions(Path(client.download_artifacts(
        parent.info.run_id, "val_predictions.csv", str(tmp_path / "raw"))), ("benign",
                                                                           "malignant"))
    fold_of = {r["file"]: int(r["fold"]) for r in oof}
    scaled = stats.nested_temperature(raw.labels, raw.probabilities,
                                      np.array([fold_of[f] for f in raw.files]))[0]
    assert metrics["test_shipped_ece"] == pytest.approx(
        stats.reliability_bins(raw.labels, scaled, cfg.eval.calibration_bins).ece, abs=1e-6)
    assert {"confusion_matrix.png", "roc_curve.png"} <= artifact_files(client,
                                                                       parent.info.run_id)
    # Comparisons count the cross-validation once, not once per fold as well.
    found = find_runs(MlflowClient(client.tracking_uri), "cv")
    assert [r.info.run_id for r in found] == [parent.info.run_id]
    report, verdict_metrics = write_report(client, found, [], tmp_path / "comparison")
    assert verdict_metrics == {}  # one group: nothing to pair
    assert f"{metrics['test_accuracy']:.3f}" in report


def test_cross_validation_refuses_what_it_cannot_do(make_config, image_folder):
    with pytest.raises(ValueError, match="data.test_root"):
        run(make_config("data=folder", f"data.root={image_folder}",
                        f"data.test_root={image_folder}", "cv.folds=2"))
    with pytest.raises(ValueError, match="cv.folds > 1"):
        run(make_config("cv.repeats=2"))


def fold_runs(runs: list) -> list:
    return sorted((r for r in runs if "cv_fold" in r.data.tags),
                  key=lambda r: (r.data.tags["cv_repeat"], r.data.tags["cv_fold"]))


@pytest.mark.slow  # ~30 s: 2 x 2 folds, predict and pyfunc
def test_repeated_cv_logs_an_ensemble_that_predict_and_mlflow_use(tmp_path, make_config):
    """cv.repeats=2: fold assignments differ between repeats and are disjoint within one; the
    parent's model is the mean of the four fold models' probabilities, fitted on pooled
    out-of-fold predictions, and `experiments.predict` takes the parent's run id."""
    import numpy as np

    from experiments import predict
    from experiments.serving.inference import MODEL_FILE, load_model

    run(make_config("cv.folds=2", "cv.repeats=2", "trainer.epochs=1", "eval.tta=none",
                    "mlflow.experiment_name=repeats"))
    client = client_for(tmp_path)
    runs = all_runs(client, "repeats")
    (parent,) = [r for r in runs if "cv_fold" not in r.data.tags]
    folds = fold_runs(runs)
    assert [(f.data.tags["cv_repeat"], f.data.tags["cv_fold"]) for f in folds] == [
        ("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    tests = {}
    for fold in folds:
        rows = read_csv(client, fold.info.run_id, "splits.csv", tmp_path / fold.info.run_id)
        tests[fold.data.tags["cv_repeat"], fold.data.tags["cv_fold"]] = {
            r["file"] for r in rows if r["split"] == "test"}
        assert fold.data.params["trainer.seed"] == str(42 + int(fold.data.tags["cv_repeat"]) - 1)
    for repeat in ("1", "2"):
        assert not tests[repeat, "1"] & tests[repeat, "2"]
        assert len(tests[repeat, "1"] | tests[repeat, "2"]) == 40
    assert tests["1", "1"] != tests["2", "1"]
    metrics = parent.data.metrics
    assert "cv_repeat_test_accuracy_std" in metrics and parent.data.tags["cv_repeats"] == "2"
    assert parent.data.tags["model_kind"] == "cv_ensemble"
    oof = read_csv(client, parent.info.run_id, "test_predictions.csv", tmp_path / "oof")
    assert len(oof) == 80 and {r["repeat"] for r in oof} == {"1", "2"}

    # The ensemble is the mean of its members.
    output = tmp_path / "out"
    ensemble = load_model(output / "model" / MODEL_FILE)
    members = [load_model(output / f"repeat_{r}" / f"fold_{k}" / "model" / MODEL_FILE)
               for r in (1, 2) for k in (1, 2)]
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    expected = np.mean([m.predict(images, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(ensemble.predict(images, verbose=0), expected, atol=1e-6)

    predictor = predict.load_predictor(parent.info.run_id,
                                       f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    info = predictor.info
    assert info.threshold == pytest.approx(metrics["model_threshold"])
    assert info.temperature == pytest.approx(metrics["model_temperature"])
    np.testing.assert_allclose(predictor.model.predict(images, verbose=0), expected, atol=1e-6)


def test_refit_trains_on_every_image_without_a_validation_split(tmp_path, make_config):
    run(make_config("cv.folds=2", "cv.refit=true", "trainer.epochs=2", "eval.tta=none",
                    "mlflow.experiment_name=refit"))
    client = client_for(tmp_path)
    runs = all_runs(client, "refit")
    (parent,) = [r for r in runs if "cv_fold" not in r.data.tags
                 and "cv_refit" not in r.data.tags]
    (refit,) = [r for r in runs if "cv_refit" in r.data.tags]
    folds = fold_runs(runs)
    assert refit.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert refit.data.tags["n_train"] == "40" and refit.data.tags["n_val"] == "0"
    rows = read_csv(client, refit.info.run_id, "splits.csv", tmp_path / "refit")
    assert len(rows) == 40 and {r["split"] for r in rows} == {"train"}
    median_best = sorted(int(f.data.metrics["best_epoch"]) for f in folds)
    epochs = int(refit.data.params["refit_epochs"])
    assert min(median_best) <= epochs <= max(median_best)
    assert [m.step for m in client.get_metric_history(refit.info.run_id, "loss")] == list(
        range(1, epochs + 1))
    assert client.get_metric_history(refit.info.run_id, "val_loss") == []
    assert parent.data.tags["model_kind"] == "cv_refit"
    assert "refit model" in parent.data.tags["estimate"]


def test_linear_probe_refit_is_the_regression_on_every_image(tmp_path, make_config):
    """finetune=linear_probe with cv.refit: the refit is a regression on every image's cached
    features (C by cross-validation on them), not an epoch loop; it reuses the folds'
    features, and the parent's model predicts what that regression does."""
    run(make_config("finetune=linear_probe", "augmentation=dihedral", "cv.folds=2",
                    "cv.refit=true", "mlflow.experiment_name=probe_refit"))
    client = client_for(tmp_path)
    runs = all_runs(client, "probe_refit")
    (refit,) = [r for r in runs if "cv_refit" in r.data.tags]
    (parent,) = [r for r in runs if "cv_folds" in r.data.tags]
    assert refit.data.metrics["probe_C"] > 0
    assert client.get_metric_history(refit.info.run_id, "loss") == []  # no training loop
    assert parent.data.tags["model_kind"] == "cv_refit"
    folds = fold_runs(runs)
    assert sum(f.data.metrics["features_computed"] for f in folds) == 40  # each image once
