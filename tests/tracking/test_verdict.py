"""The paired verdict over runs in a real MLflow store (SQLite, artifacts on disk): runs on the
same images are paired and agree with the statistics computed directly; runs on different
images are refused with the reason."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from experiments import compare
from experiments.evaluation import paired
from experiments.tracking import verdict
from experiments.tracking.comparison import find_runs, write_report
from experiments.tracking.records import BACKWARDS_TAG


def log_run(client: MlflowClient, experiment_id: str, tmp_path, name: str, files, labels,
            p_malignant, key: str) -> None:
    """A finished run with a test_predictions.csv as the framework writes it."""
    run = client.create_run(experiment_id, run_name=name,
                            tags={"positive_class": "malignant"})
    path = tmp_path / name / "test_predictions.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "predicted", "p_benign", "p_malignant"])
        for file, label, p in zip(files, labels, p_malignant, strict=True):
            writer.writerow([file, "malignant" if label else "benign",
                             "malignant" if p >= 0.5 else "benign", f"{1 - p:.6f}", f"{p:.6f}"])
    client.log_artifact(run.info.run_id, str(path))
    client.log_param(run.info.run_id, "backbone.name", key)
    for metric in ("test_accuracy", "test_roc_auc", "test_f1", "test_recall",
                   "test_specificity", "best_epoch", "epoch_seconds", "n_parameters"):
        client.log_metric(run.info.run_id, metric, 0.5)
    client.set_terminated(run.info.run_id)


@pytest.fixture
def store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("verdict",
                                             artifact_location=str(tmp_path / "artifacts"))
    rng = np.random.default_rng(3)
    files = [f"img_{i:03d}.png" for i in range(120)]
    labels = rng.integers(0, 2, 120)
    strong = 1 / (1 + np.exp(-(3 * labels - 1.5 + rng.normal(0, 1, 120))))
    weak = 1 / (1 + np.exp(-(1 * labels - 0.5 + rng.normal(0, 1, 120))))
    log_run(client, experiment_id, tmp_path, "dense", files, labels, strong, "densenet201")
    log_run(client, experiment_id, tmp_path, "res", files, labels, weak, "resnet50")
    other = [f"other_{i:03d}.png" for i in range(120)]
    log_run(client, experiment_id, tmp_path, "elsewhere", other, labels, weak, "simplecnn")
    return client, files, labels, strong, weak


def test_runs_on_the_same_images_are_paired_and_others_refused(store, tmp_path):
    client, _, labels, strong, weak = store
    experiment_id = client.get_experiment_by_name("verdict").experiment_id
    (res,) = client.search_runs([experiment_id], "attributes.run_name = 'res'")
    client.set_tag(res.info.run_id, BACKWARDS_TAG, "... these images: ext_lab_roc_auc")
    runs = client.search_runs([experiment_id])
    text, metrics = write_report(client, runs, ["backbone.name"], tmp_path / "report")
    # a run that ranks a cohort backwards is named wherever the comparison is read
    warning = "backbone.name=resnet50, run res: ... these images: ext_lab_roc_auc"
    assert f"Warning: {warning}" in text
    assert warning in (tmp_path / "report" / "comparison.md").read_text()
    assert f"<h2>Warnings</h2><ul><li>{warning}</li></ul>" in (
        tmp_path / "report" / "report.html").read_text()

    expected = paired.delong(labels, strong, weak)
    assert metrics["delta_roc_auc__densenet201_vs_resnet50"] == pytest.approx(
        expected.difference, abs=1e-5)  # the CSV keeps 6 decimals
    assert metrics["p_delong__densenet201_vs_resnet50"] == pytest.approx(expected.p_value,
                                                                         rel=1e-3)
    decided_strong, decided_weak = strong >= 0.5, weak >= 0.5
    mc = paired.mcnemar(decided_strong == labels, decided_weak == labels)
    assert metrics["p_mcnemar__densenet201_vs_resnet50"] == pytest.approx(mc.p_value)
    low = metrics["delta_roc_auc_low__densenet201_vs_resnet50"]
    high = metrics["delta_roc_auc_high__densenet201_vs_resnet50"]
    assert low < expected.difference < high
    assert len([k for k in metrics if k.startswith("p_delong__")]) == 1  # simplecnn unpaired

    report = (tmp_path / "report" / "verdict.md").read_text()
    assert "backbone.name=densenet201 - backbone.name=resnet50: AUC +" in report
    assert "(DeLong)" in report and "(McNemar)" in report and "on 120 images" in report
    assert "not paired: backbone.name=densenet201 and backbone.name=simplecnn were tested " \
           "on different images" in report
    assert "Paired verdict" in text
    page = (tmp_path / "report" / "report.html").read_text()
    for key in ("densenet201", "resnet50", "simplecnn"):  # every configuration, by name
        assert f"backbone.name={key}" in page
    assert "backbone.name=densenet201 - backbone.name=resnet50: AUC +" in page
    # the two paired backbones disagree on some images: each is a tile, and these test runs
    # have neither the images nor models on disk, which the tiles say instead of a Grad-CAM
    assert page.count("class='tile'") == 8 and "no image at" in page
    with (tmp_path / "report" / "verdict.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == 1 and float(rows[0]["p_delong_holm"]) >= float(rows[0]["p_delong"])


def test_a_group_whose_runs_saw_different_images_is_refused(store, tmp_path):
    client, *_ = store
    runs = client.search_runs([client.get_experiment_by_name("verdict").experiment_id])
    predictions = verdict.download_predictions(client, runs, tmp_path / "dl")
    rows, refused = verdict.verdicts(client, [("all runs", runs)], predictions)
    assert rows == []
    assert refused == ["the runs of all runs were tested on different images (their splits "
                       "differ: fix data.split_seed so every run sees the same folds)"]


def test_sentence_reads_effect_then_p_value():
    row = {"a": "x", "b": "y", "n_images": 200, "delta_roc_auc": 0.012,
           "delta_roc_auc_low": -0.02, "delta_roc_auc_high": 0.04, "p_delong": 0.41,
           "delta_accuracy": 0.01, "delta_accuracy_low": -0.03, "delta_accuracy_high": 0.05,
           "p_mcnemar": 0.62, "p_delong_holm": 0.41, "p_mcnemar_holm": 0.62}
    assert verdict.sentence(row) == (
        "x - y: AUC +0.012 [-0.020, +0.040], p = 0.41 (DeLong); accuracy +0.010 "
        "[-0.030, +0.050], p = 0.62 (McNemar): not distinguishable on 200 images "
        "(Holm-corrected, 0.05)")


def log_cv(client: MlflowClient, experiment_id: str, tmp_path, name: str, files, labels,
           p_malignant, fold_aucs: dict[tuple[int, int], float]) -> None:
    """A cross-validation parent (out-of-fold test_predictions.csv with repeat and fold) and
    its fold runs, tagged as the framework tags them."""
    parent = client.create_run(experiment_id, run_name=name, tags={
        "positive_class": "malignant", "cv_folds": "2", "cv_repeats": "2"})
    path = tmp_path / name / "test_predictions.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "repeat", "fold", "label", "predicted", "p_benign",
                         "p_malignant"])
        for repeat in (1, 2):
            for i, (file, label, p) in enumerate(zip(files, labels, p_malignant, strict=True)):
                fold = 1 + (i + repeat) % 2
                writer.writerow([file, repeat, fold, "malignant" if label else "benign",
                                 "malignant" if p >= 0.5 else "benign", f"{1 - p:.6f}",
                                 f"{p:.6f}"])
    client.log_artifact(parent.info.run_id, str(path))
    client.log_param(parent.info.run_id, "backbone.name", name)
    client.log_metric(parent.info.run_id, "test_accuracy", 0.5)
    client.set_terminated(parent.info.run_id)
    for (repeat, fold), auc in fold_aucs.items():
        child = client.create_run(experiment_id, tags={
            "cv_parent": parent.info.run_id, "cv_fold": str(fold), "cv_repeat": str(repeat),
            "n_train": "45", "n_val": "15", "n_test": "60"})
        client.log_metric(child.info.run_id, "test_roc_auc", auc)
        client.set_terminated(child.info.run_id)


def test_two_cross_validations_on_the_same_folds_get_the_corrected_t_test(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("cv", artifact_location=str(tmp_path / "a"))
    rng = np.random.default_rng(5)
    files = [f"img_{i:03d}.png" for i in range(120)]
    labels = rng.integers(0, 2, 120)
    scores = [1 / (1 + np.exp(-(s * labels - s / 2 + rng.normal(0, 1, 120)))) for s in (2, 1)]
    keys = [(1, 1), (1, 2), (2, 1), (2, 2)]
    aucs = {"dense": [0.90, 0.86, 0.88, 0.91], "res": [0.85, 0.86, 0.84, 0.87]}
    for name, score in zip(aucs, scores, strict=True):
        log_cv(client, experiment_id, tmp_path, name, files, labels, score,
               dict(zip(keys, aucs[name], strict=True)))
    parents = client.search_runs([experiment_id], "tags.cv_folds = '2'")
    rows, refused = verdict.verdicts(
        client, [(r.data.params["backbone.name"], [r]) for r in parents],
        verdict.download_predictions(client, parents, tmp_path / "dl"))
    assert refused == []
    (row,) = rows
    differences = np.array(aucs["dense"]) - np.array(aucs["res"])
    t, p = paired.corrected_t(differences, 45 + 15, 60)
    assert row["n_fold_results"] == 4
    assert (row["t_corrected_roc_auc"], row["p_corrected_roc_auc"]) == pytest.approx((t, p))
    assert "over 4 folds, p = " in verdict.sentence(row) and "(corrected t)" in \
        verdict.sentence(row)
    assert "p_corrected_roc_auc__dense_vs_res" in verdict.pair_metrics(rows)


def test_a_sweeps_jobs_are_found_in_whichever_experiment_their_preset_chose(store, tmp_path):
    """`-m experiment=transfer_cpu,histology_cpu`: the parent lives in the base config's
    experiment, each job in its preset's own; the sweep's comparison still finds them all."""
    client, files, labels, strong, weak = store
    home = client.create_experiment("biopsy", artifact_location=str(tmp_path / "a2"))
    parent = client.create_run(home, tags={"sweep_parent": "true"})
    elsewhere = client.create_experiment("preset_b", artifact_location=str(tmp_path / "a3"))
    log_run(client, home, tmp_path, "job_a", files, labels, strong, "densenet201")
    log_run(client, elsewhere, tmp_path, "job_b", files, labels, weak, "resnet50")
    jobs = client.search_runs([home, elsewhere], "attributes.run_name LIKE 'job_%'")
    for job in jobs:
        client.set_tag(job.info.run_id, "mlflow.parentRunId", parent.info.run_id)
    found = find_runs(client, "biopsy", parent.info.run_id)
    assert sorted(r.info.run_name for r in found) == ["job_a", "job_b"]
    assert find_runs(client, "preset_b") and len(find_runs(client, "preset_b")) == 1


def test_compare_of_a_sweep_groups_by_what_the_sweep_swept(store, tmp_path):
    """`experiments.compare --parent <sweep>` without --group-by gives the sweep's own report:
    grouped by the swept keys (here the presets, `choice.experiment`), not by backbone."""
    client, files, labels, strong, weak = store
    home = client.get_experiment_by_name("verdict").experiment_id
    parent = client.create_run(home, tags={
        "sweep_parent": "true",
        "sweep_overrides": "experiment=transfer_cpu,histology_cpu cv.repeats=2"})
    for name, preset, p in (("job_t", "transfer_cpu", strong), ("job_h", "histology_cpu", weak)):
        log_run(client, home, tmp_path, name, files, labels, p, "same_backbone")
        (job,) = client.search_runs([home], f"attributes.run_name = '{name}'")
        client.log_param(job.info.run_id, "choice.experiment", preset)
        client.set_tag(job.info.run_id, "mlflow.parentRunId", parent.info.run_id)
    compare.main(["--experiment", "verdict", "--parent", parent.info.run_id, "--gallery", "0",
                  "--output", str(tmp_path / "out"), "--tracking-uri", client.tracking_uri])
    assert ("choice.experiment=histology_cpu - choice.experiment=transfer_cpu: AUC"
            in (tmp_path / "out" / "verdict.md").read_text())
