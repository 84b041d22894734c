"""Structured-config schemas: every config group is typed, so a typo fails at composition.

Hydra merges each YAML option onto the dataclass named in its defaults list (or on the field
type of `Config`): an unknown key or a wrong type is rejected while composing. Range checks live
in `__post_init__` and run when `run.py` converts the config with `OmegaConf.to_object`, before
any data is read or any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from experiments.errors import ConfigError, RunStateError

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(key: str, value: object, choices: tuple) -> None:
    _require(value in choices, f"`{key}` must be one of {choices}. Received: {key}={value!r}")


def _check_at_least(key: str, value: float | None, low: float, *,
                    allow_none: bool = False) -> None:
    ok = (allow_none and value is None) or (value is not None and value >= low)
    _require(ok, f"`{key}` must be >= {low}{' or null' if allow_none else ''}. "
             f"Received: {key}={value!r}")


def _check_fraction(key: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    _require(low_ok and value < 1, f"`{key}` must be in {'[0' if allow_zero else '(0'}, 1). "
             f"Received: {key}={value!r}")


@dataclass
class BackboneConfig:
    """Which pretrained network feeds the study head (see `experiments.backbones`)."""

    name: str = MISSING
    # "imagenet", null (random init) or a path to a weights file.
    weights: str | None = "imagenet"
    # Momentum of the backbone's BatchNorm moving statistics; null keeps the Keras default
    # (0.99). Tiny data sets (~10 steps per epoch) want ~0.9: see shared notes/findings.md.
    bn_momentum: float | None = None
    # The head's dropout rate (the study: 0.5).
    dropout: float = 0.5

    def __post_init__(self) -> None:
        from experiments.backbones import get_spec  # lists the known names when unknown

        get_spec(self.name)
        _require(0 <= self.dropout < 1, "`backbone.dropout` must be in [0, 1). "
                 f"Received: backbone.dropout={self.dropout!r}")
        if self.bn_momentum is not None:
            _require(0 < self.bn_momentum < 1, "`backbone.bn_momentum` must be in (0, 1). "
                     f"Received: backbone.bn_momentum={self.bn_momentum!r}")


@dataclass
class OptimizerConfig:
    """A Keras optimizer built with `hydra.utils.instantiate`."""

    _target_: str = MISSING
    learning_rate: float = 1e-4

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "`optimizer.learning_rate` must be positive. "
                 f"Received: optimizer.learning_rate={self.learning_rate!r}")


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "keras.optimizers.Adam"


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "keras.optimizers.AdamW"
    weight_decay: float = 0.004


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "keras.optimizers.SGD"
    momentum: float = 0.9
    nesterov: bool = True


@dataclass
class NoAugmentationConfig:
    _target_: str = "experiments.augment.NoAugmentation"


@dataclass
class StudyAugmentationConfig:
    """The study's ImageDataGenerator-style augmentation, as Keras preprocessing layers."""

    _target_: str = "experiments.augment.StudyAugmentation"
    zoom: float = 0.2
    rotation_degrees: float = 90.0
    horizontal_flip: bool = True
    vertical_flip: bool = True
    fill_mode: str = "nearest"
    seed: int = MISSING


@dataclass
class TissueAugmentationConfig:
    """H&E-suited augmentations (see `experiments.augment.TissueAugmentation`); each is off at
    its neutral value, so options compose by overriding fields:
    `augmentation=hed augmentation.blur_sigma=1.0`."""

    _target_: str = "experiments.augment.TissueAugmentation"
    seed: int = MISSING
    # The 8 exact 90-degree rotations and flips (tissue has no "up").
    dihedral: bool = False
    # Random resized crop of at least this share of the area (1.0: off).
    crop_scale: float = 1.0
    # HED stain jitter (Tellez et al. 2019): factor U(1-sigma, 1+sigma), shift U(-bias, bias).
    hed_sigma: float = 0.0
    hed_bias: float = 0.0
    # Colour jitter: brightness shift on [0, 1] pixels, contrast/saturation factor spread,
    # hue rotation (fraction of the hue circle).
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    # Gaussian blur with sigma ~ U(0.1, blur_sigma) on a blur_probability share of images.
    blur_sigma: float = 0.0
    blur_probability: float = 0.5
    # Keras RandAugment: operations per batch (0: off) and their strength in [0, 1].
    randaugment_ops: int = 0
    randaugment_magnitude: float = 0.5
    # Label-mixing regularisers (train only): mixup (Zhang et al. 2018) and CutMix (Yun et al.
    # 2019) with mixing coefficients ~ Beta(alpha, alpha); 0: off. Both on: one or the other
    # per batch, each with probability 1/2.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass
