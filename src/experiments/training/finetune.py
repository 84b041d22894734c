"""Fine-tuning strategies and learning-rate schedules.

full: everything trains from the first epoch (the study). frozen: the backbone never trains
(its BatchNorm layers run in inference mode), only the head - on cached features when the
augmentation allows (`experiments.features`). linear_probe: no training loop, a logistic
regression and a k-NN on the frozen features (`experiments.probe`). two_stage: the head trains
with the backbone frozen for `head_epochs`, then the top `unfreeze_layers` weight layers of the
backbone (all when null) join at the learning rate times `lr_factor`; BatchNorm layers stay
frozen and in inference mode (the backbone is called with training=False), as Keras'
transfer-learning guide advises for small data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras

from experiments.config.choices import FINETUNE_STRATEGIES, LR_SCHEDULES
from experiments.errors import ConfigError

STRATEGIES = FINETUNE_STRATEGIES
SCHEDULES = LR_SCHEDULES


def backbone_of(model: keras.Model) -> keras.Model:
    """The one nested model (the backbone) of a classifier built by `build_classifier`."""
    found = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(found) != 1:
        raise ValueError(f"Expected one backbone inside {model.name!r}; found "
                         f"{[layer.name for layer in found]}")
    return found[0]


def unfreeze(model: keras.Model, top_layers: int | None) -> int:
    """Make the backbone's top `top_layers` layers that hold weights, BatchNorm layers not
    counted, trainable (all when None); BatchNorm stays frozen. Returns how many train."""
    backbone = backbone_of(model)
    backbone.trainable = True
    weighted = []
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        elif layer.weights:
            weighted.append(layer)
    first = 0 if top_layers is None else max(0, len(weighted) - top_layers)
    for index, layer in enumerate(weighted):
        layer.trainable = index >= first
    return len(weighted) - first


def learning_rate(base: float, schedule: str, epochs: int, steps_per_epoch: int,
                  warmup_epochs: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The optimizer's learning rate: constant, or linear warm-up to `base` over
    `warmup_epochs` then cosine decay to 0 at the last step of `epochs`."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"`trainer.lr_schedule` must be one of {SCHEDULES}. "
                          f"Received: trainer.lr_schedule={schedule!r}")
    if schedule == "constant":
        return base
    warmup_steps = min(warmup_epochs, epochs - 1) * steps_per_epoch
    decay_steps = max(1, epochs * steps_per_epoch - warmup_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=base / 100 if warmup_steps else base, decay_steps=decay_steps,
        warmup_target=base if warmup_steps else None, warmup_steps=warmup_steps)


def steps_per_epoch(n_train: int, batch_size: int, accumulate: int) -> int:
    """Optimizer updates per epoch (what a schedule counts)."""
    return max(1, math.ceil(n_train / batch_size) // accumulate)


class SecondStage:
    """Switches a two-stage fine-tuning from the head-only stage to the fine-tuning stage."""

    def __init__(self, start_epoch: int, top_layers: int | None,
                 recompile: Callable[[keras.Model], None]) -> None:
        self.start_epoch = start_epoch  # 0-based: the first epoch of the second stage
        self.top_layers = top_layers
        self.recompile = recompile

    def __call__(self, model: keras.Model) -> int:
        count = unfreeze(model, self.top_layers)
        self.recompile(model)
        return count
