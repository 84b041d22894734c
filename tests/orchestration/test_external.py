"""eval.external end to end: the final model scores each cohort as `experiments.predict` does,
the run logs per-cohort (and per-patient) metrics with intervals, and the cohorts take no part
in training, selection or calibration."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import predict
from experiments.data.demo import ensure_demo_dataset
from experiments.errors import DataError
from experiments.run import run
from experiments.tracking.comparison import table_metrics
from experiments.tracking.records import BACKWARDS_TAG
from tests.conftest import all_runs, artifact_files, client_for, read_csv, write_image
from tests.data.test_layouts import breakhis_tree

PATIENT = "SOB_[BM]_[A-Z]+-(\\d+-\\d+)-"


def benign_only(root: Path) -> Path:
    for i in range(5):
        write_image(root / "benign" / f"b_{i}.png", seed=500 + i)
    return root


def test_cohorts_are_scored_by_the_final_model_and_change_nothing_else(tmp_path, make_config):
    breakhis_tree(tmp_path / "bh", patients_per_tumour=1, images=2)
    benign_only(tmp_path / "benign_lab")
    common = ["trainer.epochs=1", "eval.tta=none", "mlflow.experiment_name=ext"]
    run(make_config(*common, f"+eval.external.bh.root={tmp_path / 'bh'}",
                    f"+eval.external.bh.group_pattern='{PATIENT}'",
                    "+eval.external.bh.include_pattern=/200X/",
                    f"+eval.external.benign_lab={tmp_path / 'benign_lab'}"))
    client = client_for(tmp_path)
    (scored,) = all_runs(client, "ext")
    metrics, run_id = scored.data.metrics, scored.info.run_id

    for name in ("accuracy", "roc_auc", "sensitivity", "specificity", "patient_accuracy"):
        key = f"ext_bh_{name}"
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
    assert metrics["ext_bh_n_images"] == 8 and metrics["ext_bh_n_patients"] == 4
    assert 0 <= metrics["ext_bh_ece"] <= 1 and 0 <= metrics["ext_bh_patient_recognition_rate"]
    assert 0 < metrics["ext_bh_ece_calibrated_95"] < 1
    # one class: specificity, no AUC or sensitivity (undefined, not NaN)
    assert metrics["ext_benign_lab_n_images"] == 5 and "ext_benign_lab_specificity" in metrics
    assert not {"ext_benign_lab_roc_auc", "ext_benign_lab_sensitivity"} & set(metrics)
    files = artifact_files(client, run_id, "external")
    assert files == {"external/bh/predictions.csv", "external/bh/roc_curve.png",
                     "external/bh/reliability_diagram.png", "external/bh/patients.csv",
                     "external/bh/patients.png", "external/benign_lab/predictions.csv",
                     "external/benign_lab/reliability_diagram.png"}
    patients = read_csv(client, run_id, "external/bh/patients.csv", tmp_path / "dl_p")
    assert len(patients) == 4 and sum(int(r["n_images"]) for r in patients) == 8
    assert np.mean([int(r["correct"]) for r in patients]) == pytest.approx(
        metrics["ext_bh_patient_accuracy"])
    assert np.mean([float(r["images_correct"]) for r in patients]) == pytest.approx(
        metrics["ext_bh_patient_recognition_rate"])
    assert {"ext_bh_accuracy", "ext_bh_roc_auc", "ext_benign_lab_accuracy"} <= set(
        table_metrics([scored]))

    # The numbers are experiments.predict's on the same files.
    rows = read_csv(client, run_id, "external/bh/predictions.csv", tmp_path / "dl")
    assert len(rows) == 8 and len({r["group"] for r in rows}) == 4
    assert all(f"-{r['group']}-200-" in r["file"] for r in rows)
    predictor = predict.load_predictor(run_id, f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    out = tmp_path / "predicted.csv"
    predict.predict_files(predictor, [Path(r["file"]) for r in rows], out)
    with out.open() as handle:
        expected = list(csv.DictReader(handle))
    np.testing.assert_allclose([float(r["p_malignant"]) for r in rows],
                               [float(r["p_malignant"]) for r in expected], atol=1e-5)
    assert [r["decision"] for r in rows] == [r["decision"] for r in expected]



def test_a_cohort_ranked_backwards_is_tagged_on_its_run(tmp_path, make_config, caplog):
    """Fresh demo images with their class folders swapped: the model ranks them backwards,
    and the run carries the warning as a tag (the MLflow UI shows it), not only in the printed
    summary."""
    demo = ensure_demo_dataset(tmp_path / "demo", images_per_class=20, size=48, seed=7)
    swapped = tmp_path / "swapped"
    for label, other in (("benign", "malignant"), ("malignant", "benign")):
        shutil.copytree(demo / label, swapped / other)
    run(make_config("finetune=linear_probe", "eval.tta=none", "mlflow.experiment_name=inv",
                    f"+eval.external.swapped={swapped}"))
    (scored,) = all_runs(client_for(tmp_path), "inv")
    assert scored.data.metrics["ext_swapped_roc_auc_ci_high"] < 0.5
    assert "ext_swapped_roc_auc" in scored.data.tags[BACKWARDS_TAG]
    assert "ranks these images backwards" in caplog.text


def test_a_cohort_changes_nothing_in_training_selection_or_calibration(tmp_path, make_config):
    """Two linear probes (deterministic, unlike SGD on CPU threads) of the same images, one
    with a one-class cohort: the same C, threshold, temperature and test predictions."""
    benign_only(tmp_path / "benign_lab")
    common = ["finetune=linear_probe", "eval.tta=none", "mlflow.experiment_name=same"]
    run(make_config(*common, f"+eval.external.benign_lab={tmp_path / 'benign_lab'}"))
    run(make_config(*common, f"paths.output_dir={tmp_path / 'plain'}"))
    client = client_for(tmp_path)
    with_cohort, plain = all_runs(client, "same")
    assert "ext_benign_lab_accuracy" in with_cohort.data.metrics
    assert not [k for k in plain.data.metrics if k.startswith("ext_")]
    for key in ("probe_C", "val_threshold", "temperature", "test_accuracy", "test_roc_auc"):
        assert plain.data.metrics[key] == pytest.approx(with_cohort.data.metrics[key]), key
    predicted = [read_csv(client, r.info.run_id, "test_predictions.csv", tmp_path / r.info.run_id)
                 for r in (with_cohort, plain)]
    assert predicted[0] == predicted[1]


def test_a_cohort_with_a_foreign_class_fails_before_training(tmp_path, make_config):
    write_image(tmp_path / "lab" / "normal" / "n.png")
    write_image(tmp_path / "lab" / "benign" / "b.png")
    with pytest.raises(DataError, match=r"eval.external.lab.root.*\['normal'\]"):
        run(make_config("mlflow.experiment_name=ext", f"+eval.external.lab={tmp_path / 'lab'}"))
    assert not (tmp_path / "mlruns").exists() or not all_runs_or_none(tmp_path)


def test_a_cohort_file_without_a_patient_names_the_file_and_key(tmp_path, make_config):
    write_image(tmp_path / "lab" / "benign" / "no_patient_here.png")
    with pytest.raises(DataError, match="no_patient_here.png.*eval.external.lab.group_pattern"):
        run(make_config(f"+eval.external.lab.root={tmp_path / 'lab'}",
                        f"+eval.external.lab.group_pattern='{PATIENT}'"))


def all_runs_or_none(root: Path) -> list:
    client = client_for(root)
    experiment = client.get_experiment_by_name("ext")
    return [] if experiment is None else all_runs(client, "ext")


def test_the_summary_shows_patients_and_warns_of_chance_and_a_flattened_model(capsys, caplog):
    """BreakHis alone, 16 patients in patient-grouped folds (measured: 0.58 per image, a
    temperature at its bound of 20): the patients' line, and why not to trust the model; a
    model that ranks well gets neither warning."""
    import logging

    from experiments.tracking.summary import print_patients, warn_chance

    poor = {"test_roc_auc": 0.547, "test_roc_auc_ci_low": 0.196, "test_roc_auc_ci_high": 0.856,
            "test_n_patients": 16.0, "test_patient_accuracy": 0.625,
            "test_patient_accuracy_ci_low": 0.312, "test_patient_accuracy_ci_high": 0.875,
            "test_patient_roc_auc": 0.55, "test_patient_roc_auc_ci_low": 0.197,
            "test_patient_roc_auc_ci_high": 0.883, "model_temperature": 20.0}
    print_patients(poor)
    assert capsys.readouterr().out == ("  per patient (16): accuracy 0.625 [0.312, 0.875], "
                                       "roc_auc 0.550 [0.197, 0.883]\n")
    with caplog.at_level(logging.WARNING, logger="experiments"):
        warn_chance(poor)
        assert [r.getMessage().split(" ")[1] for r in caplog.records] == [
            "test_roc_auc", "test_patient_roc_auc", "model_temperature"]
        caplog.clear()
        warn_chance({"test_roc_auc": 0.97, "test_roc_auc_ci_low": 0.93,
                     "test_roc_auc_ci_high": 0.99, "temperature": 0.8})
        assert caplog.records == []


def test_the_summary_reads_a_cohort_ece_against_what_a_calibrated_model_gives(capsys):
    from experiments.tracking.summary import print_cohorts

    print_cohorts({"ext_bh_n_images": 192.0, "ext_bh_accuracy": 0.646,
                   "ext_bh_accuracy_ci_low": 0.473, "ext_bh_accuracy_ci_high": 0.81,
                   "ext_bh_ece": 0.187, "ext_bh_ece_calibrated_95": 0.074})
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == ("  bh (192 images): accuracy 0.646 [0.473, 0.810], "
                    "ece 0.187 (a calibrated model: < 0.074)")
