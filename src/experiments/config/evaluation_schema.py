"""Structured-config schemas of how runs are evaluated: the test evaluation and external
cohorts (`eval`), and cross-validation (`cv`). Checks run in `__post_init__` (see `schema`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from experiments.config.checks import check_at_least, check_choice, check_fraction, require
from experiments.config.choices import THRESHOLD_METHODS, TTA_MODES
from experiments.config.cohorts import ExternalCohort, external_cohorts


@dataclass
class EvalConfig:
    """How the test split is evaluated (see `experiments.evaluate.evaluate_model`)."""

    # Test-time augmentation: "dihedral" averages the 8 rotations/flips, "dihedral_zoom" those
    # and the same 8 at half the magnification, "rot90_zoom" 4 of them (the image and its
    # 90-degree rotation, at both scales), "rot90_multiscale" those and the same two at twice
    # the magnification; a linear probe trains on all of the first 8, 16 or 24 views these
    # need. "none": off. Metrics are logged both without (test_*) and with it (test_tta_*).
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
    # Out-of-distribution referral: the share of new same-source images the model should still
    # answer; images farther from the training images (k-NN distance of pooled features) get
    # decision `refer`. null: no referral (experiments.serving.ood).
    ood_coverage: float | None = 0.95
    # The referral also measures each image's optical-density statistics against the training
    # images' (stain and scanner; seen before any stain normalisation the model applies).
    # false: pooled features only.
    ood_stain: bool = True
    # Labeled folders of other sources scored by the run's final model after training (never
    # used for training, selection, threshold or temperature): name -> folder, or name ->
    # {root, group_pattern, include_pattern}. Logged as ext_<name>_* (experiments.config.cohorts).
    external: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:

        check_choice("eval.tta", self.tta, TTA_MODES)
        check_choice("eval.threshold", self.threshold, THRESHOLD_METHODS)
        check_fraction("eval.fixed_threshold", self.fixed_threshold, allow_zero=True)
        require(0 < self.target_sensitivity <= 1, "`eval.target_sensitivity` must be in "
                f"(0, 1]. Received: eval.target_sensitivity={self.target_sensitivity!r}")
        check_at_least("eval.bootstrap_resamples", self.bootstrap_resamples, 100)
        require(0.5 <= self.confidence < 1, "`eval.confidence` must be in [0.5, 1). "
                f"Received: eval.confidence={self.confidence!r}")
        check_at_least("eval.calibration_bins", self.calibration_bins, 2)
        check_at_least("eval.gradcam_images", self.gradcam_images, 0)
        external_cohorts(self.external)
        if self.ood_coverage is not None:
            check_fraction("eval.ood_coverage", self.ood_coverage, allow_zero=False)

    @property
    def cohorts(self) -> tuple[ExternalCohort, ...]:
        """`external` checked and typed."""
        return external_cohorts(self.external)


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
    # Leave-one-source-out: one fold per source of data.sources (and data.root), each tested
    # on the whole source it never trained on - how a model fares in a laboratory it has not
    # seen. Replaces cv.folds (keep it 1).
    leave_source_out: bool = False
    # Log every fold's model (model.keras, an MLflow model: 3-6 s per fold of a pretrained
    # backbone). false needs cv.refit=true: the parent's model is then the refit alone, and
    # the fold runs keep their metrics, predictions and figures (a backbone comparison).
    fold_models: bool = True
    # With data.sources and cv.refit: the parent's model is a cascade (`serving.cascade`) - a
    # model refitted on data.root's images alone answers the images its out-of-distribution
    # referral accepts, the model refitted on every source the rest. A second source costs
    # the home images accuracy; this wins it back (held out: 0.942 against 0.917 on the
    # study's images, unseen BreakHis patients unchanged - benchmarks/README, session 18).
    # Every fold trains the home model too (child runs `fold k home`): the parent's test_*
    # metrics are the cascade's out of fold, fallback_test_* the all-source model's alone.
    cascade: bool = False
    # cv.cascade's home model: fit its temperature on its folds' out-of-fold predictions of the
    # home images (true) or not (false); null: as eval.temperature_scaling, which the
    # all-source model follows (no effect without cv.cascade). Fitted on one source's held-out
    # predictions a temperature calibrates that source's new images; fitted on two sources'
    # pooled ones it left the all-source model worse calibrated on unseen BreakHis patients in
    # 8 of 8 seeds (experiment=transfer_multisource: true, with eval.temperature_scaling=false
    # - benchmarks/README, session 26).
    home_temperature: bool | None = None

    @property
    def enabled(self) -> bool:
        """Whether the run is a cross-validation (a parent run with fold children)."""
        return self.folds > 1 or self.leave_source_out

    def __post_init__(self) -> None:
        check_at_least("cv.folds", self.folds, 1)
        check_at_least("cv.repeats", self.repeats, 1)
        require(self.enabled or (self.repeats == 1 and not self.refit),
                "`cv.repeats` and `cv.refit` need a cross-validation (cv.folds > 1). Received: "
                f"cv.folds={self.folds!r}, cv.repeats={self.repeats!r}, cv.refit={self.refit!r}")
        require(self.fold_models or self.refit,
                "`cv.fold_models=false` needs cv.refit=true: without a refit the parent's model "
                "is the ensemble of the fold models. Received: cv.fold_models="
                f"{self.fold_models!r}, cv.refit={self.refit!r}")
        require(not self.leave_source_out or (self.folds == 1 and self.repeats == 1),
                "`cv.leave_source_out` makes one fold per source: keep cv.folds=1 and "
                f"cv.repeats=1. Received: cv.folds={self.folds!r}, cv.repeats={self.repeats!r}")
