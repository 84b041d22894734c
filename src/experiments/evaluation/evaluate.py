"""Test-split evaluation: predictions (plain and test-time augmented), metrics
(scikit-learn) with bootstrap intervals, the operating point and calibration chosen on
validation, figures (matplotlib) and Grad-CAM overlays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np  # noqa: E402

from experiments.config.choices import TTA_VIEWS  # noqa: E402
from experiments.config.schema import EvalConfig as EvalSettings  # noqa: E402
from experiments.data.splits import Splits  # noqa: E402
from experiments.evaluation import (
    gradcam,  # noqa: E402
    stats,  # noqa: E402
)
from experiments.evaluation.cohorts import decision_line, patient_metrics, per_source_metrics
from experiments.evaluation.figures import plot_patients, plot_reliability
from experiments.evaluation.metrics import Predictions, classification_metrics, interval_metrics
from experiments.evaluation.tables import write_patients, write_predictions
from experiments.serving.inference import apply_temperature  # noqa: E402
from experiments.serving.views import predict_views  # noqa: E402


@dataclass
class Evaluation:
    """What the test evaluation produced: metrics to log, files to log, and the final test
    predictions (after TTA and temperature) with their decisions at the chosen threshold."""

    metrics: dict[str, float]
    plain: Predictions  # test, no TTA, no temperature
    tta: Predictions | None  # test with TTA, no temperature (None: eval.tta=none)
    test: Predictions
    val: Predictions  # validation, as the final test predictions (TTA and temperature)
    val_raw: Predictions  # validation with TTA, no temperature (for ensembles' calibration)
    threshold: float | None  # on p(positive); None for more than two classes
    files: list[Path] = field(default_factory=list)
    # Per test image, whether the model's out-of-distribution referral refers it (None: the
    # run fits no referral): what a cascade (cv.cascade) routes by.
    referred: np.ndarray | None = None

    @property
    def test_raw(self) -> Predictions:
        """Test with TTA (when on), no temperature: what an ensemble's members contribute."""
        return self.plain if self.tta is None else self.tta


# (split name, TTA mode) -> p(class) of that split's images: a shortcut to the model's own
# predictions, e.g. from cached frozen-backbone features.
SplitPredictor = Callable[[str, str], np.ndarray]


INFERENCE_BATCH = 64  # evaluation has no gradients to hold: larger batches run faster


def views_of_both(model: keras.Model, splits: Splits, batch_size: int,
                  tta: str) -> SplitPredictor:
    """Test and validation images through the model once, in every view the evaluation needs
    (the plain prediction is view 0 of every TTA's)."""
    n_test = len(splits.test)
    images = np.concatenate([splits.test.images, splits.val.images])
    views = predict_views(model, images, max(batch_size, INFERENCE_BATCH), TTA_VIEWS[tta])

    def predict(name: str, mode: str) -> np.ndarray:
        part = views[:, :n_test] if name == "test" else views[:, n_test:]
        return part[[TTA_VIEWS[tta].index(v) for v in TTA_VIEWS[mode]]].mean(axis=0)
    return predict


def evaluate_model(model: keras.Model, splits: Splits, positive: int, settings: EvalSettings,
                   batch_size: int, folder: Path,
                   predict: SplitPredictor | None = None) -> Evaluation:
    """Evaluate on the test split once, with everything chosen on validation first.

    Logs test_* (plain), test_tta_* (dihedral TTA), bootstrap intervals for both; then, on
    the final predictions (TTA when on): temperature fitted on validation, ECE before/after,
    the threshold chosen on validation and test sensitivity/specificity at it (test_op_*).
    `predict` replaces running `model` on the images (Grad-CAM still runs the model).
    """
    folder.mkdir(parents=True, exist_ok=True)
    class_names = list(splits.class_names)
    predict = predict or views_of_both(model, splits, batch_size, settings.tta)

    def predict_split(name: str, tta: str) -> Predictions:
        split = getattr(splits, name)
        return Predictions(split.files, np.asarray(split.labels, dtype=int), predict(name, tta),
                           split.groups, split.sources)

    plain = predict_split("test", "none")
    metrics = {**classification_metrics(plain, positive, "test_"),
               **interval_metrics(plain, positive, settings, "test_")}
    tta = None
    if settings.tta != "none":
        tta = predict_split("test", settings.tta)
        metrics.update(classification_metrics(tta, positive, "test_tta_"))
        metrics.update(interval_metrics(tta, positive, settings, "test_tta_"))
    test = plain if tta is None else tta
    val_raw = predict_split("val", settings.tta)
    test, val, calibration_files = calibrate(test, val_raw, settings, metrics, folder)
    threshold = None
    if len(class_names) == 2:
        val_truth = (val.labels == positive).astype(int)
        threshold = stats.choose_threshold(val_truth, val.probabilities[:, positive],
                                           settings.threshold, settings.fixed_threshold,
                                           settings.target_sensitivity)
        metrics["val_threshold"] = threshold
        metrics.update(interval_metrics(test, positive, settings, "test_op_", threshold))
    metrics.update(per_source_metrics(test, positive, threshold, settings))
    metrics.update(patient_metrics(test, positive, threshold, settings, "test_"))
    files = [write_predictions(plain, class_names, folder / "test_predictions.csv",
                               final=test, threshold=threshold, positive=positive),
             write_predictions(val_raw, class_names, folder / "val_predictions.csv"),
             *calibration_files]
    if test.groups is not None:
        files.append(write_patients([test], class_names, positive, [threshold],
                                    folder / "test_patients.csv"))
        figure = plot_patients(test, class_names, positive,
                               decision_line(threshold, len(class_names)),
                               folder / "test_patients.png", "patients, test split")
        files += [figure] if figure is not None else []
    if settings.gradcam_images:
        files += gradcam.save_overlays(model, splits.test.images, list(splits.test.files),
                                       plain.labels, plain.probabilities, class_names,
                                       settings.gradcam_images, folder / "gradcam")
    return Evaluation(metrics, plain, tta, test, val, val_raw, threshold, files)


def calibrate(test: Predictions, val: Predictions, settings: EvalSettings,
              metrics: dict[str, float], folder: Path
              ) -> tuple[Predictions, Predictions, list[Path]]:
    """ECE before and after temperature scaling (fitted on validation) and the reliability
    diagram; returns test and validation predictions with the temperature applied."""
    before = stats.reliability_bins(test.labels, test.probabilities, settings.calibration_bins)
    metrics["test_ece"] = before.ece
    curves = {"as trained": before}
    if settings.temperature_scaling:
        temperature = stats.fit_temperature(val.labels, val.probabilities)
        test = dataclasses.replace(
            test, probabilities=apply_temperature(test.probabilities, temperature))
        val = dataclasses.replace(
            val, probabilities=apply_temperature(val.probabilities, temperature))
        after = stats.reliability_bins(test.labels, test.probabilities,
                                       settings.calibration_bins)
        metrics.update({"temperature": temperature, "test_ece_calibrated": after.ece,
                        "test_loss_calibrated": stats.negative_log_likelihood(
                            test.labels, test.probabilities)})
        curves[f"temperature {temperature:.2f}"] = after
    return test, val, [plot_reliability(curves, folder / "reliability_diagram.png")]
