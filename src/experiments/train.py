"""Fitting: Keras `fit` with the configured callbacks, remembering which epoch was best.

Model selection uses the validation split only: the best checkpoint is the one the
ModelCheckpoint callback keeps on its monitored validation metric.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from experiments.finetune import SecondStage

BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy for `trainer.precision` ("auto" picks by hardware)."""
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get(
            "compute_capability", (0, 0))
        if capability >= (8, 0):
            return "mixed_bfloat16"
        return "mixed_float16" if capability >= (7, 0) else "float32"
    return "mixed_bfloat16" if BF16_CPU_FLAGS & cpu_flags() else "float32"


def set_precision(policy: str) -> None:
    """Set the global dtype policy for models built from now on (always set, so one job's
    policy never leaks into the next job of a multirun)."""
    keras.config.set_dtype_policy(policy)


@dataclass(frozen=True)
class TrainResult:
    history: dict[str, list[float]]
    best_epoch: int  # 1-based
    best_value: float  # the checkpoint's monitored value at best_epoch
    monitor: str
    higher_is_better: bool  # the monitor's direction
    checkpoint_path: Path


def find_checkpoint(
    callbacks: Sequence[keras.callbacks.Callback],
) -> keras.callbacks.ModelCheckpoint:
    """The one ModelCheckpoint that keeps the best full model (the model we evaluate)."""
    found = [cb for cb in callbacks if isinstance(cb, keras.callbacks.ModelCheckpoint)]
    if len(found) != 1:
        raise ValueError("callbacks must hold exactly one keras.callbacks.ModelCheckpoint (it "
                         f"picks the model to evaluate). Received: {len(found)}")
    checkpoint = found[0]
    if not checkpoint.save_best_only or checkpoint.save_weights_only:
        raise ValueError("The ModelCheckpoint callback must save the full best model "
                         "(save_best_only: true, save_weights_only: false). Received: "
                         f"save_best_only={checkpoint.save_best_only!r}, "
                         f"save_weights_only={checkpoint.save_weights_only!r}")
    if not checkpoint.filepath.endswith(".keras"):
        raise ValueError("The ModelCheckpoint filepath must end in .keras. Received: "
                         f"filepath={checkpoint.filepath!r}")
    if not checkpoint.monitor.startswith("val_"):
        raise ValueError("The ModelCheckpoint must monitor a validation metric (the test split "
                         f"never selects models). Received: monitor={checkpoint.monitor!r}")
    return checkpoint


class BestEpoch(keras.callbacks.Callback):
    """Records the epoch at which the ModelCheckpoint saved (must come after it in the list)."""

    def __init__(self, checkpoint: keras.callbacks.ModelCheckpoint) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.best_epoch = 0
        self.best_value = float("nan")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        best = self.checkpoint.best
        if best is not None and best != self.best_value:
            self.best_epoch, self.best_value = epoch + 1, float(best)


def _higher_is_better(callback: keras.callbacks.Callback) -> bool:
    mode = getattr(callback, "mode", "auto")
    if mode == "auto":
        return any(word in callback.monitor for word in ("acc", "auc", "precision", "recall"))
    return mode == "max"


class RestoreState(keras.callbacks.Callback):
    """On a resumed fit, gives the monitoring callbacks (ModelCheckpoint, ReduceLROnPlateau,
    EarlyStopping) and BestEpoch the `best` and `wait` they had when the run was interrupted,
    from the logged per-epoch history, so a resumed run never overwrites a better checkpoint.

    Runs at the first epoch of the fit, after BackupAndRestore has chosen where to restart.
    """

    def __init__(self, callbacks: Sequence[keras.callbacks.Callback], best_epoch: BestEpoch,
                 history: dict[str, dict[int, float]]) -> None:
        super().__init__()
        self.callbacks = list(callbacks)
        self.best_epoch = best_epoch
        self.history = history
        self._done = False

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._done:
            return
        self._done = True
        for callback in self.callbacks:
            monitor = getattr(callback, "monitor", None)
            values = self.history.get(monitor, {}) if monitor else {}
            past = [(step, values[step]) for step in sorted(values) if step <= epoch]
            if not past:
                continue
            sign = 1.0 if _higher_is_better(callback) else -1.0
            best_step, best = max(past, key=lambda item: (sign * item[1], -item[0]))
            callback.best = best
            if hasattr(callback, "wait"):
                wait = epoch - best_step
                patience = getattr(callback, "patience", 0)
                is_lr = isinstance(callback, keras.callbacks.ReduceLROnPlateau)
                callback.wait = wait % patience if is_lr and patience else wait
            if callback is self.best_epoch.checkpoint:
                self.best_epoch.best_epoch, self.best_epoch.best_value = best_step, float(best)


def train(model: keras.Model, train_data: tf.data.Dataset, val_data: tf.data.Dataset,
          epochs: int, callbacks: Sequence[keras.callbacks.Callback], backup_dir: Path,
          loggers: Sequence[keras.callbacks.Callback] = (),
          resume_history: dict[str, dict[int, float]] | None = None,
          verbose: int = 1, second_stage: SecondStage | None = None) -> TrainResult:
    """Fit, then report which epoch's checkpoint is the best on validation.

    State is backed up to `backup_dir` after every epoch (after the loggers ran, so an epoch is
    logged at most once); a fit started again on the same folder continues where it stopped.
    """
    checkpoint = find_checkpoint(callbacks)
    Path(checkpoint.filepath).parent.mkdir(parents=True, exist_ok=True)
    best = BestEpoch(checkpoint)
    restore = [RestoreState(callbacks, best, resume_history)] if resume_history else []
    backup = keras.callbacks.BackupAndRestore(str(backup_dir))
    fit = functools.partial(model.fit, train_data, validation_data=val_data,
                            callbacks=[*restore, *callbacks, best, *loggers, backup],
                            verbose=verbose, shuffle=False)  # the tf.data pipeline shuffles
    if second_stage is None or second_stage.start_epoch >= epochs:
        history = fit(epochs=epochs).history
    else:  # the same callbacks carry on, so the best checkpoint is the best of both stages
        history = fit(epochs=second_stage.start_epoch).history
        second_stage(model)
        later = fit(epochs=epochs, initial_epoch=second_stage.start_epoch).history
        history = {key: [*values, *later.get(key, [])] for key, values in history.items()}
    if best.best_epoch == 0:
        raise RuntimeError(f"ModelCheckpoint never saved a model (monitor "
                           f"{checkpoint.monitor!r} missing or NaN in every epoch)")
    return TrainResult(
        history={k: [float(v) for v in vs] for k, vs in history.items()},
        best_epoch=best.best_epoch, best_value=best.best_value, monitor=checkpoint.monitor,
        higher_is_better=_higher_is_better(checkpoint), checkpoint_path=Path(checkpoint.filepath))
