"""`python -m experiments.run`: compose -> build -> train -> evaluate -> log.

The only module that sees the Hydra config: it validates it once (`OmegaConf.to_object` runs the
schema checks), instantiates optimizer, augmentation and callbacks, and hands plain values to
the components. Everything that can fail on bad input (data, weights, callbacks, tracking store)
fails before the MLflow run opens and before the first epoch.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import keras
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments import data as data_lib
from experiments import evaluate, tracking
from experiments.backbones import resolve_image_size
from experiments.demo import ensure_demo_dataset
from experiments.model import build_classifier, compile_classifier
from experiments.schema import Config, DemoDataConfig, register_configs
from experiments.train import find_checkpoint, train

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs, built and checked before the MLflow run opens."""

    splits: data_lib.Splits
    images: dict[str, Any]  # split name -> uint8 array
    image_size: int
    model: keras.Model
    callbacks: list[keras.callbacks.Callback]
    augment: Any


def sweep_dir() -> str | None:
    """The multirun's sweep folder (tags every job's run), or None outside a sweep."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def instantiate_callbacks(callbacks_cfg: DictConfig) -> list[keras.callbacks.Callback]:
    """Every non-null entry of the `callbacks` group, in config order."""
    return [hydra.utils.instantiate(node, _convert_="all")
            for node in callbacks_cfg.values() if node is not None]


def prepare(cfg: DictConfig, settings: Config) -> Prepared:
    data_cfg, trainer = settings.data, settings.trainer
    if isinstance(data_cfg, DemoDataConfig):
        ensure_demo_dataset(data_cfg.root, data_cfg.images_per_class, data_cfg.source_size)
    image_size = resolve_image_size(settings.backbone.name, data_cfg.image_size)
    splits = data_lib.make_splits(data_cfg.root, data_cfg.test_root, data_cfg.val_fraction,
                                  data_cfg.test_fraction, trainer.seed)
    evaluate.positive_index(splits.class_names, data_cfg.positive_class)  # fail early
    images = {name: data_lib.load_images(getattr(splits, name).files, image_size)
              for name in ("train", "val", "test")}
    callbacks = instantiate_callbacks(cfg.callbacks)
    find_checkpoint(callbacks)
    keras.utils.set_random_seed(trainer.seed)
    backbone = settings.backbone
    model = build_classifier(backbone.name, backbone.weights, backbone.trainable, image_size,
                             len(splits.class_names), backbone.bn_momentum)
    compile_classifier(model, hydra.utils.instantiate(cfg.optimizer, _convert_="all"),
                       len(splits.class_names))
    augment = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    return Prepared(splits, images, image_size, model, callbacks, augment)


def run_tags(settings: Config, prepared: Prepared) -> dict[str, str]:
    splits = prepared.splits
    tags = {
        "backbone": settings.backbone.name,
        "image_size": str(prepared.image_size),
        "classes": ",".join(splits.class_names),
        **{f"n_{name}": str(n) for name, n in splits.sizes().items()},
    }
    for name in ("train", "val", "test"):
        counts = getattr(splits, name).class_counts(splits.class_names)
        tags[f"class_counts_{name}"] = ",".join(f"{c}={n}" for c, n in counts.items())
    commit = tracking.git_commit(Path(__file__).parent)
    if commit:
        tags["git_commit"] = commit
    if (sweep := sweep_dir()) is not None:
        tags["sweep"] = sweep
    return tags


def run(cfg: DictConfig) -> float:
    """One experiment; returns the best epoch's monitored validation metric (for sweepers)."""
    settings: Config = OmegaConf.to_object(cfg)
    params = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
    prepared = prepare(cfg, settings)
    trainer, ml = settings.trainer, settings.mlflow
    output_dir = Path(settings.paths.output_dir)
    experiment_id = tracking.ensure_experiment(ml.tracking_uri, ml.experiment_name,
                                               ml.artifact_root)
    splits, images = prepared.splits, prepared.images
    n_classes = len(splits.class_names)
    with tracking.open_run(experiment_id, ml.run_name, run_tags(settings, prepared)) as run_id:
        print(f"MLflow run {run_id} (experiment {ml.experiment_name!r}, store {ml.tracking_uri})")
        tracking.log_params(params)
        train_ds = data_lib.training_dataset(images["train"], splits.train.labels, n_classes,
                                             trainer.batch_size, prepared.augment, trainer.seed)
        val_ds = data_lib.evaluation_dataset(images["val"], splits.val.labels, n_classes,
                                             trainer.batch_size)
        result = train(prepared.model, train_ds, val_ds, trainer.epochs, prepared.callbacks,
                       [tracking.MlflowEpochLogger()], trainer.verbose)
        best_model = evaluate.load_checkpoint(result.checkpoint_path)
        test_ds = data_lib.evaluation_dataset(images["test"], None, n_classes, trainer.batch_size)
        predictions = evaluate.predict(best_model, test_ds, splits.test.files,
                                       splits.test.labels)
        positive = evaluate.positive_index(splits.class_names, settings.data.positive_class)
        test_metrics = evaluate.classification_metrics(predictions, positive)
        tracking.log_metrics({**test_metrics, "best_epoch": result.best_epoch,
                              f"best_{result.monitor}": result.best_value})
        report = evaluate.write_report(predictions, splits.class_names, positive,
                                       result.history, result.best_epoch, output_dir / "report")
        report.append(data_lib.write_split_table(splits, output_dir / "report" / "splits.csv"))
        for path in report:
            tracking.log_artifact(path)
        tracking.log_artifact(result.checkpoint_path, "checkpoints")
        log_config_files(cfg, output_dir)
    print_summary(run_id, test_metrics, result.best_epoch, ml.tracking_uri)
    return result.best_value


def log_config_files(cfg: DictConfig, output_dir: Path) -> None:
    """Hydra's own `.hydra/` files when Hydra wrote them, else the composed config."""
    hydra_dir = output_dir / ".hydra"
    if hydra_dir.is_dir():
        tracking.log_artifacts(hydra_dir, ".hydra")
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        tracking.log_artifact(path, ".hydra")


def print_summary(run_id: str, test_metrics: dict[str, float], best_epoch: int,
                  tracking_uri: str) -> None:
    print(f"\nRun {run_id} finished. Best epoch (on validation): {best_epoch}")
    print("Test split (used once, after training):")
    for name, value in test_metrics.items():
        print(f"  {name:<18} {value:.4f}")
    print(f"Open the MLflow UI: {tracking.ui_command(tracking_uri)}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
