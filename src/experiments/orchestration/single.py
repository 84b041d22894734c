"""One training job: load and check the images, split them, train with model selection on the
validation split, evaluate the chosen model once on the test split, and log all of it (config,
per-epoch curves, test metrics, figures, tables, the model) into one MLflow run. An interrupted
job continues in the same run (`resume=<run id>`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from experiments.config.instantiate import Components
from experiments.config.schema import Config
from experiments.data import folders, patches, pipeline
from experiments.data import splits as splits_lib
from experiments.data.cohorts import scan_cohorts
from experiments.data.loading import LoadedData, load_data, split
from experiments.evaluation import evaluate
from experiments.evaluation import figures as figures_lib
from experiments.models import features
from experiments.models.backbones import input_size
from experiments.orchestration import interrupt
from experiments.orchestration.external import (
    evaluate_cohorts,
    fit_ood,
    referral_scores,
    test_referral,
)
from experiments.orchestration.resume import BACKUP_DIR, TRAINING_RECORD, run_lock
from experiments.serving import export, inference
from experiments.tracking import epoch_logger, store
from experiments.tracking import records as records_lib
from experiments.tracking.run_records import MODEL_DIR, common_tags, log_config, log_run_model
from experiments.training import distribute
from experiments.training.build import Prepared, build, check_training_split
from experiments.training.callbacks import TrainResult
from experiments.training.finetune import SecondStage
from experiments.training.frozen import (
    feature_views,
    head_stage,
    head_training,
    logged_split_features,
    referral_features,
    split_features,
)
from experiments.training.loop import TrainPlan, train
from experiments.training.state import read_training_record

log = logging.getLogger(__name__)


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
        loaded = load_run_data(settings)
    with timed(phases, "build"):
        cohorts = scan_cohorts(settings.eval.cohorts, loaded.class_names)
        splits = split(settings.data, loaded, settings.trainer.seed)
        check_training_split(settings, splits.train)
        prepared = build(settings, components, splits, loaded.skipped, loaded.image_size,
                         loaded.input_mpp)

    output_dir = Path(settings.paths.output_dir)
    ml = settings.mlflow
    with run_lock(output_dir):
        with timed(phases, "open_store"):
            experiment_id = store.ensure_experiment(ml.tracking_uri, ml.experiment_name,
                                                    ml.artifact_root)
        with store.open_run(experiment_id, ml.run_name, run_tags(settings, prepared),
                            settings.resume) as run_id:
            if settings.trainer.distribute != "multi_worker":  # multi_worker: no resume
                log.info(f"MLflow run {run_id} (experiment {ml.experiment_name!r})\n"
                         f"If interrupted, continue it with: python -m experiments.run "
                         f"resume={run_id} mlflow.tracking_uri={ml.tracking_uri}")
            elif distribute.is_chief(settings.trainer.distribute):
                log.info(f"MLflow run {run_id} (experiment {ml.experiment_name!r})")
            result, evaluation = train_and_evaluate(settings, components, prepared,
                                                    output_dir, run_id, phases)
            with timed(phases, "external"):
                evaluation.metrics.update(evaluate_cohorts(
                    cohorts, output_dir / MODEL_DIR, settings.eval,
                    settings.trainer.batch_size, output_dir / "external", run_id))
            if cohorts:
                records_lib.log_new_metrics(run_id, {"seconds_external": phases["external"]})
    return JobResult(run_id, result, evaluation)


def load_run_data(settings: Config) -> LoadedData:
    """The run's images, decoded at the backbone's input size (`data.loading.load_data`)."""
    data_cfg = settings.data
    return load_data(data_cfg, input_size(settings.backbone.name, data_cfg.image_size,
                                          data_cfg.patch_size),
                     Path(settings.paths.output_dir), Path(settings.paths.cache_dir))


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
                       output_dir: Path, run_id: str, phases: dict[str, float] | None = None,
                       log_model: bool = True) -> tuple[TrainResult, evaluate.Evaluation]:
    """Inside the active run: log the start, fit, evaluate the chosen checkpoint, log it (and
    its model, unless `log_model` is false: a fold of cv.fold_models=false). A resumed run
    whose training had finished only evaluates. Logs where the time went (seconds_<phase>)."""
    phases = {} if phases is None else phases
    result = read_training_record(output_dir / TRAINING_RECORD) if settings.resume else None
    if result is not None:
        log.info(f"Training had finished (best epoch {result.best_epoch}); evaluating its "
                 "checkpoint")
    else:
        if settings.resume is None:
            with timed(phases, "log_start"):
                log_run_start(settings, components, prepared, output_dir)
        with timed(phases, "train"):
            result = fit(settings, prepared, output_dir, run_id)
        phases["backup"] = result.backup_seconds
    evaluation = evaluate_and_log(settings, prepared, result, output_dir, run_id, phases,
                                  log_model)
    records_lib.log_new_metrics(run_id, {f"seconds_{k}": v for k, v in phases.items()})
    return result, evaluation


def run_tags(settings: Config, prepared: Prepared) -> dict[str, str]:
    splits = prepared.splits
    tags = {**common_tags(settings.backbone.name, settings.backbone.weights, splits.class_names,
                          prepared.positive, prepared.image_size),
            "precision": prepared.precision, "splits_sha256": splits_lib.splits_sha256(splits),
            **{f"n_{name}": str(n) for name, n in splits.sizes().items()}}
    for name in ("train", "val", "test"):
        counts = getattr(splits, name).class_counts(splits.class_names)
        tags[f"class_counts_{name}"] = ",".join(f"{c}={n}" for c, n in counts.items())
    return tags


def log_run_start(settings: Config, components: Components, prepared: Prepared,
                  output_dir: Path) -> None:
    """What a run records before its first epoch: config (for resume), params, skipped files."""
    log_config(components, output_dir, settings.backbone.name, settings.backbone.weights,
               n_skipped=len(prepared.skipped))
    model = prepared.model
    records_lib.log_metrics({"n_parameters": model.count_params(), "n_trainable_parameters":
                             sum(int(np.prod(w.shape)) for w in model.trainable_weights)})
    if prepared.skipped:
        records_lib.log_artifact(folders.write_invalid_table(
            prepared.skipped, output_dir / "skipped_files.csv"))


def fit(settings: Config, prepared: Prepared, output_dir: Path, run_id: str) -> TrainResult:
    """Train: on cached frozen-backbone features when possible, else on images."""
    views = feature_views(settings, prepared, say_why=True)
    if views is not None:
        return fit_on_features(settings, prepared, output_dir, run_id, views)
    return fit_on_images(settings, prepared, output_dir, run_id,
                         head_stage(settings, prepared))


def fit_on_features(settings: Config, prepared: Prepared, output_dir: Path, run_id: str,
                    views: int) -> TrainResult:
    """finetune=frozen: the head trains on cached features (same batches, same views as the
    image path); the checkpoint is the full classifier. finetune=linear_probe: logistic
    regression and k-NN on the features (`experiments.probe`)."""
    cached = logged_split_features(settings, prepared, views)
    trainer = settings.trainer
    if settings.finetune.strategy == "linear_probe":
        from experiments.training import probe

        return probe.fit(prepared, cached, settings.eval, trainer.seed)
    head, train_ds, val_ds = head_training(settings, prepared, cached,
                                           features.training_views(prepared.augment)[0])
    return train(head, train_ds, val_ds, train_plan(settings, prepared, output_dir, run_id),
                 checkpoint_model=prepared.model)


def fit_on_images(settings: Config, prepared: Prepared, output_dir: Path, run_id: str,
                  head_stage: tuple[keras.Model, object, object] | None = None
                  ) -> TrainResult:
    """Train on the images (two_stage's head-only stage on cached features when
    `head_stage` is given); per-epoch metrics go to the run `run_id`."""
    trainer, splits = settings.trainer, prepared.splits
    n_classes = len(splits.class_names)
    patch_size = settings.data.patch_size
    train_ds = pipeline.training_dataset(splits.train.images, splits.train.labels, n_classes,
                                         trainer.batch_size, prepared.augment, trainer.seed,
                                         patch_size)
    val_images, val_labels = splits.val.images, np.asarray(splits.val.labels)
    if patch_size is not None:  # validation sees every crop of the grid the model averages
        val_images = patches.grid_crops(np.asarray(val_images), patch_size)
        val_labels = np.repeat(val_labels, len(val_images) // len(splits.val))
    val_ds = pipeline.evaluation_dataset(val_images, val_labels, n_classes, trainer.batch_size)
    plan = train_plan(settings, prepared, output_dir, run_id, prepared.second_stage)
    return train(prepared.model, train_ds, val_ds, plan, head_stage=head_stage)


def train_plan(settings: Config, prepared: Prepared, output_dir: Path, run_id: str,
               second_stage: SecondStage | None = None) -> TrainPlan:
    """The run's training: its epochs and callbacks, its state under `output_dir`, per-epoch
    metrics logged to `run_id` (each epoch once: a resumed run knows what was logged)."""
    history = None
    if settings.resume is not None:
        history = records_lib.metric_histories(run_id, epoch_logger.MlflowEpochLogger.LOGGED)
    logger = epoch_logger.MlflowEpochLogger(history["loss"] if history else ())
    return TrainPlan(settings.trainer.epochs, prepared.callbacks, output_dir / BACKUP_DIR,
                     [logger, interrupt.StopWhenSignalled()], history,
                     settings.trainer.verbose, second_stage,
                     output_dir / TRAINING_RECORD)


def evaluate_and_log(settings: Config, prepared: Prepared, result: TrainResult,
                     output_dir: Path, run_id: str,
                     phases: dict[str, float] | None = None,
                     log_model: bool = True) -> evaluate.Evaluation:
    """Evaluate the chosen checkpoint on the test split, once; log metrics (each once, also
    when a resumed run repeats this step), figures, tables and the run's model (unless
    `log_model` is false)."""
    splits = prepared.splits
    log.info(f"Evaluating the checkpoint of epoch {result.best_epoch} on the test split")
    phases = {} if phases is None else phases
    timer = functools.partial(timed, phases)
    network = inference.in_memory(result.model) if result.model is not None \
        else inference.load_model(result.checkpoint_path)
    patch_size = settings.data.patch_size
    model = export.deliverable(network, prepared.image_size, patch_size, None)
    folder = output_dir / "report"
    predict = None
    cached: dict[str, np.ndarray] = {}
    if (views := feature_views(settings, prepared)) is not None:  # the head on the cache
        cached, head = split_features(settings, prepared, views), features.head_model(network)

        def predict(name: str, tta: str) -> np.ndarray:
            return features.head_probabilities(head, cached[name], tta)
    with timer("evaluate"):
        evaluation = evaluate.evaluate_model(model, splits, prepared.positive, settings.eval,
                                             settings.trainer.batch_size, folder, predict)
    records_lib.log_new_metrics(run_id, {**evaluation.metrics, "best_epoch": result.best_epoch,
                                         f"best_{result.monitor}": result.best_value})
    with timer("report"):
        logged = records_lib.metric_histories(run_id, epoch_logger.MlflowEpochLogger.METRICS)
        history = {name: [v for _, v in sorted(steps.items())]
                   for name, steps in logged.items()}
        report = figures_lib.write_report(evaluation.plain, splits.class_names, prepared.positive,
                                          history, result.best_epoch, folder)
        report.append(splits_lib.write_split_table(splits, folder / "splits.csv"))
        for path in [*evaluation.files, *report]:  # report/gradcam/x.png -> gradcam/x.png
            subfolder = path.parent.relative_to(folder).as_posix()
            records_lib.log_artifact(path, None if subfolder == "." else subfolder)
    served = export.deliverable(network, prepared.image_size, patch_size, prepared.stain)
    with timer("ood"):
        plain = referral_features(settings, prepared, served, cached)
        ood = fit_ood(settings, served, splits.train.images, plain.get("train"))
        scores = None if ood is None else referral_scores(served, ood, splits.test.images,
                                                          plain.get("test"))
        if ood is not None and scores is not None:
            evaluation.referred = ood.refer(scores)
            records_lib.log_new_metrics(run_id, test_referral(ood, evaluation, scores,
                                                              prepared.positive))
    if not log_model:
        return evaluation
    info = export.model_info(
        splits.class_names, prepared.image_size, prepared.positive, settings.eval.tta,
        evaluation.metrics.get("temperature", 1.0), evaluation.threshold,
        backbone=settings.backbone.name, kind="single", patch_size=patch_size,
        resize=settings.data.resize, input_mpp=prepared.input_mpp,
        stain_normalization=settings.data.stain_normalization)
    with timer("log_model"):
        log_run_model(served, info, output_dir / MODEL_DIR, settings.mlflow.register_as,
                      {"checkpoint_monitor": result.monitor,
                       "checkpoint_mode": "max" if result.higher_is_better else "min"}, ood)
    return evaluation
