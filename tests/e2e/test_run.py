"""End to end: the real CLI, a real SQLite MLflow store, real images through the real pipeline."""

from __future__ import annotations

import mlflow
import pytest
from omegaconf import OmegaConf

from experiments.config.instantiate import flatten
from experiments.run import run
from tests.conftest import (
    SHARED_TRAIN,
    SMALL,
    all_runs,
    artifact_files,
    client_for,
    compose_config,
    read_csv,
    run_cli,
)

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")
TEST_METRICS = ("test_accuracy", "test_precision", "test_recall", "test_specificity", "test_f1",
                "test_roc_auc", "test_loss")
FIGURES = ("loss_curve.png", "accuracy_curve.png", "confusion_matrix.png", "roc_curve.png")


def test_end_to_end_run_logs_the_whole_contract(tmp_path):
    full_eval = ["eval.gradcam_images=8", "eval.bootstrap_resamples=2000"]
    result = run_cli([*SMALL, *full_eval, f"paths.root={tmp_path}",
                      "mlflow.experiment_name=e2e"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_for(tmp_path)
    (run_info,) = all_runs(client, "e2e")
    run_id = run_info.info.run_id
    assert run_info.info.status == "FINISHED"
    assert f"MLflow run {run_id}" in result.stdout
    assert "test_accuracy" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout

    # Outputs and store stay under paths.root, with absolute artifact paths.
    (out_dir,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert (out_dir / "checkpoints" / "best.keras").is_file()
    assert run_info.info.artifact_uri.startswith(str(tmp_path / "mlruns" / "artifacts")) or \
        run_info.info.artifact_uri.startswith(f"file://{tmp_path}/mlruns/artifacts")

    # params: the whole composed config, flattened.
    composed = compose_config(tmp_path, [*SMALL, *full_eval, "mlflow.experiment_name=e2e"])
    expected = flatten(OmegaConf.to_container(composed, resolve=True))
    params = run_info.data.params
    missing = {k for k in expected if not k.startswith("paths.") and k not in params}
    assert not missing
    assert params["backbone.name"] == "simplecnn"
    assert float(params["optimizer.learning_rate"]) == pytest.approx(1e-3)

    # Per-epoch metrics, one value per epoch, steps 1..2.
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
    lrs = [m.value for m in client.get_metric_history(run_id, "lr")]
    assert lrs == pytest.approx([1e-3, 1e-3])
    metrics = run_info.data.metrics
    for name in TEST_METRICS:
        assert 0.0 <= metrics[name] <= (1.0 if name != "test_loss" else 100.0), name
    assert metrics["best_epoch"] in (1, 2)
    # Reported like a paper: TTA, bootstrap intervals, operating point, calibration.
    for prefix in ("test_", "test_tta_", "test_op_"):
        for name in ("accuracy", "roc_auc", "sensitivity", "specificity"):
            point, low, high = (metrics[f"{prefix}{name}{end}"] for end in ("", "_ci_low",
                                                                            "_ci_high"))
            assert 0.0 <= low <= point <= high <= 1.0, (prefix, name)
    assert metrics["test_sensitivity"] == pytest.approx(metrics["test_recall"])
    assert 0.0 <= metrics["val_threshold"] <= 1.0
    assert metrics["temperature"] > 0 and 0.0 <= metrics["test_ece_calibrated"] <= 1.0

    tags = run_info.data.tags
    assert tags["backbone"] == "simplecnn"
    assert (tags["n_train"], tags["n_val"], tags["n_test"]) == ("24", "8", "8")
    assert len(tags["splits_sha256"]) == 64  # which image went where, for pairing runs
    assert tags["class_counts_test"] == "benign=4,malignant=4"
    assert len(tags["git_commit"].removesuffix("-dirty")) == 40

    artifacts = artifact_files(client, run_id)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "test_predictions.csv",
            "val_predictions.csv", "splits.csv", "reliability_diagram.png", *FIGURES} <= artifacts
    assert tags["model_uri"].startswith("models:/m-")  # the MLflow model (tests/test_serving)
    assert (out_dir / "model" / "model.keras").is_file()
    for phase in ("load_data", "train", "evaluate", "log_model"):  # where the time went
        assert metrics[f"seconds_{phase}"] >= 0
    gradcams = {a for a in artifacts if a.startswith("gradcam/") and a.endswith(".png")}
    assert len(gradcams) == 8  # eval.gradcam_images: every test image here

    predictions = read_csv(client, run_id, "test_predictions.csv", tmp_path / "dl")
    assert len(predictions) == 8
    assert {"file", "label", "p_malignant", "p_benign", "predicted", "final_p_malignant",
            "decision_at_threshold"} <= set(predictions[0])
    splits = read_csv(client, run_id, "splits.csv", tmp_path / "dl")
    used_for_training = {r["file"] for r in splits if r["split"] in ("train", "val")}
    assert len(used_for_training) == 32
    assert not used_for_training & {r["file"] for r in predictions}


def test_failing_job_ends_failed_and_leaves_no_active_run(tmp_path, make_config):
    """A callback that fails once training starts (CSVLogger into a missing folder)."""
    broken = make_config("mlflow.experiment_name=fail", "trainer.epochs=1",
                         "+callbacks.csv._target_=keras.callbacks.CSVLogger",
                         f"+callbacks.csv.filename={tmp_path / 'missing' / 'dir' / 'log.csv'}")
    with pytest.raises(FileNotFoundError):
        run(broken)
    assert mlflow.active_run() is None
    run(make_config("mlflow.experiment_name=fail", "trainer.epochs=1"))
    assert mlflow.active_run() is None
    failed, finished = all_runs(client_for(tmp_path), "fail")
    assert failed.info.status == "FAILED"
    assert "FileNotFoundError" in failed.data.tags["error"]
    assert finished.info.status == "FINISHED"


def test_a_failing_job_in_a_sweep_is_reported_when_it_fails(tmp_path):
    """Hydra goes on to the next job without a word and reports the failure only at the end:
    the job says so itself, before the next one starts; the sweep still exits with an error
    and the other job finishes."""
    missing = tmp_path / "missing" / "dir" / "log.csv"  # CSVLogger fails as training starts
    result = run_cli(["-m", *SMALL, "trainer.epochs=1", f"paths.root={tmp_path}",
                      "mlflow.experiment_name=sweep_fail",
                      "+callbacks.csv._target_=keras.callbacks.CSVLogger",
                      f"+callbacks.csv.filename={missing},{tmp_path / 'log.csv'}"], tmp_path)
    assert result.returncode != 0
    said = result.stdout.index("This job failed: FileNotFoundError")
    assert said < result.stdout.index("#1 : ")  # before Hydra launches the next job
    jobs = [r for r in all_runs(client_for(tmp_path), "sweep_fail")
            if "mlflow.parentRunId" in r.data.tags]  # not the sweep's parent run
    failed, finished = sorted(jobs, key=lambda r: r.info.status)
    assert (failed.info.status, finished.info.status) == ("FAILED", "FINISHED")


@pytest.mark.slow  # ~30 s: three small runs
def test_the_same_seed_gives_the_same_metrics_and_another_seed_does_not(make_config, tmp_path):
    """A run is reproducible on one machine: initial weights, splits, batch order and random
    augmentation all follow trainer.seed (timings aside, every logged value is equal)."""
    def logged(seed: int, name: str) -> dict[str, float]:
        run(make_config("mlflow.experiment_name=seeds", f"mlflow.run_name={name}",
                        "augmentation=histology", f"trainer.seed={seed}"))
        (found,) = [r for r in all_runs(client_for(tmp_path), "seeds")
                    if r.info.run_name == name]
        return {k: v for k, v in found.data.metrics.items() if "seconds" not in k}

    first, again, other = logged(7, "first"), logged(7, "again"), logged(8, "other")
    assert first == again
    assert other != first and other.keys() == first.keys()


@pytest.mark.slow  # ~30 s: the whole quickstart
def test_quickstart_learns_the_demo(tmp_path):
    """The README's first command: well above chance on the synthetic demo."""
    result = run_cli(["experiment=quickstart", f"paths.root={tmp_path}", "trainer.verbose=2"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (finished,) = all_runs(client_for(tmp_path), "quickstart")
    assert finished.data.metrics["test_accuracy"] >= 0.85
    assert finished.data.metrics["test_roc_auc"] >= 0.9


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="../shared/data/biopsy-seed absent")
def test_real_biopsy_images_train_one_epoch(tmp_path):
    """The study's 200 JPEGs through the real pipeline (the small CNN keeps it fast)."""
    cfg = compose_config(tmp_path, [
        "backbone=simplecnn", "backbone.weights=null", f"data.root={SHARED_TRAIN}",
        "data.image_size=64", "trainer.epochs=1", "trainer.batch_size=16", "trainer.verbose=0",
        "mlflow.experiment_name=real"])
    run(cfg)
    (finished,) = all_runs(client_for(tmp_path), "real")
    tags = finished.data.tags
    assert (tags["n_train"], tags["n_val"], tags["n_test"]) == ("120", "40", "40")
    assert finished.data.metrics["test_accuracy"] >= 0.0
    assert len(finished.data.metrics) >= len(TEST_METRICS)