class FinetuneConfig:
    """How much of the backbone trains, and when (see `experiments.finetune`)."""

    # full (the study) | frozen (head only) | two_stage (head first, then the backbone).
    strategy: str = "full"
    # two_stage: epochs of head-only training before the backbone joins.
    head_epochs: int = 5
    # two_stage: how many of the backbone's top weight layers join (null: all but BatchNorm).
    unfreeze_layers: int | None = None
    # two_stage: the second stage's learning rate is optimizer.learning_rate x lr_factor.
    lr_factor: float = 0.1

    def __post_init__(self) -> None:
        from experiments.finetune import STRATEGIES

        _check_choice("finetune.strategy", self.strategy, STRATEGIES)
        _check_at_least("finetune.head_epochs", self.head_epochs, 1)
        _check_at_least("finetune.unfreeze_layers", self.unfreeze_layers, 1, allow_none=True)
        _require(0 < self.lr_factor <= 1, "`finetune.lr_factor` must be in (0, 1]. "
                 f"Received: finetune.lr_factor={self.lr_factor!r}")


@dataclass
class DataConfig:
    """An image folder with one subfolder per class."""

    root: str = MISSING
    test_root: str | None = None
    # null: the backbone's default input size.
    image_size: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    # Seed of the train/val/test split and of the cross-validation folds; null: trainer.seed.
    # Fix it to sweep trainer.seed over one split (seed ensembles, seed-to-seed spread).
    split_seed: int | None = None
    # The class whose recall is `test_recall` (sensitivity); null: the last class by name.
    positive_class: str | None = None
    # Bad image files: "error" stops before training listing them all; "skip" leaves them out.
    on_invalid: str = "error"
    # Images smaller than image_size are invalid unless upscaling is allowed.
    allow_upscale: bool = False
    # A regex searched in each file name giving its group (patient, slide): the first capture
    # group, else the whole match. Whole groups stay on one side of every split. null: none.
    group_pattern: str | None = None
    # A regex searched in each image's path below `root`: only matching images are used (e.g.
    # `200X` for one BreakHis magnification). null: every image.
    include_pattern: str | None = None
    # Where decoded images live: memory, disk (decoded once into <paths.cache_dir>/images and
    # memory-mapped), none (decoded again when needed), or auto (memory up to 4 GB, else disk).
    cache: str = "auto"
    # Stain normalisation fitted on the training images only: null, "reinhard" or "macenko".
    stain_normalization: str | None = None
    # Native-resolution patches: images are decoded at image_size, the network trains on
    # random patch_size crops of them and predicts by averaging a grid of crops that covers
    # the image (e.g. image_size=256, patch_size=128). null: the network sees the whole image.
    patch_size: int | None = None

    def __post_init__(self) -> None:
        _check_fraction("data.val_fraction", self.val_fraction, allow_zero=False)
        _check_fraction("data.test_fraction", self.test_fraction, allow_zero=True)
        if self.test_root is None:
            _require(self.test_fraction > 0,
                     "`data.test_fraction` must be > 0 when `data.test_root` is null. "
                     f"Received: data.test_fraction={self.test_fraction!r}")
        _require(self.val_fraction + self.test_fraction < 1,
                 "`data.val_fraction` + `data.test_fraction` must leave images to train on. "
                 f"Received: data.val_fraction={self.val_fraction!r}, "
                 f"data.test_fraction={self.test_fraction!r}")
        from experiments.stain import METHODS

        _check_choice("data.stain_normalization", self.stain_normalization, (None, *METHODS))
        from experiments.image_store import CACHE_MODES

        _check_choice("data.cache", self.cache, CACHE_MODES)
        _require(self.on_invalid in ("error", "skip"), "`data.on_invalid` must be 'error' or "
                 f"'skip'. Received: data.on_invalid={self.on_invalid!r}")
        if self.image_size is not None:
            _require(self.image_size >= 8, "`data.image_size` must be at least 8 pixels. "
                     f"Received: data.image_size={self.image_size!r}")
        if self.patch_size is not None:
            _check_at_least("data.patch_size", self.patch_size, 8)
            _require(self.image_size is not None and self.patch_size <= self.image_size,
                     "`data.patch_size` crops the decoded image: set data.image_size >= it. "
                     f"Received: data.patch_size={self.patch_size!r}, "
                     f"data.image_size={self.image_size!r}")


