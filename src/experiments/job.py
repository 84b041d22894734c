"""One training job: load and check the images, split them, train with model selection on the
validation split, evaluate the chosen model once on the test split, and log all of it (config,
per-epoch curves, test metrics, figures, tables, the model) into one MLflow run. An interrupted
job continues in the same run (`resume=<run id>`).
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from experiments import data as data_lib
from experiments import distribute, evaluate, export, features, inference, patches, tracking
from experiments.backbones import resolve_image_size
from experiments.build import Components, Prepared, build
from experiments.demo import ensure_demo_dataset
from experiments.errors import DataError
from experiments.resume import BACKUP_DIR, TRAINING_RECORD, run_lock
from experiments.schema import Config, DemoDataConfig
from experiments.train import TrainResult, read_training_record, train

log = logging.getLogger(__name__)
MODEL_DIR = "model"  # <output_dir>/model: the run's model.keras and model_info.json


@dataclass(frozen=True)
class LoadedData:
    """Every image of data.root (and data.test_root), decoded and checked, not yet split."""

    class_names: tuple[str, ...]
    pool: data_lib.Split
    test: data_lib.Split | None  # data.test_root
    skipped: list[data_lib.Invalid]
    image_size: int


def load_data(settings: Config) -> LoadedData:
    """Check and decode every image of data.root (and data.test_root); groups when asked."""
    data_cfg = settings.data
    if isinstance(data_cfg, DemoDataConfig):
        ensure_demo_dataset(data_cfg.root, data_cfg.images_per_class, data_cfg.source_size)
    image_size = resolve_image_size(settings.backbone.name, data_cfg.image_size)
    if data_cfg.patch_size is not None:  # the network's input; the backbone's minimum applies
        resolve_image_size(settings.backbone.name, data_cfg.patch_size)
    read = functools.partial(data_lib.read_folder, image_size=image_size,
                             on_invalid=data_cfg.on_invalid, allow_upscale=data_cfg.allow_upscale,
                             report_dir=Path(settings.paths.output_dir),
                             include_pattern=data_cfg.include_pattern, cache=data_cfg.cache,
                             cache_folder=Path(settings.paths.cache_dir) / "images")
    class_names, pool, skipped = read(data_cfg.root)
    test = None
    if data_cfg.test_root is not None:
        test_classes, test, test_skipped = read(data_cfg.test_root)
        if test_classes != class_names:
            raise DataError(f"data.test_root classes {list(test_classes)} differ from "
                            f"data.root classes {list(class_names)}")
        skipped += test_skipped
    if skipped:
        log.warning("Skipping %d invalid image file(s) (data.on_invalid=skip; all of them in "
                    "the run's skipped_files.csv):\n%s", len(skipped),
                    data_lib.summarize_invalid(skipped))
    if data_cfg.group_pattern is not None:
        pool = pool.with_groups(data_cfg.group_pattern)
        test = test.with_groups(data_cfg.group_pattern) if test is not None else None
    return LoadedData(class_names, pool, test, skipped, image_size)


def split(settings: Config, loaded: LoadedData) -> data_lib.Splits:
    data_cfg = settings.data
    return data_lib.make_splits(loaded.class_names, loaded.pool, loaded.test,
                                data_cfg.val_fraction, data_cfg.test_fraction,
                                split_seed(settings))


def split_seed(settings: Config) -> int:
    """The seed that splits the images: data.split_seed, else trainer.seed."""
    data_cfg = settings.data
    return settings.trainer.seed if data_cfg.split_seed is None else data_cfg.split_seed


def sweep_dir() -> str | None:
    """The multirun's sweep folder (tags every job's run), or None outside a sweep."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def common_tags(settings: Config, class_names: Sequence[str], positive: int,
                image_size: int) -> dict[str, str]:
    tags = {
        **tracking.parent_run_tags(),
        "backbone": settings.backbone.name,
        "positive_class": class_names[positive],
        "image_size": str(image_size),
        "classes": ",".join(class_names),
        "threads": str(tf.config.threading.get_intra_op_parallelism_threads()),
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


@dataclass(frozen=True)
class JobResult:
    run_id: str
    training: TrainResult
    evaluation: evaluate.Evaluation


def run_single(settings: Config, components: Components) -> JobResult:
    """One experiment, new or resumed: everything is checked before the MLflow run opens; the
    run's output folder is locked for as long as this process lives."""
    phases: dict[str, float] = {}
    with timed(phases, "load_data"):
        loaded = load_data(settings)
    with timed(phases, "build"):
        prepared = build(settings, components, split(settings, loaded), loaded.skipped,
                         loaded.image_size)

    output_dir = Path(settings.paths.output_dir)
    ml = settings.mlflow
    with run_lock(output_dir):
        with timed(phases, "open_store"):
            experiment_id = tracking.ensure_experiment(ml.tracking_uri, ml.experiment_name,
                                                       ml.artifact_root)
        with tracking.open_run(experiment_id, ml.run_name, run_tags(settings, prepared),
                               settings.resume) as run_id:
            if settings.trainer.distribute != "multi_worker":  # multi_worker: no resume
                print(f"MLflow run {run_id} (experiment {ml.experiment_name!r})\n"
                      f"If interrupted, continue it with: python -m experiments.run "
                      f"resume={run_id} mlflow.tracking_uri={ml.tracking_uri}", flush=True)
            elif distribute.is_chief(settings.trainer.distribute):
                print(f"MLflow run {run_id} (experiment {ml.experiment_name!r})", flush=True)
            result, evaluation = train_and_evaluate(settings, components, prepared,
                                                    output_dir, run_id, phases)
    return JobResult(run_id, result, evaluation)


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to phases[name] (logged as seconds_<name>: where a run's
    time goes)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def train_and_evaluate(settings: Config, components: Components, prepared: Prepared,
                       output_dir: Path, run_id: str, phases: dict[str, float] | None = None
                       ) -> tuple[TrainResult, evaluate.Evaluation]:
    """Inside the active run: log the start, fit, evaluate the chosen checkpoint, log it. A
    resumed run whose training had finished only evaluates. Logs where the time went
    (seconds_<phase>)."""
    phases = {} if phases is None else phases
    result = read_training_record(output_dir / TRAINING_RECORD) if settings.resume else None
    if result is not None:
        print(f"Training had finished (best epoch {result.best_epoch}); evaluating its "
              "checkpoint", flush=True)
    else:
        if settings.resume is None:
            with timed(phases, "log_start"):
                log_run_start(components, prepared, output_dir)
        with timed(phases, "train"):
            result = fit(settings, prepared, output_dir, run_id)
        phases["backup"] = result.backup_seconds
    evaluation = evaluate_and_log(settings, prepared, result, output_dir, run_id, phases)
    tracking.log_new_metrics(run_id, {f"seconds_{k}": v for k, v in phases.items()})
    return result, evaluation


def log_config(components: Components, output_dir: Path, **extra_params: object) -> None:
    """The resolved config (what resume restores), the config files, every key as a param."""
    tracking.log_text(components.config_yaml, tracking.RESOLVED_CONFIG)
    hydra_dir = output_dir / ".hydra"
    if hydra_dir.is_dir():
        tracking.log_artifacts(hydra_dir, ".hydra")
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "config.yaml"
            path.write_text(components.config_yaml)
            tracking.log_artifact(path, ".hydra")
    tracking.log_params({**components.params, **extra_params})


def log_run_start(components: Components, prepared: Prepared, output_dir: Path) -> None:
    """What a run records before its first epoch: config (for resume), params, skipped files."""
    log_config(components, output_dir, n_skipped=len(prepared.skipped))
    model = prepared.model
    tracking.log_metrics({"n_parameters": model.count_params(), "n_trainable_parameters":
                          sum(int(np.prod(w.shape)) for w in model.trainable_weights)})
    if prepared.skipped:
        tracking.log_artifact(data_lib.write_invalid_table(
            prepared.skipped, output_dir / "skipped_files.csv"))


def feature_views(settings: Config, prepared: Prepared, say_why: bool = False) -> int | None:
    """How many views per image to cache for the frozen-feature fast path (1, or 8 for the
    dihedral views of augmentation or TTA), or None when this run trains on images."""
    if settings.finetune.strategy not in ("frozen", "linear_probe"):
        return None
    views, why = features.training_views(prepared.augment)
    if settings.finetune.strategy == "linear_probe":
        views = views or 1  # the probe ignores random augmentation; dihedral views are data
    elif views is not None and (why := images_only(settings)):
        views = None
    if views is None:
        if say_why:
            print(f"finetune=frozen trains on images, not on cached features: {why}",
                  flush=True)
        return None
    return 8 if views == 8 or settings.eval.tta == "dihedral" else 1


def images_only(settings: Config) -> str:
    """Why this run cannot train its head on cached features ("" when it can)."""
    if settings.data.patch_size is not None:
        return "native patches (data.patch_size) are random crops"
    if settings.trainer.distribute is not None:
        return (f"trainer.distribute={settings.trainer.distribute} splits image batches "
                "across devices; the cached-feature head trains on one")
    return ""


def logged_split_features(settings: Config, prepared: Prepared, views: int
                          ) -> dict[str, np.ndarray]:
    """`split_features`, logging how many were computed and how many reused."""
    before = dict(features.COUNTS)
    cached = split_features(settings, prepared, views)
    tracking.log_metrics({"features_computed": features.COUNTS["computed"] - before["computed"],
                          "features_reused": sum(features.COUNTS[k] - before[k]
                                                 for k in ("memory", "disk"))})
    return cached


def split_features(settings: Config, prepared: Prepared, views: int) -> dict[str, np.ndarray]:
    """(n, views, C) frozen-backbone features of the train, val and test images, from the
    cache when it holds them (memory, then `<paths.cache_dir>/features`)."""
    backbone = settings.backbone
    key = features.model_key(backbone.name, backbone.weights, settings.trainer.seed,
                             settings.data.patch_size or prepared.image_size,
                             prepared.precision,
                             None if prepared.stain is None else prepared.stain.target)
    cache = features.FeatureCache(key, Path(settings.paths.cache_dir) / "features")
    compute = functools.partial(features.compute_features,
                                features.feature_model(prepared.model))
    return {name: cache.get(getattr(prepared.splits, name).files,
                            getattr(prepared.splits, name).images, views, compute)
            for name in ("train", "val", "test")}


def fit(settings: Config, prepared: Prepared, output_dir: Path, run_id: str) -> TrainResult:
    """Train: on cached frozen-backbone features when possible, else on images."""
    views = feature_views(settings, prepared, say_why=True)
    if views is not None:
        return fit_on_features(settings, prepared, output_dir, run_id, views)
    return fit_on_images(settings, prepared, output_dir, run_id,
                         head_stage(settings, prepared))


def head_stage(settings: Config, prepared: Prepared
               ) -> tuple[keras.Model, object, object] | None:
    """two_stage's head-only first stage on cached features (the backbone is frozen then),
    when the augmentation allows; None to train both stages on images."""
    stage = prepared.second_stage
    if settings.finetune.strategy != "two_stage" or stage is None:
        return None
    train_views, why = features.training_views(prepared.augment)
    why = why or images_only(settings)
    if train_views is None or why:
        print(f"two_stage's head-only stage trains on images: {why}", flush=True)
        return None
    cached = logged_split_features(settings, prepared, train_views)
    return head_training(settings, prepared, cached, train_views)


def head_training(settings: Config, prepared: Prepared, cached: dict[str, np.ndarray],
                  train_views: int) -> tuple[keras.Model, object, object]:
    """The classifier's head as a model of its own, compiled with the classifier's optimizer
    and loss, and its training and validation batches of cached features."""
    splits, trainer, classifier = prepared.splits, settings.trainer, prepared.model
    n_classes = len(splits.class_names)
    head = features.head_model(classifier)
    head.compile(optimizer=classifier.optimizer, loss=classifier.loss,
                 metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    train_ds = features.head_dataset(cached["train"], splits.train.labels, n_classes,
                                     trainer.batch_size, trainer.seed,
                                     draw_views=train_views == 8)
    val_ds = features.evaluation_batches(cached["val"], splits.val.labels, n_classes,
                                         trainer.batch_size)
    return head, train_ds, val_ds


def fit_on_features(settings: Config, prepared: Prepared, output_dir: Path, run_id: str,
                    views: int) -> TrainResult:
    """finetune=frozen: the head trains on cached features (same batches, same views as the
    image path); the checkpoint is the full classifier. finetune=linear_probe: logistic
    regression and k-NN on the features (`experiments.probe`)."""
    cached = logged_split_features(settings, prepared, views)
    trainer = settings.trainer
    if settings.finetune.strategy == "linear_probe":
        from experiments import probe

        return probe.fit(prepared, cached, settings.eval, output_dir, trainer.seed)
    head, train_ds, val_ds = head_training(settings, prepared, cached,
                                           features.training_views(prepared.augment)[0])
    history = None
    if settings.resume is not None:
        history = tracking.metric_histories(run_id, tracking.MlflowEpochLogger.LOGGED)
    logger = tracking.MlflowEpochLogger(history["loss"] if history else ())
    return train(head, train_ds, val_ds, trainer.epochs, prepared.callbacks,
                 output_dir / BACKUP_DIR, [logger], history, trainer.verbose, None,
                 output_dir / TRAINING_RECORD, checkpoint_model=prepared.model)


def fit_on_images(settings: Config, prepared: Prepared, output_dir: Path, run_id: str,
                  head_stage: tuple[keras.Model, object, object] | None = None
                  ) -> TrainResult:
    """Train on the images (two_stage's head-only stage on cached features when
    `head_stage` is given); per-epoch metrics go to the run `run_id`."""
    trainer, splits = settings.trainer, prepared.splits
    n_classes = len(splits.class_names)
    patch_size = settings.data.patch_size
    train_ds = data_lib.training_dataset(splits.train.images, splits.train.labels, n_classes,
                                         trainer.batch_size, prepared.augment, trainer.seed,
                                         patch_size)
    val_images, val_labels = splits.val.images, splits.val.labels
    if patch_size is not None:  # validation sees every crop of the grid the model averages
        val_images = patches.grid_crops(np.asarray(val_images), patch_size)
        val_labels = np.repeat(val_labels, len(val_images) // len(splits.val))
    val_ds = data_lib.evaluation_dataset(val_images, val_labels, n_classes, trainer.batch_size)
    history = None
    if settings.resume is not None:
        history = tracking.metric_histories(run_id, tracking.MlflowEpochLogger.LOGGED)
    logger = tracking.MlflowEpochLogger(history["loss"] if history else ())
    return train(prepared.model, train_ds, val_ds, trainer.epochs, prepared.callbacks,
                 output_dir / BACKUP_DIR, [logger], history, trainer.verbose,
                 prepared.second_stage, output_dir / TRAINING_RECORD, head_stage=head_stage)


def evaluate_and_log(settings: Config, prepared: Prepared, result: TrainResult,
                     output_dir: Path, run_id: str,
                     phases: dict[str, float] | None = None) -> evaluate.Evaluation:
    """Evaluate the chosen checkpoint on the test split, once; log metrics (each once, also
    when a resumed run repeats this step), figures, tables and the run's model."""
    splits = prepared.splits
    print(f"Evaluating the checkpoint of epoch {result.best_epoch} on the test split",
          flush=True)
    phases = {} if phases is None else phases
    timer = functools.partial(timed, phases)
    network = inference.load_model(result.checkpoint_path)
    patch_size = settings.data.patch_size
    model = export.deliverable(network, prepared.image_size, patch_size, None)
    folder = output_dir / "report"
    predict = None
    if (views := feature_views(settings, prepared)) is not None:  # the head on the cache
        cached, head = split_features(settings, prepared, views), features.head_model(network)

        def predict(name: str, tta: str) -> np.ndarray:
            return features.head_probabilities(head, cached[name], tta)
    with timer("evaluate"):
        evaluation = evaluate.evaluate_model(model, splits, prepared.positive, settings.eval,
                                             settings.trainer.batch_size, folder, predict)
    tracking.log_new_metrics(run_id, {**evaluation.metrics, "best_epoch": result.best_epoch,
                                      f"best_{result.monitor}": result.best_value})
    with timer("report"):
        history = {name: [v for _, v in sorted(steps.items())] for name, steps in
                   tracking.metric_histories(run_id, tracking.MlflowEpochLogger.METRICS).items()}
        report = evaluate.write_report(evaluation.plain, splits.class_names, prepared.positive,
                                       history, result.best_epoch, folder)
        report.append(data_lib.write_split_table(splits, folder / "splits.csv"))
        for path in [*evaluation.files, *report]:  # report/gradcam/x.png -> gradcam/x.png
            subfolder = path.parent.relative_to(folder).as_posix()
            tracking.log_artifact(path, None if subfolder == "." else subfolder)
    served = export.deliverable(network, prepared.image_size, patch_size, prepared.stain)
    info = export.model_info(
        splits.class_names, prepared.image_size, prepared.positive, settings.eval.tta,
        evaluation.metrics.get("temperature", 1.0), evaluation.threshold,
        backbone=settings.backbone.name, kind="single", patch_size=patch_size,
        stain_normalization=settings.data.stain_normalization)
    with timer("log_model"):
        log_run_model(served, info, output_dir / MODEL_DIR, settings.mlflow.register_as,
                      {"checkpoint_monitor": result.monitor,
                       "checkpoint_mode": "max" if result.higher_is_better else "min"})
    return evaluation


def log_run_model(model: object, info: dict, model_dir: Path, register_as: str | None,
                  tags: dict[str, str] | None = None) -> str:
    """Save the run's model with its info, log it as the run's MLflow model (tag
    `model_uri`), register it when asked (in a sweep the sweep registers its best job)."""
    inference.save_model(model, info, model_dir)
    model_uri = tracking.log_model(model_dir, info)
    tracking.set_tags({"model_uri": model_uri, **(tags or {})})
    if register_as and not tracking.parent_run_tags():
        version = tracking.register_model(model_uri, register_as)
        print(f"Registered models:/{register_as}/{version}")
    return model_uri
