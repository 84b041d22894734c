"""The names each config key accepts, kept here at the bottom of the package so the schemas can
validate them without importing the modules that implement them (those modules import these
lists, so a new option is added in one place).
"""

from __future__ import annotations

# backbone.name: the keys of `experiments.models.backbones.BACKBONES` and the backbones from
# files, `experiments.models.external.KINDS` (a test keeps them equal).
BACKBONE_NAMES = ("densenet201", "densenet121", "resnet50", "efficientnetv2b0",
                  "mobilenetv3large", "convnexttiny", "xception", "simplecnn", "keras_hub",
                  "keras_file")
# backbone.pooling of a backbone that outputs tokens (`experiments.models.external.pooled`)
TOKEN_POOLINGS = ("cls", "mean", "cls_mean")
# backbone.global_pool of a backbone that outputs a feature map (`experiments.models.pooling`)
GLOBAL_POOLS = ("avg", "gem")
# trainer.precision
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
# trainer.distribute (besides null)
DISTRIBUTE_KINDS = ("mirrored", "multi_worker")
# finetune.strategy and trainer.lr_schedule
FINETUNE_STRATEGIES = ("full", "frozen", "two_stage", "linear_probe")
LR_SCHEDULES = ("constant", "warmup_cosine")
# data.stain_normalization (besides null), data.cache, data.on_invalid
STAIN_METHODS = ("reinhard", "macenko")
CACHE_MODES = ("auto", "memory", "disk", "none")
ON_INVALID = ("error", "skip")
# data.resize: keep the aspect ratio (centre square) or squash to a square
RESIZE_MODES = ("crop", "squash")
# eval.tta and eval.threshold
TTA_MODES = ("none", "dihedral", "dihedral_zoom", "rot90_zoom", "rot90_multiscale")
# The views each eval.tta averages, as `data.transforms.tta_view` numbers them: 0-7 the dihedral
# views (0 the image as it is, 1 rotated 90 degrees), 8-15 the same at half the magnification,
# 16-23 at twice it. rot90_zoom: the image and its 90-degree rotation at two scales - as accurate
# as all 16 for a probe trained on the 16 (benchmarks/README, "Colour and scale"), at a quarter
# of the cost; rot90_multiscale: the same at three scales (a probe trains on all 24).
TTA_VIEWS = {"none": (0,), "dihedral": tuple(range(8)), "dihedral_zoom": tuple(range(16)),
             "rot90_zoom": (0, 1, 8, 9), "rot90_multiscale": (0, 1, 8, 9, 16, 17)}
# Views per image a feature cache holds: the first 1, 8, 16 or 24 (each TTA's views among them).
CACHED_VIEW_COUNTS = (1, 8, 16, 24)
THRESHOLD_METHODS = ("fixed", "youden", "target_sensitivity")


def views_to_cache(tta: str) -> int:
    """How many of the first views a feature cache needs to hold every view of `tta`."""
    return next(n for n in CACHED_VIEW_COUNTS if n > max(TTA_VIEWS[tta]))