@dataclass
class DemoDataConfig(DataConfig):
    """The synthetic H&E-like demo set, generated into `root` on first use."""

    images_per_class: int = 100
    # Side of the generated tiles: 320 px serves every backbone's default input (xception: 299).
    source_size: int = 320

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.images_per_class >= 10, "`data.images_per_class` must be at least 10. "
                 f"Received: data.images_per_class={self.images_per_class!r}")


@dataclass
class TrainerConfig:
    epochs: int = 50
    batch_size: int = 16
    seed: int = 42
    # Keras' progress output: 0 silent, 1 progress bar, 2 one line per epoch.
    verbose: int = 1
    # auto: mixed_bfloat16 where the CPU has AMX/AVX512-BF16 or the GPU is Ampere or newer,
    # mixed_float16 (with loss scaling) on older GPUs, float32 otherwise.
    precision: str = "auto"
    # XLA compilation: measured 0.5x on CPU, so off by default.
    jit_compile: bool = False
    # BatchNormalization as TensorFlow's fused op (same arithmetic; measured 1.4-1.9x faster
    # training steps under bfloat16 on a 2-core CPU, benchmarks/bf16_step.py).
    fused_batchnorm: bool = True
    # Gradient accumulation: apply the optimizer every N batches, so batch_size x accumulate
    # is the effective batch at the memory of batch_size (e.g. the study's 2 as 1 x 2).
    accumulate: int = 1
    # constant (ReduceLROnPlateau may lower it) or warmup_cosine (linear warm-up over
    # warmup_epochs, then cosine decay to 0; remove ReduceLROnPlateau: ~callbacks.reduce_lr).
    lr_schedule: str = "constant"
    warmup_epochs: int = 3
    # Label smoothing of the cross-entropy (0: none).
    label_smoothing: float = 0.0
    # tf.distribute: null (one device), mirrored (this machine's GPUs, else logical CPUs) or
    # multi_worker (the TF_CONFIG cluster; only the chief logs); batch_size is the global batch.
    distribute: str | None = None
    # Split the CPU into this many logical devices (for mirrored on a machine without GPUs).
    logical_cpus: int | None = None
    # TensorFlow's intra-op threads for this job; null: every core for a single run, the
    # cores divided among the parallel jobs of a joblib, Ray or submitit sweep.
    threads: int | None = None
    # Exponential moving average of the weights (Keras' optimizer `use_ema`) with this
    # momentum, e.g. 0.99; validation, checkpoints and the final model use the averaged
    # weights. null: off.
    ema: float | None = None

    def __post_init__(self) -> None:
        from experiments.finetune import SCHEDULES

        _check_choice("trainer.lr_schedule", self.lr_schedule, SCHEDULES)
        _check_at_least("trainer.warmup_epochs", self.warmup_epochs, 0)
        _check_fraction("trainer.label_smoothing", self.label_smoothing, allow_zero=True)
        _check_at_least("trainer.epochs", self.epochs, 1)
        _check_at_least("trainer.batch_size", self.batch_size, 1)
        _require(self.verbose in (0, 1, 2), f"`trainer.verbose` must be 0, 1 or 2. Received: "
                 f"trainer.verbose={self.verbose!r}")
        _check_at_least("trainer.accumulate", self.accumulate, 1)
        _check_choice("trainer.precision", self.precision, PRECISIONS)
        _check_at_least("trainer.threads", self.threads, 1, allow_none=True)
        _check_at_least("trainer.logical_cpus", self.logical_cpus, 1, allow_none=True)
        from experiments.distribute import KINDS

        _check_choice("trainer.distribute", self.distribute, (None, *KINDS))
        if self.ema is not None:
            _require(0 < self.ema < 1, "`trainer.ema` must be in (0, 1) or null. "
                     f"Received: trainer.ema={self.ema!r}")


