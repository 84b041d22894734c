"""`python -m experiments.run`: compose -> build -> train -> evaluate -> log.

The only module that sees the Hydra config: it validates it once (`OmegaConf.to_object` runs the
schema checks), turns the optimizer, augmentation and callbacks groups into factories, and
hands typed settings to one training (`job`) or a cross-validation (`crossval`). Everything
that can fail on bad input (data, weights, callbacks, tracking store) fails before the MLflow
run opens and before the first epoch; such errors print one message and exit with code 2.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from experiments.config.instantiate import components
from experiments.config.schema import CONFIG_MODULE, Config, register_configs
from experiments.errors import ConfigError, RunStateError, UserError, exit_with
from experiments.orchestration import crossval, interrupt, resume
from experiments.orchestration import single as single_lib
from experiments.tracking import records
from experiments.tracking import store as store_lib
from experiments.training import distribute
from experiments.training.runtime import set_threads, usable_cores

log = logging.getLogger(__name__)

register_configs()


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


# How to set the keys a preset leaves required (???), said when one is missing.
REQUIRED_HINTS = {
    "data.root": " - the folder with one subfolder per class, e.g. data.root=/path/to/images "
                 "(experiment=quickstart runs on built-in demo data)",
    "data.sources.second.root": " - experiment=transfer_multisource trains on a second "
                                "labeled folder too, e.g. data.sources.second.root="
                                "/path/to/other_lab (the same class subfolders)",
}


def validated(cfg: DictConfig) -> Config:
    """The typed settings (the schema's checks run here); a required key left unset is a
    user's error, reported with the key and how to set it."""
    try:
        settings = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        key = error.full_key
        hint = REQUIRED_HINTS.get(str(key), "")
        raise ConfigError(f"`{key}` must be set{hint}. Received: {key}=???") from error
    if not isinstance(settings, Config):
        raise TypeError(f"The composed config is not a Config. Received: {type(settings)!r}")
    return settings


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


def direction(mode: str) -> str:
    """An Optuna direction from a checkpoint's mode (max/min): sweepers optimise the value
    `experiments.run` returns, the monitored validation metric."""
    if mode not in ("max", "min"):
        raise ConfigError("callbacks.model_checkpoint.mode must be max or min for a "
                          f"hyperparameter search. Received: {mode!r}")
    return "maximize" if mode == "max" else "minimize"


OmegaConf.register_new_resolver("direction", direction, replace=True)


SUMMARY_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1", "loss")


def print_summary(run_id: str, metrics: dict[str, float], best_epoch: int | None,
                  tracking_uri: str) -> None:
    """The headline test metrics with their intervals, and warnings (a backwards ranking is
    also tagged on the run); every metric is in MLflow."""
    if best_epoch is None:
        print(f"\nCross-validation {run_id} finished. Pooled out-of-fold test predictions:")
    else:
        print(f"\nRun {run_id} finished. Best epoch (on validation): {best_epoch}")
        print("Test split (used once, after training):")
    for prefix, title in (("test_", "plain"), ("test_tta_", "with TTA"),
                          ("test_op_", "at the validation threshold")):
        shown = [name for name in SUMMARY_METRICS if f"{prefix}{name}" in metrics]
        if not shown:
            continue
        print(f"  {title}:")
        for name in shown:
            value = metrics[f"{prefix}{name}"]
            low, high = (metrics.get(f"{prefix}{name}_ci_{end}") for end in ("low", "high"))
            interval = f"  [{low:.3f}, {high:.3f}]" if low is not None else ""
            print(f"    {prefix}{name:<14} {value:.4f}{interval}")
    if "val_threshold" in metrics:
        print(f"  threshold on p(positive), chosen on validation: {metrics['val_threshold']:.4f}")
    print_answered(metrics)
    print_cohorts(metrics)
    flag_backwards(run_id, metrics, tracking_uri)
    print(f"Open the MLflow UI: {store_lib.ui_command(tracking_uri)}")


def warn_backwards(metrics: dict[str, float]) -> list[str]:
    """Warn of every ROC-AUC whose whole interval lies below 0.5: images - a cohort, a source's
    test images, their patients - that the model ranks backwards, confidently wrong where a coin
    would be right half the time. Returns the metrics warned of."""
    inverted = sorted(key.removesuffix("_ci_high") for key, high in metrics.items()
                      if key.endswith("roc_auc_ci_high") and high < 0.5)
    for key in inverted:
        log.warning(f"Warning: {key} {metrics[key]:.3f} [{metrics[f'{key}_ci_low']:.3f}, "
                    f"{metrics[f'{key}_ci_high']:.3f}]: the model ranks these images backwards "
                    "(the whole interval below 0.5). Do not use its answers on such images.")
    return inverted


def flag_backwards(run_id: str, metrics: dict[str, float], tracking_uri: str) -> None:
    """`warn_backwards`, and the same warning as a tag on the run, where the MLflow UI shows it
    beside the metrics (the printed summary is gone once the terminal is)."""
    inverted = warn_backwards(metrics)
    if inverted:
        records.tag_ended_run(tracking_uri, run_id, {records.BACKWARDS_TAG: (
            "ROC-AUC interval wholly below 0.5 - do not use the model's answers on these "
            "images: " + ", ".join(inverted))})


def print_answered(metrics: dict[str, float]) -> None:
    """cv.cascade: the share of each source's images the home model answered, and what the
    all-source model alone would have scored."""
    if "test_answered_by_first" not in metrics:
        return
    shares = ", ".join(f"{key.removeprefix('test_source_').split('_answered')[0]} {value:.0%}"
                       for key, value in sorted(metrics.items())
                       if key.startswith("test_source_") and key.endswith("_answered_by_first"))
    print(f"  answered by the home model (the rest by the all-source model): {shares}")
    alone = [f"{name} {metrics[f'fallback_test_{name}']:.4f}" for name in ("accuracy", "roc_auc")
             if f"fallback_test_{name}" in metrics]
    print(f"  the all-source model alone: {', '.join(alone)}")


def print_cohorts(metrics: dict[str, float]) -> None:
    """Each external cohort's headline metrics (eval.external) with their intervals."""
    cohorts = sorted(name.removeprefix("ext_").removesuffix("_n_images") for name in metrics
                     if name.startswith("ext_") and name.endswith("_n_images"))
    if cohorts:
        print("External cohorts (the final model; never used to train, select or calibrate):")
    for cohort in cohorts:
        cells = []
        for name in ("accuracy", "roc_auc", "patient_accuracy", "ece", "referred",
                     "accepted_accuracy", "ood_auroc"):
            key = f"ext_{cohort}_{name}"
            if key in metrics:
                low = metrics.get(f"{key}_ci_low")
                interval = "" if low is None else \
                    f" [{low:.3f}, {metrics[f'{key}_ci_high']:.3f}]"
                if f"{key}_calibrated_95" in metrics:  # what chance alone gives this cohort
                    interval = f" (a calibrated model: < {metrics[f'{key}_calibrated_95']:.3f})"
                cells.append(f"{name} {metrics[key]:.3f}{interval}")
        print(f"  {cohort} ({int(metrics[f'ext_{cohort}_n_images'])} images): "
              + ", ".join(cells))


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def main(cfg: DictConfig) -> float:
    interrupt.stop_on_signals()  # SIGTERM and Ctrl-C end the MLflow run KILLED
    try:
        return run(cfg, list(HydraConfig.get().overrides.task))
    except Exception as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            report_failed_job(error)
            raise  # the job fails (its run ends FAILED); the sweep goes on
        if isinstance(error, UserError):
            exit_with(error)
        raise


def report_failed_job(error: Exception) -> None:
    """Say so when a sweep's job fails: Hydra goes on to the next job in silence and prints
    the error only when the whole sweep ends, hours later in a long one."""
    log.error(f"This job failed: {type(error).__name__}: {error}\nThe sweep goes on; it exits "
              "with an error when it ends, and Hydra prints the traceback then (the job's "
              "MLflow run, if it started, is FAILED with the traceback in error.txt).")


if __name__ == "__main__":
    main()
