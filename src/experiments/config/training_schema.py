"""Structured-config schemas of what builds and trains the model: backbone, optimizer,
augmentation, fine-tuning and trainer groups (types, MISSING for required keys, range checks
that fail at composition).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from experiments.config.checks import check_at_least, check_choice, check_fraction, require
from experiments.config.choices import (
    BACKBONE_NAMES,
    DISTRIBUTE_KINDS,
    FINETUNE_STRATEGIES,
    GLOBAL_POOLS,
    LR_SCHEDULES,
    PRECISIONS,
    TOKEN_POOLINGS,
)


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
    # backbone=keras_hub: a local KerasHub preset folder; backbone=keras_file: a saved Keras
    # feature extractor (.keras, from RGB pixels in [0, 255]). Their `weights` is that location.
    preset: str | None = None
    path: str | None = None
    # How a backbone that outputs tokens (a ViT) is pooled: cls, mean (patch tokens) or
    # cls_mean (both, concatenated).
    pooling: str = "cls"
    # How a feature map is pooled into the features the head reads: avg (global average, the
    # study's) or gem (generalised mean, p=3: strong local activations weigh more; the
    # pretrained presets' - README, "Will it work on my lab's images?").
    global_pool: str = "avg"
    # Cut the backbone at this layer (its feature map is pooled) instead of using its last
    # block, e.g. pool4_relu for DenseNet121's third dense block; null: the whole backbone.
    feature_layer: str | None = None

    def __post_init__(self) -> None:
        check_choice("backbone.name", self.name, BACKBONE_NAMES)
        check_choice("backbone.pooling", self.pooling, TOKEN_POOLINGS)
        check_choice("backbone.global_pool", self.global_pool, GLOBAL_POOLS)
        location = {"keras_hub": ("preset", self.preset),
                    "keras_file": ("path", self.path)}.get(self.name)
        if location is not None:
            key, value = location
            require(value is not None, f"backbone={self.name} needs backbone.{key}. "
                    f"Received: backbone.{key}=None")
            require(self.weights == value, f"A {self.name} backbone's weights are its "
                    f"backbone.{key} (leave backbone.weights at ${{.{key}}}). Received: "
                    f"backbone.weights={self.weights!r}")
        require(0 <= self.dropout < 1, "`backbone.dropout` must be in [0, 1). "
                f"Received: backbone.dropout={self.dropout!r}")
        if self.bn_momentum is not None:
            require(0 < self.bn_momentum < 1, "`backbone.bn_momentum` must be in (0, 1). "
                    f"Received: backbone.bn_momentum={self.bn_momentum!r}")


@dataclass
class OptimizerConfig:
    """A Keras optimizer built with `hydra.utils.instantiate`."""

    _target_: str = MISSING
    learning_rate: float = 1e-4

    def __post_init__(self) -> None:
        require(self.learning_rate > 0, "`optimizer.learning_rate` must be positive. "
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
    _target_: str = "experiments.data.augment.NoAugmentation"


@dataclass
class StudyAugmentationConfig:
    """The study's ImageDataGenerator-style augmentation, as Keras preprocessing layers."""

    _target_: str = "experiments.data.augment.StudyAugmentation"
    zoom: float = 0.2
    rotation_degrees: float = 90.0
    horizontal_flip: bool = True
    vertical_flip: bool = True
    fill_mode: str = "nearest"
    seed: int = MISSING


@dataclass
class TissueAugmentationConfig:
    """H&E-suited augmentations (see `experiments.data.augment.TissueAugmentation`); each is off at
    its neutral value, so options compose by overriding fields:
    `augmentation=hed augmentation.blur_sigma=1.0`."""

    _target_: str = "experiments.data.augment.TissueAugmentation"
    seed: int = MISSING
    # The 8 exact 90-degree rotations and flips (tissue has no "up").
    dihedral: bool = False
    # Random resized crop of at least this share of the area (1.0: off).
    crop_scale: float = 1.0
    # Each image at x1, x0.5 or x2 magnification (a third each; the scales of
    # eval.tta=rot90_multiscale): a network trained end to end sees tissue at three scales.
    multiscale: bool = False
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

        check_choice("finetune.strategy", self.strategy, FINETUNE_STRATEGIES)
        check_at_least("finetune.head_epochs", self.head_epochs, 1)
        check_at_least("finetune.unfreeze_layers", self.unfreeze_layers, 1, allow_none=True)
        require(0 < self.lr_factor <= 1, "`finetune.lr_factor` must be in (0, 1]. "
                f"Received: finetune.lr_factor={self.lr_factor!r}")


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

        check_choice("trainer.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_at_least("trainer.warmup_epochs", self.warmup_epochs, 0)
        check_fraction("trainer.label_smoothing", self.label_smoothing, allow_zero=True)
        check_at_least("trainer.epochs", self.epochs, 1)
        check_at_least("trainer.batch_size", self.batch_size, 1)
        require(self.verbose in (0, 1, 2), f"`trainer.verbose` must be 0, 1 or 2. Received: "
                f"trainer.verbose={self.verbose!r}")
        check_at_least("trainer.accumulate", self.accumulate, 1)
        check_choice("trainer.precision", self.precision, PRECISIONS)
        check_at_least("trainer.threads", self.threads, 1, allow_none=True)
        check_at_least("trainer.logical_cpus", self.logical_cpus, 1, allow_none=True)

        check_choice("trainer.distribute", self.distribute, (None, *DISTRIBUTE_KINDS))
        if self.ema is not None:
            require(0 < self.ema < 1, "`trainer.ema` must be in (0, 1) or null. "
                    f"Received: trainer.ema={self.ema!r}")
