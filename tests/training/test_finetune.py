"""Fine-tuning strategies, learning-rate schedules and label smoothing."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from experiments.data import pipeline
from experiments.models.classifier import build_classifier
from experiments.training.finetune import backbone_of, learning_rate, unfreeze
from experiments.training.loop import TrainPlan, train
from tests.conftest import prepare


class Snapshots(keras.callbacks.Callback):
    """The backbone's conv kernels and BatchNorm moving means after every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[np.ndarray] = []
        self.moving_means: list[np.ndarray] = []

    def take(self) -> None:
        backbone = backbone_of(self.model)
        self.kernels.append(backbone.get_layer("block1_conv1").kernel.numpy().copy())
        self.moving_means.append(backbone.get_layer("block1_bn1").moving_mean.numpy().copy())

    def on_train_begin(self, logs=None) -> None:
        if not self.kernels:
            self.take()

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.take()


def test_two_stage_trains_the_head_first_then_the_backbone_with_batchnorm_frozen(
        make_config, tmp_path):
    cfg = make_config("finetune=two_stage", "finetune.head_epochs=1", "trainer.epochs=2",
                      "eval.gradcam_images=0")
    prepared = prepare(cfg)
    splits = prepared.splits
    train_ds = pipeline.training_dataset(splits.train.images, splits.train.labels, 2, 8,
                                         prepared.augment, 0)
    val_ds = pipeline.evaluation_dataset(splits.val.images, splits.val.labels, 2, 8)
    snapshots = Snapshots()
    plan = TrainPlan(2, prepared.callbacks, tmp_path / "b", [snapshots], verbose=0,
                     second_stage=prepared.second_stage)
    result = train(prepared.model, train_ds, val_ds, plan)
    before, after_head, after_both = snapshots.kernels
    np.testing.assert_array_equal(before, after_head)  # stage 1: backbone frozen
    assert not np.allclose(after_head, after_both)  # stage 2: it trains
    for means in snapshots.moving_means[1:]:  # BatchNorm in inference mode throughout
        np.testing.assert_array_equal(means, snapshots.moving_means[0])
    assert len(result.history["loss"]) == 2
    # Stage 2 runs at learning_rate x lr_factor.
    assert float(prepared.model.optimizer.learning_rate) == pytest.approx(1e-4)


def test_unfreeze_top_layers_leaves_batchnorm_and_lower_layers_frozen():
    model = build_classifier("simplecnn", None, False, 32, 2)
    assert unfreeze(model, 2) == 2  # block4_conv1, block4_conv2 (BatchNorm stays frozen)
    trainable = {w.path.split("/")[0] for w in backbone_of(model).trainable_weights}
    assert trainable == {"block4_conv1", "block4_conv2"}
    assert unfreeze(model, None) == 8  # every conv, no BatchNorm


def test_warmup_cosine_schedule():
    schedule = learning_rate(1e-3, "warmup_cosine", epochs=10, steps_per_epoch=5,
                             warmup_epochs=2)
    values = [float(schedule(step)) for step in range(50)]
    assert values[0] == pytest.approx(1e-5)
    assert max(values) == pytest.approx(1e-3, rel=1e-3) and int(np.argmax(values)) == 10
    assert values[-1] < 1e-5  # decayed to ~0 by the last step
    assert learning_rate(1e-3, "constant", 10, 5, 2) == 1e-3


def test_schedule_refuses_reduce_lr_and_label_smoothing_reaches_the_loss(make_config):
    cfg = make_config("trainer.lr_schedule=warmup_cosine")
    with pytest.raises(ValueError, match="~callbacks.reduce_lr"):
        prepare(cfg)
    cfg = make_config("trainer.lr_schedule=warmup_cosine", "~callbacks.reduce_lr",
                      "trainer.label_smoothing=0.1", "finetune=frozen")
    prepared = prepare(cfg)
    assert prepared.model.loss.label_smoothing == pytest.approx(0.1)
    trainable = {w.path.split("/")[0] for w in prepared.model.trainable_weights}
    assert trainable == {"head_bn", "predictions"}


def test_the_refit_probe_chooses_c_on_folds_of_whole_patients():
    from experiments.training.probe import view_folds

    groups = [f"p{i // 4}" for i in range(40)]  # 10 patients of 4 images
    strata = np.array([int(g[1:]) % 2 for g in groups])
    def patients(rows: np.ndarray) -> set[str]:
        return {groups[r // 8] for r in rows}

    for rest, held_out in view_folds(strata, 8, 5, seed=0, groups=groups):
        assert not patients(rest) & patients(held_out)
        assert len(held_out) % 8 == 0
