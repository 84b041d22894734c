"""`python -m experiments.run`: compose -> build -> train -> evaluate -> log.

The only module that sees the Hydra config: it validates it once (`OmegaConf.to_object` runs the
schema checks), instantiates optimizer, augmentation and callbacks, and hands plain values to
the components. Everything that can fail on bad input (data, weights, callbacks, tracking store)
fails before the MLflow run opens and before the first epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import keras
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments import crossval, evaluate, finetune, resume, stain, tracking
from experiments import data as data_lib
from experiments.backbones import resolve_image_size
from experiments.demo import ensure_demo_dataset
from experiments.model import build_classifier, compile_classifier
from experiments.schema import Config, DemoDataConfig, register_configs
from experiments.train import (
    TrainResult,
    find_checkpoint,
    resolve_precision,
    set_precision,
    train,
)

log = logging.getLogger(__name__)
BACKUP_DIR = "backup"  # per-epoch training state under the run's output dir
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs, built and checked before the MLflow run opens."""

    splits: data_lib.Splits
    positive: int  # index of the class whose recall is the sensitivity
    skipped: list[data_lib.Invalid]  # bad files left out (data.on_invalid=skip)
    image_size: int
    precision: str  # the Keras dtype policy in force
    model: keras.Model
    callbacks: list[keras.callbacks.Callback]
    augment: Any
    second_stage: finetune.SecondStage | None  # finetune.strategy=two_stage
    stain: stain.StainNormalization | None  # data.stain_normalization, fitted on train


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


def instantiate_optimizer(optimizer_cfg: DictConfig, accumulate: int,
                          learning_rate: Any = None) -> keras.optimizers.Optimizer:
    """The configured Keras optimizer, accumulating gradients over `accumulate` batches, with
    `learning_rate` (a value or a schedule) instead of the configured one when given."""
    extra: dict[str, Any] = {"gradient_accumulation_steps": accumulate} if accumulate > 1 else {}
    if learning_rate is not None:
        extra["learning_rate"] = learning_rate
    # A partial, so a schedule object can replace the (typed, float) configured rate.
    return hydra.utils.instantiate(optimizer_cfg, _convert_="all", _partial_=True)(**extra)


@dataclass(frozen=True)
class LoadedData:
    """Every image of data.root (and data.test_root), decoded and checked, not yet split."""

    class_names: tuple[str, ...]
    pool: data_lib.Split
    test: data_lib.Split | None  # data.test_root
    skipped: list[data_lib.Invalid]
    image_size: int


def prepare(cfg: DictConfig, settings: Config) -> Prepared:
    loaded = load_data(settings)
    data_cfg = settings.data
    splits = data_lib.make_splits(loaded.class_names, loaded.pool, loaded.test,
                                  data_cfg.val_fraction, data_cfg.test_fraction,
                                  settings.trainer.seed)
    return build(cfg, settings, loaded, splits)


def build(cfg: DictConfig, settings: Config, loaded: LoadedData,
          splits: data_lib.Splits) -> Prepared:
    """Model, callbacks and augmentation for one training on `splits`, seeded; stain
    normalisation fitted on the training split and applied to every split's images."""
    trainer = settings.trainer
    splits, stain_layer = normalize_stains(settings.data.stain_normalization, splits)
    positive = evaluate.positive_index(splits.class_names, settings.data.positive_class)
    callbacks = instantiate_callbacks(cfg.callbacks)
    find_checkpoint(callbacks)
    check_schedule(trainer.lr_schedule, callbacks)
    keras.utils.set_random_seed(trainer.seed)
    precision = resolve_precision(trainer.precision)
    set_precision(precision)
    backbone = settings.backbone
    n_classes = len(splits.class_names)
    model = build_classifier(backbone.name, backbone.weights,
                             settings.finetune.strategy == "full",
                             loaded.image_size, n_classes, backbone.bn_momentum)
    second_stage = compile_for_strategy(cfg, settings, model, n_classes, len(splits.train))
    augment = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    return Prepared(splits, positive, loaded.skipped, loaded.image_size, precision, model,
                    callbacks, augment, second_stage, stain_layer)


