"""The pretrained path on real data: `experiment=transfer_cpu` with the shared ImageNet
DenseNet121 weights, imported as a user would, against a quickstart-size model trained from
scratch on the same folds (skipped where ../shared is absent; slow: about 4 minutes)."""

from __future__ import annotations

import pytest

from experiments import weights as weights_cli
from experiments.models import weights_registry
from experiments.run import run
from tests.conftest import REPO_ROOT, SHARED_TRAIN, all_runs, client_for, compose_config, read_csv

SHARED_WEIGHTS = (REPO_ROOT.parent / "shared" / "data" / "weights"
                  / "densenet121_imagenet_notop.weights.h5")
SAME_FOLDS = [f"data.root={SHARED_TRAIN}", "cv.folds=3", "data.split_seed=0",
              "trainer.verbose=0", "eval.gradcam_images=0", "eval.bootstrap_resamples=200"]
# experiment=quickstart's model and training, on the folder instead of the demo set
SCRATCH = ["backbone=simplecnn", "backbone.weights=null", "backbone.bn_momentum=0.9",
           "augmentation=histology", "optimizer.learning_rate=1e-3", "data.image_size=64",
           "trainer.epochs=10", "trainer.batch_size=16"]


def parent_of(tmp_path, experiment: str):
    (parent,) = [r for r in all_runs(client_for(tmp_path), experiment)
                 if "cv_folds" in r.data.tags]
    return parent


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_TRAIN.is_dir() and SHARED_WEIGHTS.is_file()),
                    reason="../shared/data (biopsy-seed, weights) absent")
def test_transfer_preset_beats_a_scratch_model_on_the_same_folds(tmp_path, monkeypatch):
    monkeypatch.setenv(weights_registry.HOME_ENV, str(tmp_path / "weights"))
    weights_cli.main(["import", str(SHARED_WEIGHTS), "--backbone", "densenet121"])
    run(compose_config(tmp_path, ["experiment=transfer_cpu", *SAME_FOLDS,
                                  "mlflow.experiment_name=transfer"]))
    run(compose_config(tmp_path, [*SCRATCH, *SAME_FOLDS, "cv.folds=3",
                                  "mlflow.experiment_name=scratch"]))
    transfer, scratch = parent_of(tmp_path, "transfer"), parent_of(tmp_path, "scratch")
    client = client_for(tmp_path)
    folds = [{(r["file"], r["fold"]) for r in read_csv(client, parent.info.run_id,
                                                       "test_predictions.csv", tmp_path / name)}
             for name, parent in (("t", transfer), ("s", scratch))]
    assert folds[0] == folds[1] and len(folds[0]) == 200  # the same images in the same folds
    assert transfer.data.tags["weights_sha256"] == weights_registry.sha256_of(SHARED_WEIGHTS)
    assert transfer.data.tags["model_kind"] == "cv_refit"
    accuracy = {name: parent.data.metrics["test_tta_accuracy"]
                for name, parent in (("transfer", transfer), ("scratch", scratch))}
    assert accuracy["transfer"] > accuracy["scratch"], accuracy


SHARED_BREAKHIS = REPO_ROOT.parent / "shared" / "data" / "breakhis-100x"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_TRAIN.is_dir() and SHARED_WEIGHTS.is_file()
                         and SHARED_BREAKHIS.is_dir()),
                    reason="../shared/data (biopsy-seed, breakhis-100x, weights) absent")
def test_the_development_cohort_is_measured_and_mostly_referred(tmp_path):
    """A probe on the seed images scores BreakHis as an external cohort (patients known): its
    referral tells BreakHis from same-source images (ROC-AUC 0.975 at 224 px in the README;
    here 128 px, 120 training images and a quarter of BreakHis, for time: it refers fewer),
    and answers most same-source test images."""
    run(compose_config(tmp_path, [
        "backbone=densenet121", f"backbone.weights={SHARED_WEIGHTS}",
        "finetune=linear_probe", "augmentation=dihedral", "data.image_size=128",
        f"data.root={SHARED_TRAIN}", "eval.tta=none", "eval.gradcam_images=0",
        "eval.bootstrap_resamples=200", "trainer.verbose=0", "mlflow.experiment_name=cohort",
        f"+eval.external.breakhis.root={SHARED_BREAKHIS}",
        "+eval.external.breakhis.include_pattern='-00[1-4]\\.jpg$'",
        "+eval.external.breakhis.group_pattern='SOB_[BM]_([^-]+-\\d+-[^-]+)-'"]))
    (finished,) = all_runs(client_for(tmp_path), "cohort")
    metrics = finished.data.metrics
    assert metrics["ext_breakhis_n_patients"] >= 12 and metrics["ext_breakhis_n_images"] == 50
    assert metrics["ext_breakhis_ood_auroc"] >= 0.85
    assert metrics["test_referred"] <= 0.25  # same-source test images: mostly answered
    assert metrics["ext_breakhis_referred"] > max(0.25, 2 * metrics["test_referred"])
    assert 0 <= metrics["ext_breakhis_patient_accuracy"] <= 1
