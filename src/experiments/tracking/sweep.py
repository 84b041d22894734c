"""A multirun is one MLflow parent run, its jobs are children (`sweep_callback.MlflowSweep`).

The parent run id reaches the jobs through the environment (EXPERIMENTS_PARENT_RUN_ID), so
it works with the default launcher (jobs in this process) and with launchers that start jobs
in other processes after the sweep starts. When the sweep ends, the parent gets the
comparison report (grouped by the swept keys, seeds pooled) and, with `mlflow.register_as`,
the best job's model is registered.
"""

from __future__ import annotations

import atexit
import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from experiments.errors import ConfigError
from experiments.tracking import comparison as comparison_lib
from experiments.tracking import model_registry, records, store

log = logging.getLogger(__name__)

SEED_KEYS = ("trainer.seed",)  # swept, but pooled into mean +- std rather than grouped
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"  # a grid


def sweep_overrides(config: DictConfig) -> list[str]:
    """What the sweep varies, as overrides: the command line's, then `hydra.sweeper.params`
    that the command line does not set (a preset's own sweep, e.g. experiment=compare_backbones'
    backbones, or an Optuna search space) - both sweepers read the params this way."""
    task = list(config.hydra.overrides.task)
    on_command_line = {o.key_or_group for o in OverridesParser.create().parse_overrides(task)}
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    return [*task, *(f"{key}={value}" for key, value in params.items()
                     if key not in on_command_line and isinstance(value, str))]


def grouped_keys(config: DictConfig) -> list[str]:
    """The swept keys a sweep's report groups its runs by: a grid's (Hydra's basic sweeper),
    seeds left to `group_by_keys`; none for a search (Optuna), whose every trial tries other
    values - its trials pool into one row, and trials.csv lists them one by one (a verdict
    between trials on the test images would invite choosing on them)."""
    target = OmegaConf.select(config, "hydra.sweeper._target_", default=BASIC_SWEEPER)
    return swept_keys(sweep_overrides(config)) if target == BASIC_SWEEPER else []


def swept_keys(overrides: list[str]) -> list[str]:
    """Keys that take several values in this sweep (`backbone=a,b` -> `backbone`)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def trial_row(run, keys: list[str]) -> dict[str, str]:
    """A job as an optimisation trial: its params, the value it returned (the checkpoint's
    monitored validation metric), its state."""
    monitor = run.data.tags.get("checkpoint_monitor")
    value = run.data.metrics.get(f"best_{monitor}") if monitor else None
    params = run.data.params
    return {"run_id": run.info.run_id, "state": run.info.status,
            "value": "" if value is None else f"{value:.6g}",
            **{k: params.get(k, params.get(f"{k}.name", params.get(f"choice.{k}", "")))
               for k in keys}}


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


def check_optuna_storage(config: DictConfig) -> None:
    """Optuna < 3 cannot create its SQLite study storage under SQLAlchemy 2 (it fails with a
    bare AssertionError); say what to install instead."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    if "optuna" not in target.lower() or not storage:
        return
    import optuna

    if int(optuna.__version__.split(".")[0]) < 3:
        raise ConfigError(f"hydra.sweeper.storage={storage!r} needs optuna >= 3 (installed: "
                          f"{optuna.__version__}): `pip install optuna==3.6.2`, or drop the "
                          "storage (an in-memory study)")


