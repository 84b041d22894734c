"""Training state that survives an interruption: per-epoch backups of the variables (written in
a background thread), their restore on resume, and the record written when training ends.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from experiments.training.callbacks import BestEpoch, TrainResult, monitor_increases


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
            sign = 1.0 if monitor_increases(callback) else -1.0
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
            state: dict[str, Any] = {f"w{i}": np.asarray(w) for i, w in enumerate(weights)}
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
                  "higher_is_better": monitor_increases(checkpoint),
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
