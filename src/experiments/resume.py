"""`resume=<run id>`: continue an interrupted run from its own config and training state.

The config is restored from the run's `resolved_config.yaml` (logged when it started); the
training state (weights, optimizer, epoch) from the per-epoch backup in its output folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments import tracking
from experiments.schema import typed_config

# Overrides a resumed run may take: they change where or how loudly it runs, not what it is.
RESUME_OVERRIDABLE = ("resume", "mlflow.tracking_uri", "trainer.verbose")


def restore_config(cfg: DictConfig, overrides: Sequence[str], backup_dir: str) -> DictConfig:
    """The interrupted run's own resolved config, with `resume` set, once the run is known to
    be resumable (not finished, training state still in `<output_dir>/<backup_dir>`).

    An override that would change the experiment (its value differs from the run's) is
    refused; repeating the original command with `resume=<id>` added is fine.
    """
    run_id = cfg.resume
    tracking.check_server(cfg.mlflow.tracking_uri)
    status, text = tracking.load_run_config(cfg.mlflow.tracking_uri, run_id)
    stored = typed_config(OmegaConf.to_container(OmegaConf.create(text)))
    refused = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RESUME_OVERRIDABLE or key.startswith("hydra."):
            OmegaConf.update(stored, key, OmegaConf.select(cfg, key), merge=False)
        elif _changes_experiment(cfg, stored, key):
            refused.append(override)
    if refused:
        raise ValueError(f"resume={run_id} restores that run's own config; refusing overrides "
                         f"that would change the experiment: {refused}. Allowed: "
                         f"{', '.join(RESUME_OVERRIDABLE)}")
    check_resumable(run_id, status, Path(stored.paths.output_dir) / backup_dir)
    return stored


def _experiment_defining(cfg: DictConfig) -> dict:
    """The resolved config without the keys a resumed run may change or that name folders."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in (*RESUME_OVERRIDABLE, "paths.output_dir"):
        parent, _, leaf = key.rpartition(".")
        (plain[parent] if parent else plain).pop(leaf, None)
    return plain


def _changes_experiment(composed: DictConfig, stored: DictConfig, key: str) -> bool:
    absent = object()
    ours = OmegaConf.select(composed, key, default=absent)
    theirs = OmegaConf.select(stored, key, default=absent)
    if ours is absent and theirs is absent:  # a global group such as experiment=...
        aligned = composed.copy()  # compare everything, in the stored run's output folder
        OmegaConf.update(aligned, "paths.output_dir", stored.paths.output_dir)
        return _experiment_defining(aligned) != _experiment_defining(stored)
    return ours != theirs


def check_resumable(run_id: str, status: str, state_dir: Path) -> None:
    if status == "FINISHED":
        raise ValueError(f"MLflow run {run_id} already FINISHED; nothing to resume")
    if not state_dir.is_dir():
        raise FileNotFoundError(f"Cannot resume run {run_id}: its training state {state_dir} "
                                "is gone")
