"""Hydra Callback: a multirun is one MLflow parent run, its jobs are children.

The parent run id reaches the jobs through the environment (EXPERIMENTS_PARENT_RUN_ID), so
it works with the default launcher (jobs in this process) and with launchers that start jobs
in other processes after the sweep starts. When the sweep ends, the parent gets the
comparison report (grouped by the swept keys, seeds pooled) and, with `mlflow.register_as`,
the best job's model is registered.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from experiments import compare, tracking

SEED_KEYS = ("trainer.seed",)  # swept, but pooled into mean +- std rather than grouped


def swept_keys(overrides: list[str]) -> list[str]:
    """Keys that take several values in this sweep (`backbone=a,b` -> `backbone`)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def group_by_keys(swept: list[str], params: dict[str, str]) -> list[str]:
    """Param keys to group a sweep's runs by: a swept group by its `name` (or the option
    chosen), a swept value by itself; seeds are left out, so their runs pool into one group."""
    keys = []
    for key in swept:
        if key in SEED_KEYS:
            continue
        for candidate in (f"{key}.name", f"choice.{key}", f"{key}._target_", key):
            if candidate in params:
                keys.append(candidate)
                break
    return keys


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not HydraConfig.initialized():  # lets ${hydra:runtime.cwd} (paths.root) resolve
            HydraConfig.instance().set_config(config)
        ml = config.mlflow
        tracking.check_server(ml.tracking_uri)
        experiment_id = tracking.ensure_experiment(ml.tracking_uri, ml.experiment_name,
                                                   ml.artifact_root)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = list(config.hydra.overrides.task)
        self.client = MlflowClient(ml.tracking_uri)
        parent = self.client.create_run(
            experiment_id, run_name=f"sweep {sweep_dir.parent.name}/{sweep_dir.name}",
            tags={"sweep": str(sweep_dir), "sweep_overrides": " ".join(overrides),
                  "sweep_parent": "true"})
        self.parent_id = parent.info.run_id
        os.environ[tracking.PARENT_RUN_ENV] = self.parent_id
        atexit.register(self._end_if_open, "FAILED")
        print(f"MLflow parent run {self.parent_id} for sweep {sweep_dir}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.client is None or self.parent_id is None:
            return
        ml = config.mlflow
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            if (sweep_dir / "multirun.yaml").is_file():
                self.client.log_artifact(self.parent_id, str(sweep_dir / "multirun.yaml"))
            runs = compare.find_runs(self.client, ml.experiment_name, self.parent_id)
            if runs:
                group_by = group_by_keys(swept_keys(list(config.hydra.overrides.task)),
                                         runs[0].data.params)
                text = compare.write_report(self.client, runs, group_by,
                                            sweep_dir / "comparison")
                self.client.log_artifacts(self.parent_id, str(sweep_dir / "comparison"),
                                          "comparison")
                print(f"\nSweep comparison (parent run {self.parent_id}):\n{text}")
                if ml.register_as:
                    self._register_best(runs, ml.register_as)
        except BaseException:
            self._end_if_open("FAILED")
            raise
        self._end_if_open("FINISHED")

    def _register_best(self, runs: list, name: str) -> None:
        """Register the model of the job whose checkpoint scored best on validation."""
        def score(run) -> float:
            value = run.data.metrics[f"best_{run.data.tags['checkpoint_monitor']}"]
            return value if run.data.tags["checkpoint_mode"] == "max" else -value
        candidates = [run for run in runs if "model_uri" in run.data.tags]
        if not candidates:
            print("No job logged a single model (cross-validations do not); nothing registered")
            return
        best = max(candidates, key=score)
        version = tracking.register_model(best.data.tags["model_uri"], name)
        self.client.set_tag(self.parent_id, "registered_model", f"models:/{name}/{version}")
        print(f"Registered the best job ({best.info.run_id}) as models:/{name}/{version}")

    def _end_if_open(self, status: str) -> None:
        if self.client is not None and self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)
            self.parent_id = None
        os.environ.pop(tracking.PARENT_RUN_ENV, None)