def compile_for_strategy(cfg: DictConfig, settings: Config, model: keras.Model,
                         n_classes: int, n_train: int) -> finetune.SecondStage | None:
    """Compile for the first (or only) stage; for two_stage, return the switch to the second
    (unfreeze, then recompile at learning_rate x lr_factor for the remaining epochs)."""
    trainer, plan = settings.trainer, settings.finetune
    steps = finetune.steps_per_epoch(n_train, trainer.batch_size, trainer.accumulate)
    base_lr = settings.optimizer.learning_rate

    def compile_stage(model: keras.Model, lr: float, epochs: int) -> None:
        schedule = finetune.learning_rate(lr, trainer.lr_schedule, epochs, steps,
                                          trainer.warmup_epochs)
        compile_classifier(model, instantiate_optimizer(cfg.optimizer, trainer.accumulate,
                                                        schedule),
                           n_classes, trainer.jit_compile, trainer.label_smoothing)

    if plan.strategy != "two_stage":
        compile_stage(model, base_lr, trainer.epochs)
        return None
    head_epochs = min(plan.head_epochs, trainer.epochs)
    compile_stage(model, base_lr, head_epochs)
    return finetune.SecondStage(
        head_epochs, plan.unfreeze_layers,
        lambda m: compile_stage(m, base_lr * plan.lr_factor, trainer.epochs - head_epochs))


def normalize_stains(method: str | None, splits: data_lib.Splits
                     ) -> tuple[data_lib.Splits, stain.StainNormalization | None]:
    """Fit the normaliser on the training images only; normalise train, val and test."""
    if method is None:
        return splits, None
    layer = stain.fit(method, splits.train.images)
    normalized = {name: dataclasses.replace(getattr(splits, name), images=stain.apply(
        layer, getattr(splits, name).images)) for name in ("train", "val", "test")}
    return dataclasses.replace(splits, **normalized), layer


def check_schedule(schedule: str, callbacks: Sequence[keras.callbacks.Callback]) -> None:
    """A scheduled learning rate cannot also be lowered by ReduceLROnPlateau."""
    if schedule != "constant" and any(isinstance(cb, keras.callbacks.ReduceLROnPlateau)
                                      for cb in callbacks):
        raise ValueError(f"trainer.lr_schedule={schedule!r} sets the learning rate itself; "
                         "remove ReduceLROnPlateau with `~callbacks.reduce_lr`")


def load_data(settings: Config) -> LoadedData:
    """Check and decode every image of data.root (and data.test_root); groups when asked."""
    data_cfg = settings.data
    if isinstance(data_cfg, DemoDataConfig):
        ensure_demo_dataset(data_cfg.root, data_cfg.images_per_class, data_cfg.source_size)
    image_size = resolve_image_size(settings.backbone.name, data_cfg.image_size)
    read = functools.partial(data_lib.read_folder, image_size=image_size,
                             on_invalid=data_cfg.on_invalid, allow_upscale=data_cfg.allow_upscale)
    class_names, pool, skipped = read(data_cfg.root)
    test = None
    if data_cfg.test_root is not None:
        test_classes, test, test_skipped = read(data_cfg.test_root)
        if test_classes != class_names:
            raise ValueError(f"data.test_root classes {list(test_classes)} differ from "
                             f"data.root classes {list(class_names)}")
        skipped += test_skipped
    if skipped:
        log.warning("Skipping %d invalid image file(s) (data.on_invalid=skip):\n  %s",
                    len(skipped), "\n  ".join(f"{s.file}: {s.reason}" for s in skipped))
    if data_cfg.group_pattern is not None:
        pool = pool.with_groups(data_cfg.group_pattern)
        test = test.with_groups(data_cfg.group_pattern) if test is not None else None
    return LoadedData(class_names, pool, test, skipped, image_size)


def common_tags(settings: Config, class_names: Sequence[str], positive: int,
                image_size: int) -> dict[str, str]:
    tags = {
        **tracking.parent_run_tags(),
        "backbone": settings.backbone.name,
        "positive_class": class_names[positive],
        "image_size": str(image_size),
        "classes": ",".join(class_names),
    }
    commit = tracking.git_commit(Path(__file__).parent)
    if commit:
        tags["git_commit"] = commit
    if (sweep := sweep_dir()) is not None:
        tags["sweep"] = sweep
    return tags


