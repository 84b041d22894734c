"""The Hydra callback of every run (`hydra.callbacks.mlflow_sweep` in conf/config.yaml).

Hydra instantiates its callbacks for every run, single runs and `--cfg` aside, before the job's
config is checked: this module loads nothing heavy, and MLflow and the report's libraries
(`sweep`) are imported only when a multirun starts, so a single run's typo or missing key is
reported without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

if TYPE_CHECKING:
    from experiments.tracking.sweep import SweepParent


class MlflowSweep(Callback):
    """A multirun as one MLflow parent run with the jobs as its children, and its report."""

    def __init__(self) -> None:
        self.parent: SweepParent | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.tracking.sweep import SweepParent  # MLflow loads here: a multirun

        self.parent = SweepParent()
        self.parent.on_multirun_start(config, **kwargs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is not None:
            self.parent.on_multirun_end(config, **kwargs)
