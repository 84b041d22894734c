"""Structured-config schemas: every config group is typed, so a typo fails at composition.

Hydra merges each YAML option onto the dataclass named in its defaults list (or on the field
type of `Config`): an unknown key or a wrong type is rejected while composing. Range checks live
in `__post_init__` and run when `run.py` converts the config with `OmegaConf.to_object`, before
any data is read or any model is built.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from experiments.config.checks import check_at_least, check_choice, check_fraction, require
from experiments.config.choices import (
    CACHE_MODES,
    RESIZE_MODES,
    STAIN_METHODS,
)
from experiments.config.cohorts import MAIN_SOURCE, ExternalCohort, external_cohorts
from experiments.config.evaluation_schema import CVConfig, EvalConfig
from experiments.config.training_schema import (
    AdamConfig,
    AdamWConfig,
    BackboneConfig,
    FinetuneConfig,
    NoAugmentationConfig,
    SGDConfig,
    StudyAugmentationConfig,
    TissueAugmentationConfig,
    TrainerConfig,
)
from experiments.errors import RunStateError


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
    # Images that are not square: "crop" scales the shorter side to image_size and keeps the
    # centre square (cells keep their shape); "squash" scales each side (distorts them).
    resize: str = "crop"
    # Micrometres per pixel of data.root's images (e.g. BreakHis 100X: about 0.65, measured by
    # its nuclei: benchmarks/nuclei.py). The model then records the scale of its input
    # (input_mpp), and images of other scales (eval.external's and predict's/serving's `mpp`)
    # are rescaled to it. null: unknown.
    mpp: float | None = None
    # Where decoded images live: memory, disk (decoded once into <paths.cache_dir>/images and
    # memory-mapped), none (decoded again when needed), or auto (memory up to 4 GB, else disk).
    cache: str = "auto"
    # Stain normalisation fitted on the training images only: null, "reinhard" or "macenko".
    stain_normalization: str | None = None
    # Native-resolution patches: images are decoded at image_size, the network trains on
    # random patch_size crops of them and predicts by averaging a grid of crops that covers
    # the image (e.g. image_size=256, patch_size=128). null: the network sees the whole image.
    patch_size: int | None = None
    # More labeled folders trained on beside data.root, each a source (data.root's images are
    # source "main"): name -> folder, or name -> {root, group_pattern, include_pattern, mpp}
    # (mpp: its micrometres per pixel, rescaled to data.root's scale; needs data.mpp).
    # Splits and folds keep patients together and hold every source in proportion; test
    # metrics are also reported per source (test_source_<name>_*).
    sources: dict[str, Any] = field(default_factory=dict)

    @property
    def source_folders(self) -> tuple[ExternalCohort, ...]:
        """`sources` checked and typed."""
        return external_cohorts(self.sources, "data.sources")

    def __post_init__(self) -> None:
        check_fraction("data.val_fraction", self.val_fraction, allow_zero=False)
        require(MAIN_SOURCE not in self.sources, f"`data.sources` names the other sources; "
                f"data.root is {MAIN_SOURCE!r}. Received: data.sources.{MAIN_SOURCE}")
        sources = external_cohorts(self.sources, "data.sources")
        check_fraction("data.test_fraction", self.test_fraction, allow_zero=True)
        if self.test_root is None:
            require(self.test_fraction > 0,
                    "`data.test_fraction` must be > 0 when `data.test_root` is null. "
                    f"Received: data.test_fraction={self.test_fraction!r}")
        require(self.val_fraction + self.test_fraction < 1,
                "`data.val_fraction` + `data.test_fraction` must leave images to train on. "
                f"Received: data.val_fraction={self.val_fraction!r}, "
                f"data.test_fraction={self.test_fraction!r}")

        check_choice("data.stain_normalization", self.stain_normalization, (None, *STAIN_METHODS))

        check_choice("data.cache", self.cache, CACHE_MODES)
        check_choice("data.resize", self.resize, RESIZE_MODES)
        require(self.mpp is None or self.mpp > 0, "`data.mpp` must be positive or null. "
                f"Received: data.mpp={self.mpp!r}")
        scaled = [f"data.sources.{s.name}.mpp={s.mpp!r}" for s in sources if s.mpp is not None]
        require(not scaled or self.mpp is not None, "A source's mpp rescales its images to "
                "data.root's scale, which needs data.mpp (data.root's micrometres per pixel). "
                f"Received: data.mpp=None, {', '.join(scaled)}")
        require(self.on_invalid in ("error", "skip"), "`data.on_invalid` must be 'error' or "
                f"'skip'. Received: data.on_invalid={self.on_invalid!r}")
        if self.image_size is not None:
            require(self.image_size >= 8, "`data.image_size` must be at least 8 pixels. "
                    f"Received: data.image_size={self.image_size!r}")
        if self.patch_size is not None:
            check_at_least("data.patch_size", self.patch_size, 8)
            require(self.image_size is not None and self.patch_size <= self.image_size,
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
        require(self.images_per_class >= 10, "`data.images_per_class` must be at least 10. "
                f"Received: data.images_per_class={self.images_per_class!r}")


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


# Groups whose options have schemas of their own: a union for type checkers; OmegaConf, which
# takes no union of structured configs, sees Any and each option's defaults list picks its schema.
if TYPE_CHECKING:
    OptimizerSchema = AdamConfig | AdamWConfig | SGDConfig
    AugmentationSchema = NoAugmentationConfig | StudyAugmentationConfig | TissueAugmentationConfig
    DataSchema = DataConfig | DemoDataConfig
else:
    OptimizerSchema = AugmentationSchema = DataSchema = Any


@dataclass
class Config:
    backbone: BackboneConfig = MISSING
    optimizer: OptimizerSchema = MISSING
    augmentation: AugmentationSchema = MISSING
    # name -> Keras callback config with `_target_`; a null entry is left out.
    callbacks: dict[str, Any] = field(default_factory=dict)
    data: DataSchema = MISSING
    trainer: TrainerConfig = MISSING
    finetune: FinetuneConfig = MISSING
    eval: EvalConfig = MISSING
    cv: CVConfig = field(default_factory=CVConfig)
    mlflow: MlflowConfig = MISSING
    paths: PathsConfig = MISSING
    # An MLflow run id to continue after an interruption (its own config is restored).
    resume: str | None = None

    def __post_init__(self) -> None:
        require(not self.cv.leave_source_out or bool(self.data.sources),
                "`cv.leave_source_out` needs sources to leave out: name them in data.sources. "
                f"Received: data.sources={dict(self.data.sources)!r}")
        if self.cv.cascade:
            self.check_cascade()

    def check_cascade(self) -> None:
        """cv.cascade needs a home source and others, a refit to ship, a referral to route by,
        one decision threshold for both models (their answers are pooled image by image), and
        home images in every fold's training split (not leave-one-source-out)."""
        cv, ev = self.cv, self.eval
        require(bool(self.data.sources) and cv.refit and not cv.leave_source_out,
                "`cv.cascade` needs data.sources (the other sources), cv.refit=true and "
                f"cv.leave_source_out=false. Received: data.sources={dict(self.data.sources)!r}, "
                f"cv.refit={cv.refit!r}, cv.leave_source_out={cv.leave_source_out!r}")
        require(ev.threshold == "fixed" and ev.ood_coverage is not None
                and self.data.patch_size is None,
                "`cv.cascade` routes by the home model's out-of-distribution referral and "
                "pools both models' answers at one threshold: it needs eval.threshold=fixed, "
                "eval.ood_coverage set and data.patch_size=null. Received: eval.threshold="
                f"{ev.threshold!r}, eval.ood_coverage={ev.ood_coverage!r}, data.patch_size="
                f"{self.data.patch_size!r}")


