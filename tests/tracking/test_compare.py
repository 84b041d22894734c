"""Sweeps as one MLflow picture, the comparison report, predict, and a real tracking server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from experiments import ensemble, predict
from experiments.run import run
from experiments.tracking.sweep import group_by_keys, grouped_keys, sweep_overrides, swept_keys
from tests.conftest import (
    SHARED_TRAIN,
    SMALL,
    all_runs,
    artifact_files,
    children_of,
    client_for,
    mlflow_server,
    run_cli,
    the_parent,
    write_image,
)

REPORT = {"comparison/report.html", "comparison/comparison.md", "comparison/comparison.csv",
          "comparison/verdict.md", "comparison/verdict.csv", "comparison/roc_curves.png",
          "comparison/roc_bands.png", "comparison/calibration.png",
          "comparison/val_accuracy_curves.png", "comparison/lr_schedules.png"}
UNLABELED = SHARED_TRAIN.parent / "unlabeled"


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend; always stopped."""
    with mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


@pytest.mark.slow  # ~45-60 s beside another test: a server, a 2-job sweep, its ensemble
def test_sweep_against_a_tracking_server(tmp_path, tracking_server):
    """A 2-job multirun (default launcher, one process) logged over HTTP: one parent with the
    report, one child run per job tagged with the sweep, one model registered; then the
    registered model loads for prediction, and the two seeds (one split) become an ensemble."""
    result = run_cli(["-m", *SMALL, "trainer.epochs=1", f"paths.root={tmp_path}",
                      f"mlflow.tracking_uri={tracking_server}", "mlflow.experiment_name=server",
                      "mlflow.register_as=biopsy-best", "trainer.seed=1,2",
                      "data.split_seed=0"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_server)
    parent, experiment_id = the_parent(client, "server")
    assert parent.info.status == "FINISHED"
    assert "trainer.seed=1,2" in parent.data.tags["sweep_overrides"]
    assert REPORT | {"multirun.yaml"} <= artifact_files(client, parent.info.run_id)
    children = children_of(client, parent.info.run_id, experiment_id)
    assert sorted(c.data.params["trainer.seed"] for c in children) == ["1", "2"]
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")  # <date>/<time>
    assert parent.data.tags["sweep"] == str(sweep_dir)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["sweep"] == str(sweep_dir)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [1]
        assert {"roc_curve.png", "test_predictions.csv",
                "val_predictions.csv"} <= artifact_files(client, child.info.run_id)
        assert child.data.tags["model_uri"].startswith("models:/m-")
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "best.keras").is_file()
    assert parent.data.tags["registered_model"] == "models:/biopsy-best/1"
    assert not (tmp_path / "mlruns").exists()  # nothing written to the local store

    loaded = predict.load_predictor("models:/biopsy-best/1", tracking_server)
    assert loaded.info.class_names == ("benign", "malignant") and loaded.info.image_size == 32
    experiment = client.get_experiment(experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    ensemble_id = ensemble.ensemble_sweep(tracking_server, parent.info.run_id)
    logged = client.get_run(ensemble_id)
    assert logged.data.tags["ensemble_of"] == parent.info.run_id
    assert set(logged.data.tags["members"].split(",")) == {c.info.run_id for c in children}
    metrics = logged.data.metrics  # one shared test split: the ensemble is evaluated on it
    assert metrics["test_accuracy_ci_low"] <= metrics["test_accuracy"] <= 1
    assert 0 <= metrics["model_threshold"] <= 1 and metrics["model_temperature"] > 0
    combined = predict.load_predictor(ensemble_id, tracking_server)
    members = [predict.load_predictor(c.info.run_id, tracking_server) for c in children]
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        combined.model.predict(images, verbose=0),
        np.mean([m.model.predict(images, verbose=0) for m in members], axis=0), atol=1e-6)


