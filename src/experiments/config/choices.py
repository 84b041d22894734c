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
TTA_MODES = ("none", "dihedral", "dihedral_zoom")
# Views per image of each eval.tta: dihedral_zoom adds each dihedral view at half the
# magnification (`data.transforms.tta_view`).
TTA_VIEWS = {"none": 1, "dihedral": 8, "dihedral_zoom": 16}
THRESHOLD_METHODS = ("fixed", "youden", "target_sensitivity")