# Groups whose options have schemas of their own (named in each option's defaults list).
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "optimizer": {"adam_schema": AdamConfig, "adamw_schema": AdamWConfig,
                  "sgd_schema": SGDConfig},
    "augmentation": {"none_schema": NoAugmentationConfig,
                     "study_schema": StudyAugmentationConfig,
                     "tissue_schema": TissueAugmentationConfig},
    "data": {"folder_schema": DataConfig, "demo_schema": DemoDataConfig},
}


# The config files: conf/ at the top of the repository, shipped inside the package as this module
# (pyproject's package-dir), so Hydra finds them as pkg://experiments.conf wherever it is installed.
CONFIG_MODULE = "experiments.conf"


def config_folder() -> Path:
    """The folder that holds config.yaml and one subfolder per config group."""
    return Path(str(importlib.resources.files(CONFIG_MODULE)))


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
    cfg = OmegaConf.structured(Config)
    cfg.merge_with({k: v for k, v in plain.items() if k not in GROUP_SCHEMAS})
    for group, schemas in GROUP_SCHEMAS.items():
        keys = set(plain.get(group) or {})
        matches = [s for s in schemas.values() if {f.name for f in fields(s)} == keys]
        if len(matches) != 1:
            raise RunStateError(f"Saved config group {group!r} matches no schema. Received keys: "
                                f"{sorted(keys)}")
        cfg[group] = OmegaConf.merge(OmegaConf.structured(matches[0]), plain[group])
    return cfg
