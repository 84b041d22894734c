"""Model selection during training: the best epoch on validation, the checkpoint of the
classifier when a part of it trains, weight averaging (EMA) swapped in for validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras

from experiments.errors import ConfigError


@dataclass(frozen=True)
class TrainResult:
    history: dict[str, list[float]]
    best_epoch: int  # 1-based
    best_value: float  # the checkpoint's monitored value at best_epoch
    monitor: str
    higher_is_better: bool  # the monitor's direction
    checkpoint_path: Path
    backup_seconds: float = 0.0  # the epochs waited for the per-epoch backups
    # The checkpoint's model when it is still in memory, exactly as saved (a linear probe
    # writes its regression into the classifier and saves it): evaluation need not load a
    # DenseNet back from disk, seconds per fold of a frozen-feature study.
    model: keras.Model | None = None


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

    _ema_weights_in_model: bool  # set by SwapEMAWeights

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


def monitor_increases(callback: keras.callbacks.Callback) -> bool:
    mode = getattr(callback, "mode", "auto")
    if mode == "auto":
        return any(word in callback.monitor for word in ("acc", "auc", "precision", "recall"))
    return mode == "max"


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
