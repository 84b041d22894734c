"""Fitting: Keras `fit` with the configured callbacks, remembering which epoch was best.

Model selection uses the validation split only: the checkpoint is the one the ModelCheckpoint
callback keeps on its monitored validation metric (`save_best_only: true`), or the last epoch's
(`save_best_only: false`: a fixed schedule, no selection). With `trainer.ema` the validation
metrics, the checkpoints and the final model all use the averaged weights.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from experiments.errors import ConfigError
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


def set_threads(threads: int) -> int:
    """Use `threads` intra-op threads (and one inter-op thread per two of them) in this process;
    returns the number in force. TensorFlow fixes them at its first operation: a process that
    runs a second job (a reused launcher worker) keeps what the first set."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))
    except RuntimeError:  # already initialised
        pass
    return tf.config.threading.get_intra_op_parallelism_threads() or threads


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
    backup_seconds: float = 0.0  # the epochs waited for the per-epoch backups


def find_checkpoint(
    callbacks: Sequence[keras.callbacks.Callback],
) -> keras.callbacks.ModelCheckpoint:
    """The one ModelCheckpoint that keeps the full model we evaluate: the best on validation
    (save_best_only: true) or the last epoch's (false)."""
    found = [cb for cb in callbacks if isinstance(cb, keras.callbacks.ModelCheckpoint)]
    if len(found) != 1:
        raise ConfigError("callbacks must hold exactly one keras.callbacks.ModelCheckpoint (it "
                          f"picks the model to evaluate). Received: {len(found)}")
    checkpoint = found[0]
    if checkpoint.save_weights_only:
        raise ConfigError("The ModelCheckpoint callback must save the full model "
                          "(save_weights_only: false). Received: "
                          f"save_weights_only={checkpoint.save_weights_only!r}")
    if not checkpoint.filepath.endswith(".keras"):
        raise ConfigError("The ModelCheckpoint filepath must end in .keras. Received: "
                          f"filepath={checkpoint.filepath!r}")
    if not checkpoint.monitor.startswith("val_"):
        raise ConfigError("The ModelCheckpoint must monitor a validation metric (the test split "
                          f"never selects models). Received: monitor={checkpoint.monitor!r}")
    return checkpoint


class BestEpoch(keras.callbacks.Callback):
    """Records the epoch whose model the ModelCheckpoint holds and its monitored value (must
    come after it in the list): the best so far, or every epoch without save_best_only."""

    def __init__(self, checkpoint: keras.callbacks.ModelCheckpoint) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.best_epoch = 0
        self.best_value = float("nan")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.checkpoint.save_best_only:
            self.best_epoch = epoch + 1
            self.best_value = float((logs or {}).get(self.checkpoint.monitor, float("nan")))
            return
        best = self.checkpoint.best
        if best is not None and best != self.best_value:
            self.best_epoch, self.best_value = epoch + 1, float(best)


class EmaIn(keras.callbacks.SwapEMAWeights):
    """trainer.ema: the optimizer's moving average of the weights is what validation sees
    (Keras swaps it in for every evaluation) and, from the end of each epoch until `EmaOut`,
    what the model holds, so the checkpoint and the loggers in between see it. `EmaOut` swaps
    the raw weights back before the per-epoch backup, so a resumed run continues exactly."""

    def __init__(self) -> None:
        super().__init__(swap_on_epoch=False)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self._ema_weights_in_model:
            self._swap_variables()
            self._ema_weights_in_model = True

    def swap_out(self) -> None:
        if self._ema_weights_in_model:
            self._swap_variables()
            self._ema_weights_in_model = False


class EmaOut(keras.callbacks.Callback):
    def __init__(self, ema_in: EmaIn) -> None:
        super().__init__()
        self.ema_in = ema_in

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.ema_in.swap_out()


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


class Backup(keras.callbacks.Callback):
    """The training state (weights, optimizer variables with EMA slots, next epoch) saved after
    every epoch and restored when a fit starts again on the same folder, like Keras'
    BackupAndRestore - but written in a background thread from a copy taken at the epoch's
    end, so the next epoch does not wait for the disk. Deleted when training ends."""

    FILE = "state.npz"

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.seconds = 0.0  # what the epochs waited for: the copies, and an unfinished write
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.FILE

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.path.is_file():
            return
        with np.load(self.path) as state:
            weights = [state[f"w{i}"] for i in range(int(state["n_weights"]))]
            variables = [state[f"o{i}"] for i in range(int(state["n_optimizer"]))]
            epoch = int(state["epoch"])
        self.model.set_weights(weights)
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        for variable, value in zip(optimizer.variables, variables, strict=True):
            variable.assign(value)
        self.model._initial_epoch = epoch  # as BackupAndRestore does: fit starts here

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 >= self.params["epochs"] or self.model.stop_training:
            return  # the last epoch: training ends now and its record replaces the backup
        start = time.perf_counter()
        self._wait()
        # A copy of every variable as it is now (milliseconds); the writer converts and saves
        # them while the next epoch trains.
        weights = [tf.identity(v.value) for v in self.model.weights]
        variables = [tf.identity(v.value) for v in self.model.optimizer.variables]
        self._writer = threading.Thread(target=self._write, args=(weights, variables, epoch + 1),
                                        daemon=True)
        self._writer.start()
        self.seconds += time.perf_counter() - start

    def _write(self, weights: list, variables: list, epoch: int) -> None:
        try:
            state = {f"w{i}": np.asarray(w) for i, w in enumerate(weights)}
            state.update({f"o{i}": np.asarray(v) for i, v in enumerate(variables)})
            state.update(n_weights=len(weights), n_optimizer=len(variables), epoch=epoch)
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = self.folder / f".{self.FILE}.partial.npz"
            np.savez(staging, **state)
            os.replace(staging, self.path)  # a kill mid-write keeps the previous state
        except BaseException as error:  # reported by the epoch (or the end) that waits
            self._error = error

    def _wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def on_train_end(self, logs: dict | None = None) -> None:
        start = time.perf_counter()
        self._wait()
        self.seconds += time.perf_counter() - start
        shutil.rmtree(self.folder, ignore_errors=True)


