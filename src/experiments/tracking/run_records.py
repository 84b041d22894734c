"""What every training run (single, fold, refit) records the same way: its tags, its config and
its model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from experiments.config.instantiate import Components
from experiments.models.backbones import weights_provenance
from experiments.serving import inference
from experiments.serving.cascade import FALLBACK_DIR
from experiments.serving.ood import OOD_FILE, OodReference
from experiments.tracking import model_registry
from experiments.tracking import records as records_lib

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # <output_dir>/model: the run's model.keras and model_info.json


def sweep_dir() -> str | None:
    """The multirun's sweep folder (tags every job's run), or None outside a sweep."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def common_tags(backbone: str, weights: str | None, class_names: Sequence[str], positive: int,
                image_size: int) -> dict[str, str]:
    """The tags every training run carries: what it classifies, with what (the backbone and
    where its weights came from, with their sha256), where it ran."""
    tags = {
        **weights_provenance(backbone, weights),
        **records_lib.parent_run_tags(),
        "backbone": backbone,
        "positive_class": class_names[positive],
        "image_size": str(image_size),
        "classes": ",".join(class_names),
        "threads": str(tf.config.threading.get_intra_op_parallelism_threads()),
    }
    commit = records_lib.git_commit(Path(__file__).parent)
    if commit:
        tags["git_commit"] = commit
    if (sweep := sweep_dir()) is not None:
        tags["sweep"] = sweep
    return tags


def log_config(components: Components, output_dir: Path, backbone: str, weights: str | None,
               **extra_params: object) -> None:
    """The resolved config (what resume restores), the config files, every key as a param,
    and the weights' source and sha256 (a model from unknown weights cannot be audited)."""
    records_lib.log_text(components.config_yaml, records_lib.RESOLVED_CONFIG)
    hydra_dir = output_dir / ".hydra"
    if hydra_dir.is_dir():
        records_lib.log_artifacts(hydra_dir, ".hydra")
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "config.yaml"
            path.write_text(components.config_yaml)
            records_lib.log_artifact(path, ".hydra")
    records_lib.log_params({**components.params, **weights_provenance(backbone, weights),
                            **extra_params})


def save_run_model(model: object, info: dict, model_dir: Path,
                   ood: OodReference | None = None) -> dict:
    """Write the model, its info (with the out-of-distribution reference's settings) and the
    reference into `model_dir`; returns the info written."""
    if ood is not None:
        info = {**info, "ood": {"k": ood.k, "threshold": ood.threshold,
                                "coverage": ood.coverage, "stain": ood.stain is not None}}
    inference.save_model(model, info, model_dir)
    if ood is not None:
        ood.save(model_dir / OOD_FILE)
    else:  # a file of an earlier attempt does not belong to this model
        (model_dir / OOD_FILE).unlink(missing_ok=True)
    return info


def log_run_model(model: object, info: dict, model_dir: Path, register_as: str | None,
                  tags: dict[str, str] | None = None, ood: OodReference | None = None,
                  fallback_dir: Path | None = None) -> str:
    """Save the run's model with its info (and out-of-distribution reference), log it as the
    run's MLflow model (tag `model_uri`) - with `fallback_dir`, a saved model folder, the
    cascade of the two (cv.cascade) - and register it when asked (in a sweep the sweep
    registers its best job)."""
    info = save_run_model(model, info, model_dir, ood)
    if fallback_dir is None:  # the fallback of an earlier attempt is not this model's
        shutil.rmtree(model_dir / FALLBACK_DIR, ignore_errors=True)
    return publish_model(model_dir, info, None if records_lib.parent_run_tags() else register_as,
                         tags, fallback_dir)


def log_operating_point(prefix: str, temperature: float, threshold: float | None
                        ) -> dict[str, float]:
    """<prefix>temperature and <prefix>threshold (when there is one) of a logged model;
    returns them as logged."""
    metrics = {f"{prefix}temperature": temperature,
               **({f"{prefix}threshold": threshold} if threshold is not None else {})}
    records_lib.log_metrics(metrics)
    return metrics


def publish_model(model_dir: Path, info: dict, register_as: str | None,
                  tags: dict[str, str] | None = None, fallback_dir: Path | None = None) -> str:
    """Log a saved model folder as the active run's MLflow model (tag `model_uri`, beside
    `tags`) - with `fallback_dir`, another saved folder, the cascade of the two - and register
    it under `register_as` when given; returns the model URI."""
    model_uri = model_registry.log_model(model_dir, info, fallback_dir)
    records_lib.set_tags({"model_uri": model_uri, **(tags or {})})
    if register_as:
        version = model_registry.register_model(model_uri, register_as)
        log.info(f"Registered models:/{register_as}/{version}")
    return model_uri
