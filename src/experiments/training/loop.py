"""The fit loop: `train` with model selection on validation (one or two fine-tuning stages, on
images or on cached features), `train_without_validation` for a refit on all images.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from experiments.errors import ConfigError
from experiments.training.callbacks import (
    BestEpoch,
    CheckpointOf,
    EmaIn,
    EmaOut,
    TrainResult,
    find_checkpoint,
    monitor_increases,
)
from experiments.training.finetune import SecondStage
from experiments.training.state import Backup, RecordTraining, RestoreState


def uses_ema(model: keras.Model) -> bool:
    """Whether the model's optimizer keeps a moving average of the weights (trainer.ema)."""
    optimizer = model.optimizer
    return bool(getattr(getattr(optimizer, "inner_optimizer", optimizer), "use_ema", False))


@dataclass(frozen=True)
class TrainPlan:
    """How one training runs, apart from the model and its data."""

    epochs: int
    callbacks: Sequence[keras.callbacks.Callback]  # the configured ones, a checkpoint among them
    backup_dir: Path  # per-epoch state (`Backup`): a fit started again here continues
    loggers: Sequence[keras.callbacks.Callback] = ()  # run after selection, before the backup
    resume_history: dict[str, dict[int, float]] | None = None  # logged epochs, when resuming
    verbose: int = 1
    second_stage: SecondStage | None = None  # finetune=two_stage
    record_path: Path | None = None  # where the result is written at the end


def train(model: keras.Model, train_data: tf.data.Dataset, val_data: tf.data.Dataset,
          plan: TrainPlan, checkpoint_model: keras.Model | None = None,
          head_stage: tuple[keras.Model, tf.data.Dataset, tf.data.Dataset] | None = None
          ) -> TrainResult:
    """Fit, then report which epoch's checkpoint is the best on validation.

    State is backed up to `plan.backup_dir` after every epoch (after the loggers ran, so an
    epoch is logged at most once; `Backup`); a fit started again on the same folder continues
    where it stopped. When the training ends, its result is written to `plan.record_path`
    (`read_training_record`). With `checkpoint_model`, the checkpoint saves that model instead
    of the one fitted (the full classifier whose head is `model`). With `head_stage` (head
    model, its training and validation data on cached features), two_stage's first, head-only
    stage trains the head there while the checkpoint saves `model`.
    """
    epochs, callbacks, second_stage = plan.epochs, plan.callbacks, plan.second_stage
    loggers, verbose, record_path = plan.loggers, plan.verbose, plan.record_path
    resume_history = plan.resume_history
    checkpoint = find_checkpoint(callbacks)
    Path(checkpoint.filepath).parent.mkdir(parents=True, exist_ok=True)
    best = BestEpoch(checkpoint)
    restore = [RestoreState(callbacks, best, resume_history)] if resume_history else []
    backup = Backup(plan.backup_dir)
    ema_in = EmaIn() if uses_ema(model) else None
    ema = ([ema_in], [EmaOut(ema_in)]) if ema_in else ([], [])
    record = [RecordTraining(best, epochs, record_path)] if record_path else []
    def saving(saved: keras.Model) -> list[keras.callbacks.Callback]:
        """The callbacks, with the checkpoint saving `saved` instead of the model fitted."""
        return [CheckpointOf(cb, saved) if cb is checkpoint else cb for cb in callbacks]

    def fit_stage(fitted: keras.Model, train: tf.data.Dataset, val: tf.data.Dataset,
                  stage_callbacks: Sequence[keras.callbacks.Callback], **epochs: int) -> dict:
        return fitted.fit(train, validation_data=val, verbose=verbose,
                          callbacks=[*restore, *ema[0], *stage_callbacks, best, *loggers,
                                     *ema[1], *record, backup],
                          shuffle=False, **epochs).history  # the tf.data pipeline shuffles

    fit = functools.partial(fit_stage, model, train_data, val_data,
                            saving(checkpoint_model) if checkpoint_model is not None
                            else callbacks)
    if second_stage is None or second_stage.start_epoch >= epochs:
        history = fit(epochs=epochs)
    else:  # the same callbacks carry on, so the best checkpoint is the best of both stages
        if head_stage is None:
            history = fit(epochs=second_stage.start_epoch)
        else:  # the head-only stage on cached features: the checkpoint saves the classifier
            head, head_train, head_val = head_stage
            history = fit_stage(head, head_train, head_val, saving(model),
                                epochs=second_stage.start_epoch)
        second_stage(model)
        later = fit(epochs=epochs, initial_epoch=second_stage.start_epoch)
        history = {key: [*values, *later.get(key, [])] for key, values in history.items()}
    if best.best_epoch == 0:
        raise ConfigError(f"ModelCheckpoint never saved a model (monitor "
                          f"{checkpoint.monitor!r} missing or NaN in every epoch)")
    return TrainResult(
        history={k: [float(v) for v in vs] for k, vs in history.items()},
        best_epoch=best.best_epoch, best_value=best.best_value, monitor=checkpoint.monitor,
        higher_is_better=monitor_increases(checkpoint), checkpoint_path=Path(checkpoint.filepath),
        backup_seconds=backup.seconds)


def train_without_validation(model: keras.Model, train_data: tf.data.Dataset, epochs: int,
                             loggers: Sequence[keras.callbacks.Callback] = (),
                             verbose: int = 1, second_stage: SecondStage | None = None) -> None:
    """Fit for exactly `epochs` on every image (a cross-validation's refit): no validation,
    no checkpoint selection, no early stopping; the model ends with its final weights (the
    averaged ones with trainer.ema)."""
    fit = functools.partial(model.fit, train_data, callbacks=list(loggers), verbose=verbose,
                            shuffle=False)
    if second_stage is None or second_stage.start_epoch >= epochs:
        fit(epochs=epochs)
        return
    fit(epochs=second_stage.start_epoch)
    second_stage(model)
    fit(epochs=epochs, initial_epoch=second_stage.start_epoch)
