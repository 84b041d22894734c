"""What a finished run prints: its headline test metrics with their intervals, what a cascade's
home model answered, each external cohort, and the warning (also a tag on the run) when the
model ranks some images backwards. Every metric is in MLflow; this is the terminal's share."""

from __future__ import annotations

import logging

from experiments.tracking import records
from experiments.tracking import store as store_lib

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1", "loss")


def print_summary(run_id: str, metrics: dict[str, float], best_epoch: int | None,
                  tracking_uri: str) -> None:
    """The headline test metrics with their intervals, and warnings (a backwards ranking is
    also tagged on the run); every metric is in MLflow."""
    if best_epoch is None:
        print(f"\nCross-validation {run_id} finished. Pooled out-of-fold test predictions:")
    else:
        print(f"\nRun {run_id} finished. Best epoch (on validation): {best_epoch}")
        print("Test split (used once, after training):")
    for prefix, title in (("test_", "plain"), ("test_tta_", "with TTA"),
                          ("test_op_", "at the validation threshold")):
        shown = [name for name in SUMMARY_METRICS if f"{prefix}{name}" in metrics]
        if not shown:
            continue
        print(f"  {title}:")
        for name in shown:
            value = metrics[f"{prefix}{name}"]
            low, high = (metrics.get(f"{prefix}{name}_ci_{end}") for end in ("low", "high"))
            interval = f"  [{low:.3f}, {high:.3f}]" if low is not None else ""
            print(f"    {prefix}{name:<14} {value:.4f}{interval}")
    if "val_threshold" in metrics:
        print(f"  threshold on p(positive), chosen on validation: {metrics['val_threshold']:.4f}")
    print_answered(metrics)
    print_cohorts(metrics)
    flag_backwards(run_id, metrics, tracking_uri)
    print(f"Open the MLflow UI: {store_lib.ui_command(tracking_uri)}")


def warn_backwards(metrics: dict[str, float]) -> list[str]:
    """Warn of every ROC-AUC whose whole interval lies below 0.5: images - a cohort, a source's
    test images, their patients - that the model ranks backwards, confidently wrong where a coin
    would be right half the time. Returns the metrics warned of."""
    inverted = sorted(key.removesuffix("_ci_high") for key, high in metrics.items()
                      if key.endswith("roc_auc_ci_high") and high < 0.5)
    for key in inverted:
        log.warning(f"Warning: {key} {metrics[key]:.3f} [{metrics[f'{key}_ci_low']:.3f}, "
                    f"{metrics[f'{key}_ci_high']:.3f}]: the model ranks these images backwards "
                    "(the whole interval below 0.5). Do not use its answers on such images.")
    return inverted


def flag_backwards(run_id: str, metrics: dict[str, float], tracking_uri: str) -> None:
    """`warn_backwards`, and the same warning as a tag on the run, where the MLflow UI shows it
    beside the metrics (the printed summary is gone once the terminal is)."""
    inverted = warn_backwards(metrics)
    if inverted:
        records.tag_ended_run(tracking_uri, run_id, {records.BACKWARDS_TAG: (
            "ROC-AUC interval wholly below 0.5 - do not use the model's answers on these "
            "images: " + ", ".join(inverted))})


def print_answered(metrics: dict[str, float]) -> None:
    """cv.cascade: the share of each source's images the home model answered, and what the
    all-source model alone would have scored."""
    if "test_answered_by_first" not in metrics:
        return
    shares = ", ".join(f"{key.removeprefix('test_source_').split('_answered')[0]} {value:.0%}"
                       for key, value in sorted(metrics.items())
                       if key.startswith("test_source_") and key.endswith("_answered_by_first"))
    print(f"  answered by the home model (the rest by the all-source model): {shares}")
    alone = [f"{name} {metrics[f'fallback_test_{name}']:.4f}" for name in ("accuracy", "roc_auc")
             if f"fallback_test_{name}" in metrics]
    print(f"  the all-source model alone: {', '.join(alone)}")


def print_cohorts(metrics: dict[str, float]) -> None:
    """Each external cohort's headline metrics (eval.external) with their intervals."""
    cohorts = sorted(name.removeprefix("ext_").removesuffix("_n_images") for name in metrics
                     if name.startswith("ext_") and name.endswith("_n_images"))
    if cohorts:
        print("External cohorts (the final model; never used to train, select or calibrate):")
    for cohort in cohorts:
        cells = []
        for name in ("accuracy", "roc_auc", "patient_accuracy", "ece", "referred",
                     "accepted_accuracy", "ood_auroc"):
            key = f"ext_{cohort}_{name}"
            if key in metrics:
                low = metrics.get(f"{key}_ci_low")
                interval = "" if low is None else \
                    f" [{low:.3f}, {metrics[f'{key}_ci_high']:.3f}]"
                if f"{key}_calibrated_95" in metrics:  # what chance alone gives this cohort
                    interval = f" (a calibrated model: < {metrics[f'{key}_calibrated_95']:.3f})"
                cells.append(f"{name} {metrics[key]:.3f}{interval}")
        print(f"  {cohort} ({int(metrics[f'ext_{cohort}_n_images'])} images): "
              + ", ".join(cells))