class SweepParent:
    """The multirun's parent run, from the sweep's start to its report (`sweep_callback`'s
    Hydra callback drives it)."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not HydraConfig.initialized():  # lets ${hydra:runtime.cwd} (paths.root) resolve
            HydraConfig.instance().set_config(config)
        ml = config.mlflow
        store.check_server(ml.tracking_uri, ml.experiment_name)
        experiment_id = store.ensure_experiment(ml.tracking_uri, ml.experiment_name,
                                                ml.artifact_root)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # e.g. for an Optuna study's SQLite file
        check_optuna_storage(config)
        overrides = sweep_overrides(config)
        self.client = MlflowClient(ml.tracking_uri)
        parent = self.client.create_run(
            experiment_id, run_name=f"sweep {sweep_dir.parent.name}/{sweep_dir.name}",
            tags={"sweep": str(sweep_dir), "sweep_overrides": " ".join(overrides),
                  # what experiments.compare --parent groups by, as this report does
                  "sweep_group_by": json.dumps(grouped_keys(config)), "sweep_parent": "true"})
        self.parent_id = parent.info.run_id
        os.environ[records.PARENT_RUN_ENV] = self.parent_id
        atexit.register(self._end_if_open, "FAILED")
        log.info(f"MLflow parent run {self.parent_id} for sweep {sweep_dir}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        client, parent_id = self.client, self.parent_id
        if client is None or parent_id is None:
            return
        ml = config.mlflow
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            for name in ("multirun.yaml", "optimization_results.yaml"):  # the latter: Optuna's
                if (sweep_dir / name).is_file():
                    client.log_artifact(parent_id, str(sweep_dir / name))
            overrides = sweep_overrides(config)
            self._log_trials(client, parent_id, ml.experiment_name, sweep_dir,
                             swept_keys(overrides),
                             list(OmegaConf.select(config, "hydra.sweeper.params",
                                                   default={}) or {}))
            runs = comparison_lib.find_runs(client, ml.experiment_name, parent_id)
            if runs:
                group_by = group_by_keys(grouped_keys(config), runs[0].data.params)
                title = (f"Sweep {sweep_dir.parent.name}/{sweep_dir.name}: "
                         + " ".join(overrides))
                text, verdict_metrics = comparison_lib.write_report(
                    client, runs, group_by, sweep_dir / "comparison", title)
                client.log_artifacts(parent_id, str(sweep_dir / "comparison"),
                                     "comparison")
                if verdict_metrics:  # delta_roc_auc__a_vs_b, p_delong__a_vs_b, ...
                    client.log_batch(parent_id, metrics=[
                        Metric(name, value, int(time.time() * 1000), 0)
                        for name, value in verdict_metrics.items()])
                print(f"\nSweep comparison (parent run {parent_id}):\n{text}")
                if ml.register_as:
                    self._register_best(client, parent_id, runs, ml.register_as)
        except BaseException:
            self._end_if_open("FAILED")
            raise
        self._end_if_open("FINISHED")

    @staticmethod
    def _log_trials(client: MlflowClient, parent_id: str, experiment: str, sweep_dir: Path,
                    swept: list[str], searched: list[str]) -> None:
        """trials.csv (one row per job: its swept or searched params, the value it returned
        to the sweeper, its state) and the best trial's params, on the parent run."""
        exp = client.get_experiment_by_name(experiment)
        if exp is None:  # the parent's experiment: created before the parent run
            raise RuntimeError(f"The sweep's experiment {experiment!r} is gone")
        runs = client.search_runs(  # jobs of `experiment=` presets log to their own ones
            [e.experiment_id for e in client.search_experiments(max_results=1000)],
            f"tags.`mlflow.parentRunId` = '{parent_id}'",
            order_by=["attributes.start_time ASC"], max_results=10000)
        if not runs:
            return
        keys = [k for k in dict.fromkeys([*searched, *swept]) if k in runs[0].data.params
                or any(k == p.rsplit(".", 1)[0] for p in runs[0].data.params)]
        rows = [trial_row(run, keys) for run in runs]
        folder = sweep_dir / "trials"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "trials.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["run_id", "state", "value", *keys])
            writer.writeheader()
            writer.writerows(rows)
        scored = [(row, run) for row, run in zip(rows, runs, strict=True)
                  if row["value"] != ""]
        if scored:
            mode = scored[0][1].data.tags.get("checkpoint_mode", "max")
            best_row, best_run = (max if mode == "max" else min)(
                scored, key=lambda item: float(item[0]["value"]))
            best = {"run_id": best_run.info.run_id, "value": float(best_row["value"]),
                    "params": {k: best_row[k] for k in keys}}
            (folder / "best_trial.json").write_text(json.dumps(best, indent=2))
            client.log_param(parent_id, "best_trial_run_id", best_run.info.run_id)
            client.log_metric(parent_id, "best_trial_value", best["value"])
        client.log_artifacts(parent_id, str(folder), "trials")

    @staticmethod
    def _register_best(client: MlflowClient, parent_id: str, runs: list, name: str) -> None:
        """Register the model of the job whose checkpoint scored best on validation."""
        def score(run) -> float:
            value = run.data.metrics[f"best_{run.data.tags['checkpoint_monitor']}"]
            return value if run.data.tags["checkpoint_mode"] == "max" else -value
        candidates = [run for run in runs if "model_uri" in run.data.tags]
        if not candidates:
            log.info("No job logged a single model (cross-validations do not); nothing registered")
            return
        best = max(candidates, key=score)
        version = model_registry.register_model(best.data.tags["model_uri"], name)
        client.set_tag(parent_id, "registered_model", f"models:/{name}/{version}")
        log.info(f"Registered the best job ({best.info.run_id}) as models:/{name}/{version}")

    def _end_if_open(self, status: str) -> None:
        if self.client is not None and self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)
            self.parent_id = None
        os.environ.pop(records.PARENT_RUN_ENV, None)
