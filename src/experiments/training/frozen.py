"""The frozen-backbone fast path of a training: which runs can train their head on cached pooled
features (and with how many dihedral views), the features of each split, the head's batches.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from experiments.config.choices import views_to_cache
from experiments.config.schema import Config
from experiments.data.splits import Split
from experiments.models import features
from experiments.serving.inference import feature_extractor
from experiments.tracking import records
from experiments.training.build import Prepared, ood_reference_coverage

log = logging.getLogger(__name__)


def feature_views(settings: Config, prepared: Prepared, say_why: bool = False) -> int | None:
    """How many views per image to cache for the frozen-feature fast path (`cached_views`:
    1, 8, 16 or 24), or None when this run trains on images."""
    if settings.finetune.strategy not in ("frozen", "linear_probe"):
        return None
    if settings.finetune.strategy == "linear_probe":
        return probe_views(prepared.augment, settings.eval.tta)
    views, why = features.training_views(prepared.augment)
    if views is not None and (why := images_only(settings)):
        views = None
    if views is None:
        if say_why:
            log.info(f"finetune=frozen trains on images, not on cached features: {why}")
        return None
    return cached_views(views, settings.eval.tta)


def probe_views(augment: object, tta: str) -> int:
    """A linear probe's views per image: it ignores random augmentation, and dihedral views
    (of augmentation or TTA) are exact, so they are data."""
    return cached_views(features.training_views(augment)[0] or 1, tta)


def cached_views(train_views: int, tta: str) -> int:
    """Views per image to cache: as many as training or TTA uses (1; the 8 dihedral ones;
    16 with their zoomed-out copies; 24 with zoomed-in ones too). A linear probe trains on all
    of them."""
    return max(train_views, views_to_cache(tta))


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
    records.log_metrics({"features_computed": features.COUNTS["computed"] - before["computed"],
                         "features_reused": sum(features.COUNTS[k] - before[k]
                                                for k in ("memory", "disk"))})
    return cached


def split_features(settings: Config, prepared: Prepared, views: int) -> dict[str, np.ndarray]:
    """(n, views, C) frozen-backbone features of the train, val and test images, from the
    cache when it holds them (memory, then `<paths.cache_dir>/features`)."""
    stain = None if prepared.stain is None else prepared.stain.target
    return {name: image_features(settings, prepared.model, prepared.precision, stain,
                                 getattr(prepared.splits, name), views)
            for name in ("train", "val", "test")}


def image_features(settings: Config, classifier: keras.Model, precision: str,
                   stain_target: Sequence[float] | None, split: Split,
                   views: int) -> np.ndarray:
    """(n, views, C) frozen-backbone features of one set of images (cached like every run's:
    a cross-validation's refit reuses what its folds computed)."""
    cache = feature_cache(settings, classifier, precision, stain_target,
                          settings.backbone.global_pool)
    compute = functools.partial(features.compute_features, features.feature_model(classifier))
    return cache.get(split.files, split.images, views, compute, split.scales)


def feature_cache(settings: Config, model: keras.Model, precision: str,
                  stain_target: Sequence[float] | None, global_pool: str
                  ) -> features.FeatureCache:
    """The cache of a frozen backbone's features pooled by `global_pool`, keyed by everything
    that changes them (`features.model_key`), under <paths.cache_dir>/features."""
    backbone = settings.backbone
    size = settings.data.patch_size or int(model.input_shape[1])
    key = features.model_key(backbone.name, backbone.weights, settings.trainer.seed, size,
                             precision, stain_target, settings.data.resize, backbone.pooling,
                             backbone.feature_layer, global_pool)
    return features.FeatureCache(key, Path(settings.paths.cache_dir) / "features")


# model_key's global_pool of the out-of-distribution features' cache (their own file)
OOD_POOL = "ood-average"


def ood_features(settings: Config, served: keras.Model, precision: str,
                 stain_target: Sequence[float] | None, split: Split,
                 cached: np.ndarray | None = None) -> np.ndarray | None:
    """(n, C) what the out-of-distribution score measures of a frozen backbone's `split`
    (`inference.ood_features`: the average of its feature map, plain view): view 0 of the
    head's `cached` features when the head averages too, else computed by `served` once per
    image and cached like the head's (a GeM head's referral took a second pass over every
    fold's images: 10-15 s a fold of transfer_multisource). None when the model has no
    pooled features."""
    if cached is not None and settings.backbone.global_pool == "avg":
        return cached[:, 0]
    extractor = feature_extractor(served)
    if extractor is None:
        return None
    cache = feature_cache(settings, served, precision, stain_target, OOD_POOL)
    compute = functools.partial(features.compute_features, extractor)
    return cache.get(split.files, split.images, 1, compute, split.scales)[:, 0]


def referral_features(settings: Config, prepared: Prepared, served: keras.Model,
                      cached: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """The train and test images' features the out-of-distribution score measures, from the
    feature cache when a frozen backbone's run has one (`frozen.ood_features`: no second pass
    over the images); empty when the run trains on images or fits no referral."""
    if not cached or ood_reference_coverage(settings) is None:
        return {}
    stain = None if prepared.stain is None else prepared.stain.target
    return {name: ood_features(settings, served, prepared.precision, stain,
                               getattr(prepared.splits, name), cached[name])
            for name in ("train", "test")}


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
        log.info(f"two_stage's head-only stage trains on images: {why}")
        return None
    cached = logged_split_features(settings, prepared, train_views)
    return head_training(settings, prepared, cached, train_views)


def head_training(settings: Config, prepared: Prepared, cached: dict[str, np.ndarray],
                  train_views: int | None) -> tuple[keras.Model, object, object]:
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
