"""What one training needs, built before it starts: the model compiled for its fine-tuning
strategy, callbacks, augmentation, stain normalisation fitted on the training split.

Components take the typed settings (`schema.Config`) and the factories `run.py` made from the
Hydra config (`Components`); nothing here sees a DictConfig.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from experiments.config.instantiate import Components
from experiments.config.schema import Config
from experiments.data import folders, stain
from experiments.data import splits as splits_lib
from experiments.errors import ConfigError
from experiments.evaluation import metrics
from experiments.models.classifier import build_classifier, compile_classifier
from experiments.models.fused_bn import fuse_batchnorm
from experiments.serving import ood
from experiments.training import distribute, finetune
from experiments.training.callbacks import find_checkpoint
from experiments.training.runtime import resolve_precision, set_precision

# Fine-tuning strategies that never train the backbone: its folds and refit may share one.
NEVER_TRAINED = ("frozen", "linear_probe")


@dataclass(frozen=True)
class Prepared:
    """Everything one training needs, built and checked before the MLflow run opens."""

    splits: splits_lib.Splits
    positive: int  # index of the class whose recall is the sensitivity
    skipped: list[folders.Invalid]  # bad files left out (data.on_invalid=skip)
    image_size: int  # images are decoded at this size (the deliverable model's input)
    precision: str  # the Keras dtype policy in force
    model: keras.Model  # the network that trains (input: data.patch_size when set)
    callbacks: list[keras.callbacks.Callback]
    augment: Any
    second_stage: finetune.SecondStage | None  # finetune.strategy=two_stage
    stain: stain.StainNormalization | None  # data.stain_normalization, fitted on train
    input_mpp: float | None  # of the model's input (data.loading.LoadedData.input_mpp)


def build(settings: Config, components: Components, splits: splits_lib.Splits,
          skipped: list[folders.Invalid], image_size: int, input_mpp: float | None
          ) -> Prepared:
    """Model, callbacks and augmentation for one training on `splits`, seeded; stain
    normalisation fitted on the training split and applied to every split's images."""
    trainer = settings.trainer
    splits, stain_layer = normalize_stains(settings.data.stain_normalization, splits)
    positive = metrics.positive_index(splits.class_names, settings.data.positive_class)
    callbacks = components.callbacks()
    find_checkpoint(callbacks)
    check_schedule(trainer.lr_schedule, callbacks)
    model, precision = new_model(settings, len(splits.class_names), image_size)
    with distribute.scope():  # trainer.distribute: the optimizer is replicated too
        second_stage = compile_for_strategy(settings, components, model,
                                            len(splits.class_names), len(splits.train))
    return Prepared(splits, positive, skipped, image_size, precision, model, callbacks,
                    components.augmentation(trainer.seed), second_stage, stain_layer, input_mpp)


def ood_reference_coverage(settings: Config) -> float | None:
    """The coverage the run's out-of-distribution reference is fitted at (eval.ood_coverage);
    None when it fits none - switched off, or a native-patch model, whose features are per
    crop."""
    return settings.eval.ood_coverage if settings.data.patch_size is None else None


def check_training_split(settings: Config, train: splits_lib.Split) -> None:
    """What a training split must hold, checked before any MLflow run opens: enough images
    for the out-of-distribution reference's cross-validated threshold (eval.ood_coverage),
    and for finetune=linear_probe's cross-validated choice of C."""
    if (coverage := ood_reference_coverage(settings)) is not None:
        ood.check_reference_size(len(train), coverage)
    if settings.finetune.strategy == "linear_probe":
        from experiments.training.probe import inner_folds  # probe imports this module

        inner_folds(np.asarray(train.labels), train.groups)


def new_model(settings: Config, n_classes: int, image_size: int) -> tuple[keras.Model, str]:
    """The seeded, uncompiled classifier under the configured precision, and that policy."""
    keras.utils.set_random_seed(settings.trainer.seed)
    precision = resolve_precision(settings.trainer.precision)
    set_precision(precision)
    backbone = settings.backbone
    with distribute.scope():  # trainer.distribute: variables replicated on every device
        model = build_classifier(backbone.name, backbone.weights,
                                 settings.finetune.strategy == "full",
                                 settings.data.patch_size or image_size, n_classes,
                                 backbone.bn_momentum, backbone.dropout, backbone.pooling,
                                 backbone.feature_layer,
                                 share_frozen=settings.finetune.strategy in NEVER_TRAINED,
                                 head_seed=settings.trainer.seed,
                                 global_pool=backbone.global_pool)
    if settings.trainer.fused_batchnorm:
        fuse_batchnorm(model)
    return model, precision


def compile_for_strategy(settings: Config, components: Components, model: keras.Model,
                         n_classes: int, n_train: int) -> finetune.SecondStage | None:
    """Compile for the first (or only) stage; for two_stage, return the switch to the second
    (unfreeze, then recompile at learning_rate x lr_factor for the remaining epochs)."""
    trainer, plan = settings.trainer, settings.finetune
    steps = finetune.steps_per_epoch(n_train, trainer.batch_size, trainer.accumulate)
    base_lr = settings.optimizer.learning_rate

    def compile_stage(model: keras.Model, lr: float, epochs: int) -> None:
        schedule = finetune.learning_rate(lr, trainer.lr_schedule, epochs, steps,
                                          trainer.warmup_epochs)
        with distribute.scope():
            compile_classifier(model, optimizer(components, schedule, trainer.accumulate,
                                                trainer.ema),
                               n_classes, trainer.jit_compile, trainer.label_smoothing)

    if plan.strategy != "two_stage":
        compile_stage(model, base_lr, trainer.epochs)
        return None
    head_epochs = min(plan.head_epochs, trainer.epochs)
    compile_stage(model, base_lr, head_epochs)
    return finetune.SecondStage(
        head_epochs, plan.unfreeze_layers,
        lambda m: compile_stage(m, base_lr * plan.lr_factor, trainer.epochs - head_epochs))


def optimizer(components: Components, learning_rate: Any, accumulate: int,
              ema: float | None) -> keras.optimizers.Optimizer:
    """The configured optimizer with `learning_rate` (a value or a schedule), accumulating
    gradients over `accumulate` batches, keeping a moving average of the weights (momentum
    `ema`) when asked."""
    extra: dict[str, Any] = {"gradient_accumulation_steps": accumulate} if accumulate > 1 else {}
    if ema is not None:
        extra.update(use_ema=True, ema_momentum=ema)
    return components.optimizer(learning_rate=learning_rate, **extra)


def normalize_stains(method: str | None, splits: splits_lib.Splits
                     ) -> tuple[splits_lib.Splits, stain.StainNormalization | None]:
    """Fit the normaliser on the training images only; normalise train, val and test."""
    if method is None:
        return splits, None
    layer = stain.fit(method, splits.train.images)
    normalized = {name: dataclasses.replace(getattr(splits, name), images=stain.apply(
        layer, getattr(splits, name).images)) for name in ("train", "val", "test")}
    return dataclasses.replace(splits, **normalized), layer


def check_schedule(schedule: str, callbacks: Sequence[keras.callbacks.Callback]) -> None:
    """A scheduled learning rate cannot also be lowered by ReduceLROnPlateau."""
    if schedule != "constant" and any(isinstance(cb, keras.callbacks.ReduceLROnPlateau)
                                      for cb in callbacks):
        raise ConfigError(f"trainer.lr_schedule={schedule!r} sets the learning rate itself; "
                          "remove ReduceLROnPlateau with `~callbacks.reduce_lr`")
