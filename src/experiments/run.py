"""`python -m experiments.run`: compose -> build -> train -> evaluate -> log.

With `orchestration.launch`, the only code that sees the Hydra config: it is validated
(`OmegaConf.to_object` runs the schema checks), the optimizer, augmentation and callbacks groups
become factories, and typed settings go to one training (`single`) or a cross-validation
(`crossval`). Everything that can fail on bad input (data, weights, callbacks, tracking store)
fails before the MLflow run opens and before the first epoch; such errors print one message and
exit with code 2.

TensorFlow, Keras and MLflow are loaded once a config has composed and validated
(`orchestration.launch`), not when this module is: Hydra's `--help`, `--cfg` and `--info`, an
override that names no key and a required key left unset answer in about a second instead of
six (benchmarks/startup.py); so do a data folder or weights file that does not exist.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments.config.schema import CONFIG_MODULE, register_configs
from experiments.config.validation import check_locations, validated
from experiments.errors import ConfigError, UserError, exit_with

log = logging.getLogger(__name__)

register_configs()


def run(cfg: DictConfig, overrides: Sequence[str] = (), stop_on_signals: bool = False) -> float:
    """One experiment, new or resumed (`resume=<run id>`), or a cross-validation
    (`cv.folds=K`); returns the best epoch's monitored validation metric (mean over folds),
    for sweepers. `stop_on_signals`: SIGTERM and Ctrl-C end the MLflow run KILLED (the
    command line's; a caller in Python keeps its own handlers)."""
    if cfg.resume is None:  # a resumed run's config is the stored one, checked once restored
        check_locations(validated(cfg))
    # Here, not at the top: everything before this line answers without loading TensorFlow.
    from experiments.orchestration import interrupt, launch

    if stop_on_signals:
        interrupt.stop_on_signals()
    return launch.run(cfg, overrides)


def direction(mode: str) -> str:
    """An Optuna direction from a checkpoint's mode (max/min): sweepers optimise the value
    `experiments.run` returns, the monitored validation metric."""
    if mode not in ("max", "min"):
        raise ConfigError("callbacks.model_checkpoint.mode must be max or min for a "
                          f"hyperparameter search. Received: {mode!r}")
    return "maximize" if mode == "max" else "minimize"


OmegaConf.register_new_resolver("direction", direction, replace=True)


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg, list(HydraConfig.get().overrides.task), stop_on_signals=True)
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
