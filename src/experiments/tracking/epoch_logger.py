"""The Keras callback that logs each epoch's metrics, learning rate and duration to MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import keras

from experiments.tracking.records import log_metrics


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs `loss`, `accuracy`, `val_loss`, `val_accuracy`, `lr` and `epoch_seconds` per epoch.

    Steps are 1-based epoch numbers; `lr` is the rate in force during the epoch (read before
    ReduceLROnPlateau may lower it at the epoch's end).
    """

    METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
    LOGGED = (*METRICS, "lr", "epoch_seconds")

    def __init__(self, logged_steps: Iterable[int] = ()) -> None:
        """logged_steps: epochs already in the run (a resumed run logs each epoch once)."""
        super().__init__()
        self._logged_steps = set(logged_steps)
        self._lr = float("nan")
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 in self._logged_steps:
            return
        logs = logs or {}
        metrics = {name: logs[name] for name in self.METRICS if name in logs}
        metrics["lr"] = self._lr
        metrics["epoch_seconds"] = time.perf_counter() - self._started
        log_metrics(metrics, step=epoch + 1)