@dataclass
class EvalConfig:
    """How the test split is evaluated (see `experiments.evaluate.evaluate_model`)."""

    # Test-time augmentation: "dihedral" averages the 8 rotations/flips ("none": off);
    # metrics are logged both without (test_*) and with it (test_tta_*).
    tta: str = "dihedral"
    # Operating point, chosen on validation: "fixed" (fixed_threshold), "youden" (max
    # sensitivity + specificity) or "target_sensitivity" (highest threshold reaching it).
    threshold: str = "youden"
    fixed_threshold: float = 0.5
    target_sensitivity: float = 0.95
    # Fit a softmax temperature on validation (calibration; does not change the ranking).
    temperature_scaling: bool = True
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    calibration_bins: int = 10
    # Grad-CAM overlays of this many test images (0: none), correct and wrong, both classes.
    gradcam_images: int = 8
    seed: int = MISSING

    def __post_init__(self) -> None:
        from experiments.inference import TTA_MODES
        from experiments.stats import THRESHOLD_METHODS

        _check_choice("eval.tta", self.tta, TTA_MODES)
        _check_choice("eval.threshold", self.threshold, THRESHOLD_METHODS)
        _check_fraction("eval.fixed_threshold", self.fixed_threshold, allow_zero=True)
        _require(0 < self.target_sensitivity <= 1, "`eval.target_sensitivity` must be in "
                 f"(0, 1]. Received: eval.target_sensitivity={self.target_sensitivity!r}")
        _check_at_least("eval.bootstrap_resamples", self.bootstrap_resamples, 100)
        _require(0.5 <= self.confidence < 1, "`eval.confidence` must be in [0.5, 1). "
                 f"Received: eval.confidence={self.confidence!r}")
        _check_at_least("eval.calibration_bins", self.calibration_bins, 2)
        _check_at_least("eval.gradcam_images", self.gradcam_images, 0)


@dataclass
class CVConfig:
    """Stratified K-fold cross-validation over data.root (1: one train/val/test split)."""

    folds: int = 1
    # Repeated cross-validation: this many different fold assignments (repeat r is the
    # cross-validation of trainer.seed + r).
    repeats: int = 1
    # After the folds, train one final model on every image for the folds' median best epoch
    # (no validation split) and log it as the parent's model (scikit-learn's `refit`).
    refit: bool = False

    def __post_init__(self) -> None:
        _check_at_least("cv.folds", self.folds, 1)
        _check_at_least("cv.repeats", self.repeats, 1)
        _require(self.folds > 1 or (self.repeats == 1 and not self.refit),
                 "`cv.repeats` and `cv.refit` need a cross-validation (cv.folds > 1). Received: "
                 f"cv.folds={self.folds!r}, cv.repeats={self.repeats!r}, cv.refit={self.refit!r}")


@dataclass
class MlflowConfig:
    tracking_uri: str = MISSING
    # Where a new experiment keeps artifacts when the store is local (ignored for servers).
    artifact_root: str = MISSING
    experiment_name: str = "biopsy"
    run_name: str | None = None
    # Register the run's model (in a sweep: the best job's, by the checkpoint's validation
    # metric) in the MLflow model registry under this name; null: do not register.
    register_as: str | None = None


@dataclass
class PathsConfig:
    root: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class Config:
    backbone: BackboneConfig = MISSING
    optimizer: Any = MISSING
    augmentation: Any = MISSING
    # name -> Keras callback config with `_target_`; a null entry is left out.
    callbacks: dict[str, Any] = field(default_factory=dict)
    data: Any = MISSING
    trainer: TrainerConfig = MISSING
    finetune: FinetuneConfig = MISSING
    eval: EvalConfig = MISSING
    cv: CVConfig = field(default_factory=CVConfig)
    mlflow: MlflowConfig = MISSING
    paths: PathsConfig = MISSING
    # An MLflow run id to continue after an interruption (its own config is restored).
    resume: str | None = None


# Groups whose options have schemas of their own (named in each option's defaults list).
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "optimizer": {"adam_schema": AdamConfig, "adamw_schema": AdamWConfig,
                  "sgd_schema": SGDConfig},
    "augmentation": {"none_schema": NoAugmentationConfig,
                     "study_schema": StudyAugmentationConfig,
                     "tissue_schema": TissueAugmentationConfig},
    "data": {"folder_schema": DataConfig, "demo_schema": DemoDataConfig},
}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; YAML options name them in their defaults."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schemas in GROUP_SCHEMAS.items():
        for name, schema in schemas.items():
            cs.store(group=group, name=name, node=schema)


def typed_config(plain: dict[str, Any]) -> DictConfig:
    """Re-type a saved, resolved config (e.g. a run's resolved_config.yaml): the root onto
    `Config`, each group with several schemas onto the one whose fields are its keys."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config),
                          {k: v for k, v in plain.items() if k not in GROUP_SCHEMAS})
    for group, schemas in GROUP_SCHEMAS.items():
        keys = set(plain.get(group) or {})
        matches = [s for s in schemas.values() if {f.name for f in fields(s)} == keys]
        if len(matches) != 1:
            raise RunStateError(f"Saved config group {group!r} matches no schema. Received keys: "
                                f"{sorted(keys)}")
        cfg[group] = OmegaConf.merge(OmegaConf.structured(matches[0]), plain[group])
    return cfg
