"""`resume=<run id>`: continue an interrupted run from its own config and training state.

The config is restored from the run's `resolved_config.yaml` (logged when it started); the
training state (weights, optimizer, epoch) from the per-epoch backup in its output folder, or,
when training had finished and the run died during its final evaluation, from the training
record beside the checkpoint. A run holds a lock on its output folder for as long as its
process lives, so a run whose process still runs is never resumed by a second writer.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.config.instantiate import plain
from experiments.config.schema import typed_config
from experiments.errors import RunStateError
from experiments.tracking import records, store

BACKUP_DIR = "backup"  # per-epoch training state under the run's output dir
TRAINING_RECORD = "training.json"  # written when training ends (train.RecordTraining)
LOCK_FILE = ".run.lock"  # held by the run's process for its whole life

# Overrides a resumed run may take: they change where or how loudly it runs, not what it is.
RESUME_OVERRIDABLE = ("resume", "mlflow.tracking_uri", "trainer.verbose")


def restore_config(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The interrupted run's own resolved config, with `resume` set, once the run is known to
    be resumable (not finished, not running, its training state or record still in its output
    folder).

    An override that would change the experiment (its value differs from the run's) is
    refused; repeating the original command with `resume=<id>` added is fine.
    """
    run_id = cfg.resume
    store.check_server(cfg.mlflow.tracking_uri)
    status, text = records.load_run_config(cfg.mlflow.tracking_uri, run_id)
    created = OmegaConf.create(text)
    if not isinstance(created, DictConfig):
        raise RunStateError(f"Run {run_id}'s saved config is not a mapping")
    stored = typed_config(plain(created, resolve=False))
    refused = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RESUME_OVERRIDABLE or key.startswith("hydra."):
            OmegaConf.update(stored, key, OmegaConf.select(cfg, key), merge=False)
        elif _changes_experiment(cfg, stored, key):
            refused.append(override)
    if refused:
        raise RunStateError(f"resume={run_id} restores that run's own config; refusing overrides "
                            f"that would change the experiment: {refused}. Allowed: "
                            f"{', '.join(RESUME_OVERRIDABLE)}")
    check_resumable(run_id, status, Path(stored.paths.output_dir))
    return stored


def _experiment_defining(cfg: DictConfig) -> dict:
    """The resolved config without the keys a resumed run may change or that name folders."""
    values = plain(cfg)
    for key in (*RESUME_OVERRIDABLE, "paths.output_dir"):
        parent, _, leaf = key.rpartition(".")
        (values[parent] if parent else values).pop(leaf, None)
    return values


def _changes_experiment(composed: DictConfig, stored: DictConfig, key: str) -> bool:
    absent = object()
    ours = OmegaConf.select(composed, key, default=absent)
    theirs = OmegaConf.select(stored, key, default=absent)
    if ours is absent and theirs is absent:  # a global group such as experiment=...
        aligned = composed.copy()  # compare everything, in the stored run's output folder
        OmegaConf.update(aligned, "paths.output_dir", stored.paths.output_dir)
        return _experiment_defining(aligned) != _experiment_defining(stored)
    return ours != theirs


def check_resumable(run_id: str, status: str, output_dir: Path) -> None:
    if status == "FINISHED":
        raise RunStateError(f"MLflow run {run_id} already FINISHED; nothing to resume")
    holder = lock_holder(output_dir)
    if holder is not None:
        raise RunStateError(f"MLflow run {run_id} is still running ({holder} holds "
                            f"{output_dir / LOCK_FILE}); stop that process first, or wait for "
                            "it to finish")
    if not ((output_dir / BACKUP_DIR).is_dir() or (output_dir / TRAINING_RECORD).is_file()):
        raise RunStateError(f"Cannot resume run {run_id}: its training state "
                            f"{output_dir / BACKUP_DIR} is gone")


@contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """Hold the run's lock (an exclusive flock on `<output_dir>/.run.lock`, released by the
    operating system when the process dies, however it dies) for the block."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise RunStateError(f"{output_dir} is in use by another run ({handle.read().strip()}"
                                ")") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_holder(output_dir: Path) -> str | None:
    """Who holds the run's lock ("process <pid> on <host>"), or None when nobody does."""
    path = output_dir / LOCK_FILE
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