def run_tags(settings: Config, prepared: Prepared) -> dict[str, str]:
    splits = prepared.splits
    tags = {**common_tags(settings, splits.class_names, prepared.positive, prepared.image_size),
            "precision": prepared.precision,
            **{f"n_{name}": str(n) for name, n in splits.sizes().items()}}
    for name in ("train", "val", "test"):
        counts = getattr(splits, name).class_counts(splits.class_names)
        tags[f"class_counts_{name}"] = ",".join(f"{c}={n}" for c, n in counts.items())
    return tags


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> float:
    """One experiment, new or resumed (`resume=<run id>`), or a cross-validation
    (`cv.folds=K`); returns the best epoch's monitored validation metric (mean over folds),
    for sweepers."""
    if cfg.resume is not None:
        cfg = resume.restore_config(cfg, overrides, BACKUP_DIR)
    settings: Config = OmegaConf.to_object(cfg)
    tracking.check_server(settings.mlflow.tracking_uri)
    if settings.resume is not None and settings.finetune.strategy == "two_stage":
        raise ValueError("resume is not supported for finetune.strategy=two_stage; start the "
                         f"run again. Received: resume={settings.resume!r}")
    if settings.cv.folds > 1:
        return run_cross_validation(cfg, settings)
    output_dir = Path(settings.paths.output_dir)
    prepared = prepare(cfg, settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    ml = settings.mlflow
    experiment_id = tracking.ensure_experiment(ml.tracking_uri, ml.experiment_name,
                                               ml.artifact_root)
    with tracking.open_run(experiment_id, ml.run_name, run_tags(settings, prepared),
                           settings.resume) as run_id:
        print(f"MLflow run {run_id} (experiment {ml.experiment_name!r})\n"
              f"If interrupted, continue it with: python -m experiments.run resume={run_id} "
              f"mlflow.tracking_uri={ml.tracking_uri}", flush=True)
        result, evaluation = train_and_evaluate(cfg, settings, prepared, output_dir, run_id)
    print_summary(run_id, evaluation.metrics, result.best_epoch, ml.tracking_uri)
    return result.best_value


def train_and_evaluate(cfg: DictConfig, settings: Config, prepared: Prepared,
                       output_dir: Path, run_id: str
                       ) -> tuple[TrainResult, evaluate.Evaluation]:
    """Inside the active run: log the start, fit, evaluate the best checkpoint, log it."""
    if settings.resume is None:
        log_run_start(cfg, prepared, output_dir)
    result = fit(settings, prepared, output_dir, run_id)
    return result, evaluate_and_log(settings, prepared, result, output_dir, run_id)


def run_cross_validation(cfg: DictConfig, settings: Config) -> float:
    """cv.folds=K: one parent run; each fold a child run that trains on K-1 parts (validation
    carved from them) and is tested on the remaining part; the parent gets the pooled
    out-of-fold predictions, their metrics with intervals, and the folds' mean +- std."""
    folds_n, ml = settings.cv.folds, settings.mlflow
    if settings.resume is not None:
        raise ValueError("resume is not supported for cross-validation (cv.folds > 1); start "
                         f"it again. Received: resume={settings.resume!r}")
    if ml.register_as is not None:
        raise ValueError("A cross-validation trains one model per fold: register a model from "
                         "a single run instead (cv.folds=1). Received: mlflow.register_as="
                         f"{ml.register_as!r}")
    loaded = load_data(settings)
    if loaded.test is not None:
        raise ValueError("Cross-validation tests on data.root's own folds; set "
                         "data.test_root=null or cv.folds=1. Received: data.test_root="
                         f"{settings.data.test_root!r}")
    fold_splits = data_lib.make_folds(loaded.class_names, loaded.pool, folds_n,
                                      settings.data.val_fraction, settings.trainer.seed)
    output_dir = Path(settings.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.ensure_experiment(ml.tracking_uri, ml.experiment_name,
                                               ml.artifact_root)
    positive = evaluate.positive_index(loaded.class_names, settings.data.positive_class)
    tags = {**common_tags(settings, loaded.class_names, positive, loaded.image_size),
            "cv_folds": str(folds_n), "n_images": str(len(loaded.pool))}
    run_name = f"{ml.run_name or settings.backbone.name} cv{folds_n}"
    folds: list[crossval.Fold] = []
    with tracking.created_run(experiment_id, run_name, tags) as parent_id:
        print(f"MLflow parent run {parent_id}: {folds_n}-fold cross-validation "
              f"(experiment {ml.experiment_name!r})", flush=True)
        for number, splits in enumerate(fold_splits, start=1):
            prepared = build(cfg, settings, loaded, splits)
            fold_tags = {**run_tags(settings, prepared), "mlflow.parentRunId": parent_id,
                         "cv_parent": parent_id, "cv_fold": str(number)}
            fold_dir = output_dir / f"fold_{number}"
            with tracking.open_run(experiment_id, f"{run_name} fold {number}",
                                   fold_tags) as run_id:
                print(f"Fold {number}/{folds_n}: MLflow run {run_id}", flush=True)
                result, evaluation = train_and_evaluate(cfg, settings, prepared, fold_dir,
                                                        run_id)
            folds.append(crossval.Fold(number, evaluation, result.best_epoch,
                                       result.best_value))
        with tracking.open_run(None, None, {}, parent_id):
            metrics = log_cross_validation(cfg, settings, loaded, positive, folds, output_dir)
    print_summary(parent_id, metrics, None, ml.tracking_uri)
    return float(np.mean([fold.best_value for fold in folds]))


def log_cross_validation(cfg: DictConfig, settings: Config, loaded: LoadedData, positive: int,
                         folds: list[crossval.Fold], output_dir: Path) -> dict[str, float]:
    """The parent run's config, pooled metrics, out-of-fold predictions and figures."""
    log_config(cfg, output_dir)
    metrics = crossval.pooled_metrics(folds, positive, settings.eval)
    tracking.log_metrics(metrics)
    folder = output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    class_names = loaded.class_names
    plain = crossval.pooled_plain(folds)
    paths = [crossval.write_oof_predictions(folds, class_names, positive,
                                            folder / "test_predictions.csv"),
             evaluate.plot_confusion_matrix(plain, class_names, folder / "confusion_matrix.png"),
             evaluate.plot_roc_curve(plain, class_names, positive, folder / "roc_curve.png")]
    for path in paths:
        tracking.log_artifact(path)
    return metrics


def log_config(cfg: DictConfig, output_dir: Path, **extra_params: Any) -> None:
    """The resolved config (what resume restores), the config files, and every key as a
    param, with the option each group took (choice.augmentation, ...)."""
    tracking.log_text(OmegaConf.to_yaml(cfg, resolve=True), tracking.RESOLVED_CONFIG)
    log_config_files(cfg, output_dir)
    params = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
    if HydraConfig.initialized():
        params.update({f"choice.{group}": str(option) for group, option
                       in HydraConfig.get().runtime.choices.items()
                       if not group.startswith("hydra")})
    tracking.log_params({**params, **extra_params})


def log_run_start(cfg: DictConfig, prepared: Prepared, output_dir: Path) -> None:
    """What a run records before its first epoch: config (for resume), params, skipped files."""
    log_config(cfg, output_dir, n_skipped=len(prepared.skipped))
    model = prepared.model
    tracking.log_metrics({"n_parameters": model.count_params(), "n_trainable_parameters":
                          sum(int(np.prod(w.shape)) for w in model.trainable_weights)})
    if prepared.skipped:
        tracking.log_artifact(data_lib.write_invalid_table(
            prepared.skipped, output_dir / "skipped_files.csv"))


def fit(settings: Config, prepared: Prepared, output_dir: Path, run_id: str) -> TrainResult:
    trainer, splits = settings.trainer, prepared.splits
    n_classes = len(splits.class_names)
    train_ds = data_lib.training_dataset(splits.train.images, splits.train.labels, n_classes,
                                         trainer.batch_size, prepared.augment, trainer.seed)
    val_ds = data_lib.evaluation_dataset(splits.val.images, splits.val.labels, n_classes,
                                         trainer.batch_size)
    history = None
    if settings.resume is not None:
        history = tracking.metric_histories(run_id, tracking.MlflowEpochLogger.LOGGED)
    logger = tracking.MlflowEpochLogger(history["loss"] if history else ())
    return train(prepared.model, train_ds, val_ds, trainer.epochs, prepared.callbacks,
                 output_dir / BACKUP_DIR, [logger], history, trainer.verbose,
                 prepared.second_stage)


def evaluate_and_log(settings: Config, prepared: Prepared, result: TrainResult,
                     output_dir: Path, run_id: str) -> evaluate.Evaluation:
    """Evaluate the best checkpoint on the test split, once; log metrics, figures, tables."""
    splits = prepared.splits
    best_model = evaluate.load_checkpoint(result.checkpoint_path)
    folder = output_dir / "report"
    evaluation = evaluate.evaluate_model(best_model, splits, prepared.positive, settings.eval,
                                         settings.trainer.batch_size, folder)
    test_metrics = evaluation.metrics
    tracking.log_metrics({**test_metrics, "best_epoch": result.best_epoch,
                          f"best_{result.monitor}": result.best_value})
    history = {name: [v for _, v in sorted(steps.items())] for name, steps in
               tracking.metric_histories(run_id, tracking.MlflowEpochLogger.METRICS).items()}
    report = evaluate.write_report(evaluation.plain, splits.class_names, prepared.positive, history,
                                   result.best_epoch, folder)
    report.append(data_lib.write_split_table(splits, folder / "splits.csv"))
    for path in [*evaluation.files, *report]:  # report/gradcam/x.png -> gradcam/x.png
        subfolder = path.parent.relative_to(folder).as_posix()
        tracking.log_artifact(path, None if subfolder == "." else subfolder)
    log_best_model(settings, prepared, result, best_model, evaluation)
    return evaluation


def log_best_model(settings: Config, prepared: Prepared, result: TrainResult,
                   best_model: keras.Model, evaluation: evaluate.Evaluation) -> None:
    """The best checkpoint with model_info.json, as an MLflow model, registered if asked.
    With stain normalisation the logged model takes raw images: the fitted normaliser is
    put in front of the checkpoint (and the checkpoint file rewritten with it)."""
    if prepared.stain is not None:
        best_model = with_stain_normalization(best_model, prepared.stain, prepared.image_size)
        best_model.save(result.checkpoint_path)
    info = model_info(settings, prepared, evaluation)
    info_path = result.checkpoint_path.with_name(tracking.MODEL_INFO)
    info_path.write_text(json.dumps(info, indent=2))
    tracking.log_artifact(result.checkpoint_path, "checkpoints")
    tracking.log_artifact(info_path, "checkpoints")
    model_uri = tracking.log_model(best_model, info)
    tracking.set_tags({"model_uri": model_uri, "checkpoint_monitor": result.monitor,
                       "checkpoint_mode": "max" if result.higher_is_better else "min"})
    if settings.mlflow.register_as and not tracking.parent_run_tags():  # sweeps: best job only
        version = tracking.register_model(model_uri, settings.mlflow.register_as)
        print(f"Registered models:/{settings.mlflow.register_as}/{version}")


def with_stain_normalization(model: keras.Model, layer: stain.StainNormalization,
                             image_size: int) -> keras.Model:
    """raw RGB -> fitted stain normalisation -> the trained classifier."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    normalized = stain.StainNormalization.from_config(layer.get_config())(inputs)
    return keras.Model(inputs, model(normalized), name=model.name)


def model_info(settings: Config, prepared: Prepared,
               evaluation: evaluate.Evaluation) -> dict[str, Any]:
    """What `experiments.predict` needs besides the model file (preprocessing and stain
    normalisation are inside it): classes, input size, and the evaluation's choices made on
    validation (TTA, temperature, decision threshold on p(positive class))."""
    class_names = prepared.splits.class_names
    return {"class_names": list(class_names), "image_size": prepared.image_size,
            "backbone": settings.backbone.name,
            "positive_class": class_names[prepared.positive],
            "tta": settings.eval.tta,
            "temperature": evaluation.metrics.get("temperature", 1.0),
            "threshold": evaluation.threshold}


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


SUMMARY_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1", "loss")


def print_summary(run_id: str, metrics: dict[str, float], best_epoch: int | None,
                  tracking_uri: str) -> None:
    """The headline test metrics with their intervals; every metric is in MLflow."""
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
    print(f"Open the MLflow UI: {tracking.ui_command(tracking_uri)}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds `with` blocks: the MLflow run ends KILLED


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return run(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