@pytest.mark.slow  # the default run keeps the in-process sweeps of tests/e2e and test_study
def test_sweep_with_a_launcher_in_other_processes_and_compare(tmp_path):
    """joblib runs the jobs in worker processes: the parent id travels in the environment."""
    result = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMALL,
                      "trainer.epochs=1", f"paths.root={tmp_path}",
                      "mlflow.experiment_name=joblib", "augmentation=none,study"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_for(tmp_path)
    parent, experiment_id = the_parent(client, "joblib")
    children = children_of(client, parent.info.run_id, experiment_id)
    assert sorted(c.data.params["choice.augmentation"] for c in children) == ["none", "study"]
    assert len({c.data.tags["sweep"] for c in children}) == 1
    assert REPORT <= artifact_files(client, parent.info.run_id)
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    table = (sweep_dir / "comparison" / "comparison.md").read_text()
    assert "choice.augmentation=none" in table and "choice.augmentation=study" in table
    # one seed, so one split: the two augmentations are paired image by image
    for name in ("delta_roc_auc__none_vs_study", "p_delong__none_vs_study",
                 "delta_accuracy__none_vs_study", "p_mcnemar__none_vs_study"):
        assert name in parent.data.metrics, sorted(parent.data.metrics)
    assert "choice.augmentation=none - choice.augmentation=study: AUC" in (
        sweep_dir / "comparison" / "verdict.md").read_text()

    out = tmp_path / "report"
    cli = subprocess.run([sys.executable, "-m", "experiments.compare", "--experiment", "joblib",
                          "--parent", parent.info.run_id, "--group-by", "trainer.seed",
                          "--output", str(out)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "| trainer.seed=42 | 2 |" in cli.stdout  # both jobs, pooled: n = 2
    assert {p.name for p in out.iterdir()} - {"gallery"} == {Path(f).name for f in REPORT}
    rows = (out / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("group,n_runs,test_accuracy_mean,test_accuracy_std")
    assert len(rows) == 2


def test_group_by_keys_follow_the_sweep():
    swept = swept_keys(["backbone=a,b", "trainer.seed=1,2", "trainer.epochs=3",
                        "augmentation=none,study"])
    assert swept == ["backbone", "trainer.seed", "augmentation"]
    params = {"backbone.name": "a", "choice.augmentation": "none", "trainer.seed": "1"}
    assert group_by_keys(swept, params) == ["backbone.name", "choice.augmentation"]


def test_a_presets_own_sweep_counts_as_swept():
    """`experiment=compare_backbones` sweeps backbones in hydra.sweeper.params: its report
    grouped them as one ("all runs", no verdict) while only the command line counted. The
    command line still wins over the preset for the same key, as in Hydra's sweepers."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from experiments.config.schema import CONFIG_MODULE, register_configs

    register_configs()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=compare_backbones", "data.root=/x"],
                      return_hydra_config=True)
    found = sweep_overrides(cfg)
    assert found[-1] == "backbone=densenet201,resnet50"
    assert swept_keys(found) == ["backbone"]
    with open_dict(cfg):  # as `... backbone=simplecnn,resnet50 trainer.seed=1,2` leaves it
        cfg.hydra.overrides.task.extend(["backbone=simplecnn,resnet50", "trainer.seed=1,2"])
    found = sweep_overrides(cfg)
    assert [o for o in found if o.startswith("backbone=")] == ["backbone=simplecnn,resnet50"]
    assert swept_keys(found) == ["backbone", "trainer.seed"]
    assert grouped_keys(cfg) == ["backbone", "trainer.seed"]  # group_by_keys pools seeds


def test_a_search_pools_its_trials_a_grid_groups_its_values():
    """An Optuna search's trials each try other values: its report is one row (trials.csv
    lists them), not a verdict between every two trials on the test images."""
    from hydra import compose, initialize_config_module

    from experiments.config.schema import CONFIG_MODULE, register_configs

    register_configs()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        search = compose("config", overrides=["hparams_search=transfer", "data.root=/x"],
                         return_hydra_config=True)
    assert "optimizer.learning_rate" in swept_keys(sweep_overrides(search))
    assert grouped_keys(search) == []


def test_predict_writes_a_row_per_image_and_reports_bad_files(tmp_path, make_config):
    run(make_config("trainer.epochs=1", "mlflow.experiment_name=predict"))
    (finished,) = all_runs(client_for(tmp_path), "predict")
    inputs = tmp_path / "to_predict"
    for i in range(5):
        write_image(inputs / "sub" / f"img{i}.png", size=40, seed=i)
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    output = tmp_path / "pred.csv"
    cli = subprocess.run([sys.executable, "-m", "experiments.predict",
                          f"model={finished.info.run_id}", f"input={inputs}",
                          f"output={output}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    lines = output.read_text().splitlines()
    assert lines[0] == "file,p_benign,p_malignant,predicted,decision,ood_score,error"
    assert len(lines) == 7
    broken = next(line for line in lines if "broken.jpg" in line)
    assert "not a readable image" in broken
    good = [line.split(",") for line in lines[1:] if "broken" not in line]
    info = json.loads((tmp_path / "out" / "model" / "model_info.json").read_text())
    assert info["tta"] == "dihedral" and info["temperature"] > 0
    for row in good:
        assert abs(float(row[1]) + float(row[2]) - 1) < 1e-4 and row[3] in ("benign",
                                                                            "malignant")
        # The decision is taken at the threshold chosen on validation, unless the image is
        # unlike the training images (random noise, here): then it is referred.
        if float(row[5]) > info["ood"]["threshold"]:
            assert row[4] == "refer"
        else:
            assert row[4] == ("malignant" if float(row[2]) >= info["threshold"] else "benign")
    # The run's model file, with model_info.json beside it, gives the same numbers.
    loaded = predict.load_predictor(str(tmp_path / "out" / "model" / "model.keras"), None)
    again = tmp_path / "again.csv"
    predict.predict_files(loaded, predict.list_inputs(inputs), again)
    assert again.read_text() == output.read_text()
    if UNLABELED.is_dir():  # the study's 100 unlabeled biopsies: one row each, no errors
        unlabeled = tmp_path / "unlabeled.csv"
        predict.main([f"model={finished.info.run_id}", f"input={UNLABELED}",
                      f"output={unlabeled}", f"tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db"])
        lines = unlabeled.read_text().splitlines()
        assert len(lines) == 101 and all(line.endswith(",") for line in lines[1:])


def test_an_ensemble_of_rescaled_sources_needs_to_know_by_how_much():
    """A member trained with data.sources.<name>.mpp saw that source's test images rescaled;
    when its splits.csv does not say by how much (a run logged before the column), decoding
    the files as they are would score other pixels, so the ensemble says why not."""
    def member(mpp: str, scales: dict[str, float] | None) -> ensemble.Member:
        run = SimpleNamespace(data=SimpleNamespace(params={"data.sources.lab.mpp": mpp},
                                                   tags={}))
        test = SimpleNamespace(files=("/no/such/a.png",))
        return ensemble.Member(run, None, None, test, scales)  # type: ignore[arg-type]

    model = SimpleNamespace(info=None)  # not decoded: each case ends before

    reason = ensemble.evaluate_on_shared_test(model, [member("0.25", None)] * 2,
                                              None)  # type: ignore[arg-type]
    assert reason.startswith("none:") and "data.sources.lab.mpp" in reason
    apart = ensemble.evaluate_on_shared_test(
        model, [member("0.25", {"/no/such/a.png": 0.5}), member("0.25", {})],
        None)  # type: ignore[arg-type]
    assert apart == "none: the members rescaled their test images differently"
    unscaled = ensemble.evaluate_on_shared_test(model, [member("None", {})],
                                                None)  # type: ignore[arg-type]
    assert unscaled == "none: the members' test images are not readable here"
