"""What a finished run prints: its headline test metrics with their intervals, what a cascade's
home model answered, each external cohort, and the warning (also a tag on the run) when the
model ranks some images backwards. Every metric is in MLflow; this is the terminal's share."""

from __future__ import annotations

import logging

from experiments.evaluation.stats import TEMPERATURE_BOUNDS
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
    print_patients(metrics)
    print_answered(metrics)
    print_cohorts(metrics)
    warn_chance(metrics)
    flag_backwards(run_id, metrics, tracking_uri)
    print(f"Open the MLflow UI: {store_lib.ui_command(tracking_uri)}")


def with_interval(metrics: dict[str, float], key: str) -> str:
    """`value [low, high]`, or the value alone when the run logged no interval for it."""
    low = metrics.get(f"{key}_ci_low")
    interval = "" if low is None else f" [{low:.3f}, {metrics[f'{key}_ci_high']:.3f}]"
    return f"{metrics[key]:.3f}{interval}"


def print_patients(metrics: dict[str, float]) -> None:
    """With a group pattern: the test metrics per patient (the mean probability of each
    patient's images), whose intervals resample patients - the numbers to trust when a few
    patients bring most of the images."""
    if "test_patient_accuracy" not in metrics:
        return
    cells = [f"{name} {with_interval(metrics, f'test_patient_{name}')}"
             for name in ("accuracy", "roc_auc") if f"test_patient_{name}" in metrics]
    print(f"  per patient ({int(metrics['test_n_patients'])}): {', '.join(cells)}")


def warn_chance(metrics: dict[str, float]) -> None:
    """Say so when the test ROC-AUC cannot be told from chance (its interval holds 0.5), and
    when the model's temperature ran to its upper bound: held-out predictions so uninformative
    that calibration flattens every answer towards the classes' shares."""
    for key in ("test_roc_auc", "test_patient_roc_auc"):
        if metrics.get(f"{key}_ci_low", 1.0) <= 0.5 <= metrics.get(f"{key}_ci_high", 0.0):
            log.warning(f"Warning: {key} {with_interval(metrics, key)} cannot be told from "
                        "chance (the interval holds 0.5): more images or patients, or another "
                        "recipe, before trusting this model's answers.")
    for key in ("temperature", "model_temperature", "fallback_model_temperature"):
        if metrics.get(key, 0.0) >= 0.99 * TEMPERATURE_BOUNDS[1]:
            log.warning(f"Warning: {key} {metrics[key]:.1f} is at its upper bound: the "
                        "held-out predictions it was fitted on carried almost no information, "
                        "so the model's probabilities are flattened towards the classes' "
                        "shares.")


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
            if f"{key}_calibrated_95" in metrics:  # what chance alone gives this cohort
                cells.append(f"{name} {metrics[key]:.3f} (a calibrated model: < "
                             f"{metrics[f'{key}_calibrated_95']:.3f})")
            elif key in metrics:
                cells.append(f"{name} {with_interval(metrics, key)}")
        print(f"  {cohort} ({int(metrics[f'ext_{cohort}_n_images'])} images): "
              + ", ".join(cells))
