"""cv.folds=K end to end: a parent run with one child per fold and pooled out-of-fold results."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from experiments.compare import find_runs, write_report
from experiments.run import run

from .test_run import all_runs, artifact_files, client_for, read_csv


def test_cross_validation_pools_out_of_fold_predictions(tmp_path, make_config):
    cfg = make_config("cv.folds=2", "trainer.epochs=1", "eval.gradcam_images=2",
                      "eval.bootstrap_resamples=200", "mlflow.experiment_name=cv")
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

    metrics = parent.data.metrics
    for prefix in ("test_", "test_tta_"):
        for name in ("accuracy", "roc_auc", "sensitivity", "specificity"):
            assert (metrics[f"{prefix}{name}_ci_low"] <= metrics[f"{prefix}{name}"]
                    <= metrics[f"{prefix}{name}_ci_high"])
    assert 0 <= metrics["test_op_sensitivity"] <= 1
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
    assert {"confusion_matrix.png", "roc_curve.png"} <= artifact_files(client,
                                                                        parent.info.run_id)
    # Comparisons count the cross-validation once, not once per fold as well.
    found = find_runs(MlflowClient(client.tracking_uri), "cv")
    assert [r.info.run_id for r in found] == [parent.info.run_id]
    report = write_report(client, found, [], tmp_path / "comparison")
    assert f"{metrics['test_accuracy']:.3f}" in report


def test_cross_validation_refuses_what_it_cannot_do(make_config, image_folder):
    with pytest.raises(ValueError, match="data.test_root"):
        run(make_config("data=folder", f"data.root={image_folder}",
                        f"data.test_root={image_folder}", "cv.folds=2"))
    with pytest.raises(ValueError, match="mlflow.register_as"):
        run(make_config("cv.folds=2", "mlflow.register_as=x"))
