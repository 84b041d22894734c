"""`cv.refit=true`: after the folds, one final model trained on every image (scikit-learn's
`refit` convention) for the folds' median best epoch, with no validation split, no checkpoint
selection and no early stopping. It is logged as a child run (`<name> refit`) with its training
curves; the cross-validation parent logs its model. Its performance estimate is the
cross-validation's: it has no test split of its own.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import keras
import numpy as np

from experiments.config.instantiate import Components
from experiments.config.schema import Config
from experiments.data import loading, pipeline
from experiments.data import splits as splits_lib
from experiments.evaluation import metrics
from experiments.orchestration import interrupt
from experiments.serving import export
from experiments.tracking import epoch_logger, records, run_records, store
from experiments.training import probe
from experiments.training.build import (
    compile_for_strategy,
    new_model,
    normalize_stains,
    ood_reference_coverage,
)
from experiments.training.frozen import image_features, ood_features, probe_views
from experiments.training.loop import train_without_validation

log = logging.getLogger(__name__)


def everything(loaded: loading.LoadedData) -> splits_lib.Splits:
    """Every image in the training split; validation and test empty."""
    pool = loaded.pool
    empty = pool.subset([])
    return splits_lib.Splits(loaded.class_names, pool, empty, empty)


def train_refit(settings: Config, components: Components, loaded: loading.LoadedData, epochs: int,
                experiment_id: str, parent_id: str, run_name: str,
                output_dir: Path) -> tuple[keras.Model, np.ndarray | None]:
    """Train the refit model in its own child run; return the model users get (stain
    normalisation and patch grid in front, as for every run) and, for a linear probe that
    fits a referral, the features of every image its out-of-distribution reference is
    fitted on (from the feature cache: `frozen.ood_features`)."""
    settings = dataclasses.replace(
        settings, trainer=dataclasses.replace(settings.trainer, epochs=epochs))
    splits, stain_layer = normalize_stains(settings.data.stain_normalization, everything(loaded))
    n_classes = len(splits.class_names)
    model, precision = new_model(settings, n_classes, loaded.image_size)
    second_stage = compile_for_strategy(settings, components, model, n_classes,
                                        len(splits.train))
    trainer = settings.trainer
    patch_size = settings.data.patch_size
    augment = components.augmentation(trainer.seed)
    positive = metrics.positive_index(splits.class_names, settings.data.positive_class)
    tags = {**run_records.common_tags(settings.backbone.name, settings.backbone.weights,
                                      splits.class_names, positive,
                                      loaded.image_size),
            "mlflow.parentRunId": parent_id, "cv_parent": parent_id, "cv_refit": "true",
            "precision": precision, "n_train": str(len(splits.train)), "n_val": "0",
            "n_test": "0"}
    output_dir.mkdir(parents=True, exist_ok=True)
    plain = cached = stain = None
    with store.open_run(experiment_id, f"{run_name} refit", tags):
        run_records.log_config(components, output_dir, settings.backbone.name,
                               settings.backbone.weights, refit_epochs=epochs)
        records.log_metrics({"n_parameters": model.count_params()})
        if settings.finetune.strategy == "linear_probe":  # a regression: no epochs
            log.info(f"Refit the linear probe on all {len(splits.train)} images")
            stain = None if stain_layer is None else stain_layer.target
            cached = image_features(settings, model, precision, stain,
                                    splits.train, probe_views(augment, settings.eval.tta))
            records.log_metrics({"probe_C": refit_probe(settings, model, cached,
                                                        splits.train)})
        else:
            log.info(f"Refit on all {len(splits.train)} images for {epochs} epochs")
            train_ds = pipeline.training_dataset(splits.train.images, splits.train.labels,
                                                 n_classes, trainer.batch_size, augment,
                                                 trainer.seed, patch_size)
            train_without_validation(model, train_ds, epochs,
                                     [epoch_logger.MlflowEpochLogger(),
                                      interrupt.StopWhenSignalled()], trainer.verbose,
                                     second_stage)
        records.log_artifact(splits_lib.write_split_table(splits, output_dir / "splits.csv"))
    served = export.deliverable(model, loaded.image_size, patch_size, stain_layer)
    if cached is not None and ood_reference_coverage(settings) is not None:
        plain = ood_features(settings, served, precision, stain, splits.train, cached)
    return served, plain


def refit_probe(settings: Config, model: keras.Model, cached: np.ndarray,
                images: splits_lib.Split) -> float:
    """finetune=linear_probe: the regression on every image's cached features (the folds
    computed them), C chosen by cross-validation on them; returns C."""
    return probe.refit(model, cached, np.asarray(images.labels), settings.trainer.seed,
                       strata=images.strata(), groups=images.groups)
