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