class RecordTraining(keras.callbacks.Callback):
    """Writes the finished training's result (best epoch, its value, the checkpoint) to
    `path` when the last fit of a training ends - before BackupAndRestore deletes its backup -
    so a run killed during its final evaluation resumes by evaluating its checkpoint."""

    def __init__(self, best: BestEpoch, total_epochs: int, path: Path) -> None:
        super().__init__()
        self.best, self.total_epochs, self.path = best, total_epochs, path

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.params.get("epochs") != self.total_epochs or self.best.best_epoch == 0:
            return  # the first stage of two_stage, or nothing to evaluate
        checkpoint = self.best.checkpoint
        record = {"best_epoch": self.best.best_epoch, "best_value": self.best.best_value,
                  "monitor": checkpoint.monitor,
                  "higher_is_better": _higher_is_better(checkpoint),
                  "checkpoint_path": str(checkpoint.filepath)}
        staging = self.path.with_suffix(".partial")
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps(record))
        staging.replace(self.path)


def read_training_record(path: Path) -> TrainResult | None:
    """The result `RecordTraining` wrote, or None when training has not finished."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return TrainResult({}, record["best_epoch"], record["best_value"], record["monitor"],
                       record["higher_is_better"], Path(record["checkpoint_path"]))


class CheckpointOf(keras.callbacks.Callback):
    """Runs the ModelCheckpoint as if `target` were the model being fitted: the head trains
    on cached features, the full classifier (which shares the head's layers) is saved."""

    def __init__(self, checkpoint: keras.callbacks.ModelCheckpoint,
                 target: keras.Model) -> None:
        super().__init__()
        self.checkpoint, self.target = checkpoint, target

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self.checkpoint.set_model(self.target)

    def set_params(self, params: dict) -> None:
        super().set_params(params)
        self.checkpoint.set_params(params)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.checkpoint.on_train_begin(logs)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.checkpoint.on_epoch_begin(epoch, logs)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.checkpoint.on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.checkpoint.on_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.checkpoint.on_train_end(logs)


def uses_ema(model: keras.Model) -> bool:
    """Whether the model's optimizer keeps a moving average of the weights (trainer.ema)."""
    optimizer = model.optimizer
    return bool(getattr(getattr(optimizer, "inner_optimizer", optimizer), "use_ema", False))


def train(model: keras.Model, train_data: tf.data.Dataset, val_data: tf.data.Dataset,
          epochs: int, callbacks: Sequence[keras.callbacks.Callback], backup_dir: Path,
          loggers: Sequence[keras.callbacks.Callback] = (),
          resume_history: dict[str, dict[int, float]] | None = None,
          verbose: int = 1, second_stage: SecondStage | None = None,
          record_path: Path | None = None,
          checkpoint_model: keras.Model | None = None,
          head_stage: tuple[keras.Model, tf.data.Dataset, tf.data.Dataset] | None = None
          ) -> TrainResult:
    """Fit, then report which epoch's checkpoint is the best on validation.

    State is backed up to `backup_dir` after every epoch (after the loggers ran, so an epoch is
    logged at most once; `Backup`); a fit started again on the same folder continues where it
    stopped.
    When the training ends, its result is written to `record_path` (`read_training_record`).
    With `checkpoint_model`, the checkpoint saves that model instead of the one fitted (the
    full classifier whose head is `model`). With `head_stage` (head model, its training and
    validation data on cached features), two_stage's first, head-only stage trains the head
    there while the checkpoint saves `model`.
    """
    checkpoint = find_checkpoint(callbacks)
    Path(checkpoint.filepath).parent.mkdir(parents=True, exist_ok=True)
    best = BestEpoch(checkpoint)
    restore = [RestoreState(callbacks, best, resume_history)] if resume_history else []
    backup = Backup(backup_dir)
    ema_in = EmaIn() if uses_ema(model) else None
    ema = ([ema_in], [EmaOut(ema_in)]) if ema_in else ([], [])
    record = [RecordTraining(best, epochs, record_path)] if record_path else []
    def saving(saved: keras.Model) -> list[keras.callbacks.Callback]:
        """The callbacks, with the checkpoint saving `saved` instead of the model fitted."""
        return [CheckpointOf(cb, saved) if cb is checkpoint else cb for cb in callbacks]

    def fit_stage(fitted: keras.Model, train: tf.data.Dataset, val: tf.data.Dataset,
                  stage_callbacks: list[keras.callbacks.Callback], **epochs: int) -> dict:
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
        higher_is_better=_higher_is_better(checkpoint), checkpoint_path=Path(checkpoint.filepath),
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
