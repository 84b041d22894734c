"""One `python -m experiments.run` job once its config has composed: a resumed run's config
restored, a multi-worker job's role settled, the thread budget set before TensorFlow's first
op, then one training or a cross-validation, and the summary printed."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments.config.instantiate import components
from experiments.config.validation import validated
from experiments.errors import RunStateError
from experiments.orchestration import crossval, resume
from experiments.orchestration import single as single_lib
from experiments.tracking import store as store_lib
from experiments.tracking.summary import print_summary
from experiments.training import distribute
from experiments.training.runtime import set_threads, usable_cores

log = logging.getLogger(__name__)


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> float:
    """One experiment, new or resumed (`resume=<run id>`), or a cross-validation
    (`cv.folds=K`); returns the best epoch's monitored validation metric (mean over folds),
    for sweepers."""
    if cfg.resume is not None:
        cfg = resume.restore_config(cfg, overrides)
        if cfg.trainer.distribute == "multi_worker":
            raise RunStateError("resume is not supported for trainer.distribute=multi_worker "
                                "(every worker would need the chief's training state); start "
                                f"the training again. Received: resume={cfg.resume!r}")
    if distribute.is_chief(cfg.trainer.distribute):
        return run_configured(cfg)
    kind, index, _ = distribute.worker_role()
    scratch = tempfile.mkdtemp(prefix="experiments-worker-")
    log.info(f"TF_CONFIG task {kind}:{index} is not the chief: it trains in step with the chief, "
             f"which writes the outputs and the MLflow run; its own go to {scratch} (deleted at "
             "the end)")
    try:  # a non-chief worker: same steps, nothing written where users look
        return run_configured(worker_config(cfg, Path(scratch)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def worker_config(cfg: DictConfig, scratch: Path) -> DictConfig:
    """A non-chief multi_worker's config: its output folder and MLflow store in `scratch`."""
    cfg = copy.deepcopy(cfg)
    cfg.paths.output_dir = str(scratch / "output")
    cfg.mlflow.tracking_uri = f"sqlite:///{scratch / 'mlflow.db'}"
    cfg.mlflow.artifact_root = str(scratch / "artifacts")
    cfg.mlflow.register_as = None
    return cfg


def run_configured(cfg: DictConfig) -> float:
    """`run` after resume and the worker's role are settled."""
    settings = validated(cfg)
    trainer = settings.trainer
    threads = set_threads(thread_budget(trainer.threads))  # before any TF op
    log.info(f"Using {threads} CPU thread(s) (trainer.threads)")
    distribute.configure(trainer.distribute, trainer.logical_cpus)
    store_lib.check_server(settings.mlflow.tracking_uri, settings.mlflow.experiment_name)
    if settings.resume is not None and settings.finetune.strategy == "two_stage":
        raise RunStateError("resume is not supported for finetune.strategy=two_stage; "
                            f"start the run again. Received: resume={settings.resume!r}")
    parts = components(cfg)
    report = distribute.is_chief(trainer.distribute)
    if settings.cv.enabled:
        result = crossval.run_cross_validation(settings, parts)
        if report:
            print_summary(result.parent_id, result.metrics, None, settings.mlflow.tracking_uri)
        return result.best_value
    done = single_lib.run_single(settings, parts)
    if report:
        print_summary(done.run_id, done.evaluation.metrics, done.training.best_epoch,
                      settings.mlflow.tracking_uri)
    return done.training.best_value


def thread_budget(configured: int | None) -> int:
    """trainer.threads, else this job's share of the cores: all of them for a single run; in
    a sweep whose launcher runs jobs side by side, the cores divided among them (joblib's
    n_jobs, Ray's num_cpus per task, submitit's cpus_per_task)."""
    if configured is not None:
        return configured
    cores = usable_cores()
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cores
    launcher = HydraConfig.get().launcher
    target = str(OmegaConf.select(launcher, "_target_", default=""))
    if "JoblibLauncher" in target:
        n_jobs = OmegaConf.select(launcher, "n_jobs", default=-1) or 1
        parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's -1: all
        return max(1, cores // parallel)
    if "RayLauncher" in target:
        return int(OmegaConf.select(launcher, "ray.remote.num_cpus", default=1) or 1)
    if "submitit" in target.lower():  # hydra_submitit_launcher's LocalLauncher, SlurmLauncher
        return int(OmegaConf.select(launcher, "cpus_per_task", default=None) or 1)
    return cores  # the basic launcher runs one job at a time
