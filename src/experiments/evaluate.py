"""Test-split evaluation: predictions (plain and test-time augmented), metrics
(scikit-learn) with bootstrap intervals, the operating point and calibration chosen on
validation, figures (matplotlib) and Grad-CAM overlays."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from experiments import gradcam, stats  # noqa: E402
from experiments.data import Splits  # noqa: E402
from experiments.errors import ConfigError
from experiments.inference import apply_temperature, decide, predict_views  # noqa: E402
from experiments.schema import EvalConfig as EvalSettings  # noqa: E402


@dataclass(frozen=True)
class Predictions:
    files: tuple[str, ...]
    labels: np.ndarray  # (n,) int
    probabilities: np.ndarray  # (n, n_classes) float


def positive_index(class_names: Sequence[str], positive_class: str | None) -> int:
    """Index of the class whose recall is the sensitivity; default: the last class by name."""
    if positive_class is None:
        return len(class_names) - 1
    if positive_class not in class_names:
        raise ConfigError(f"data.positive_class must be one of {list(class_names)}. "
                          f"Received: data.positive_class={positive_class!r}")
    return list(class_names).index(positive_class)


def classification_metrics(pred: Predictions, positive: int,
                           prefix: str = "test_") -> dict[str, float]:
    """<prefix>* metrics. Two classes: precision/recall/F1 of the positive class, specificity =
    recall of the other, ROC-AUC of p(positive). More classes: macro averages, one-vs-rest AUC."""
    y, p = pred.labels, pred.probabilities
    n_classes = p.shape[1]
    y_hat = p.argmax(axis=1)
    one_hot = np.eye(n_classes)[y]
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    if n_classes == 2:
        loss = -np.mean(one_hot * np.log(clipped) + (1 - one_hot) * np.log(1 - clipped))
        truth, guess = (y == positive).astype(int), (y_hat == positive).astype(int)
        out = {
            "precision": skm.precision_score(truth, guess, zero_division=0),
            "recall": skm.recall_score(truth, guess, zero_division=0),
            "specificity": skm.recall_score(1 - truth, 1 - guess, zero_division=0),
            "f1": skm.f1_score(truth, guess, zero_division=0),
            "roc_auc": skm.roc_auc_score(truth, p[:, positive]),
        }
    else:
        loss = -np.mean(np.sum(one_hot * np.log(clipped), axis=1))
        cm = skm.confusion_matrix(y, y_hat, labels=range(n_classes))
        negatives = cm.sum() - cm.sum(axis=1)
        true_negatives = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
        out = {
            "precision": skm.precision_score(y, y_hat, average="macro", zero_division=0),
            "recall": skm.recall_score(y, y_hat, average="macro", zero_division=0),
            "specificity": float(np.mean(true_negatives / np.maximum(negatives, 1))),
            "f1": skm.f1_score(y, y_hat, average="macro", zero_division=0),
            "roc_auc": skm.roc_auc_score(y, p, multi_class="ovr", labels=range(n_classes)),
        }
    out["accuracy"] = skm.accuracy_score(y, y_hat)
    out["loss"] = loss
    return {f"{prefix}{k}": float(v) for k, v in out.items()}


def write_predictions(pred: Predictions, class_names: Sequence[str], path: Path,
                      final: Predictions | None = None, threshold: float | None = None,
                      positive: int = 1) -> Path:
    """One row per test image: file, label, predicted, p_<class> for every class; with `final`
    (after TTA/temperature) also final_p_<class> and, given a threshold, the decision at it."""
    header = ["file", "label", "predicted", *[f"p_{c}" for c in class_names]]
    columns = [[class_names[label] for label in pred.labels], predicted_names(pred, class_names),
               *probability_columns(pred)]
    if final is not None:
        header += [f"final_p_{c}" for c in class_names]
        columns += probability_columns(final)
        if threshold is not None:
            header.append("decision_at_threshold")
            columns.append([class_names[i] for i in
                            decide(final.probabilities, positive, threshold)])
    return write_table(path, header, [pred.files, *columns])


def predicted_names(pred: Predictions, class_names: Sequence[str]) -> list[str]:
    return [class_names[int(i)] for i in pred.probabilities.argmax(axis=1)]


def probability_columns(pred: Predictions) -> list[list[str]]:
    return [[f"{v:.6f}" for v in column] for column in pred.probabilities.T]


def write_table(path: Path, header: Sequence[str], columns: Sequence[Sequence]) -> Path:
    """A CSV of equally long columns."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(zip(*columns, strict=True))
    return path


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curve(history: dict[str, list[float]], metric: str, best_epoch: int, path: Path) -> Path:
    """Train and validation `metric` per epoch, with the selected epoch marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
        if key in history:
            epochs = range(1, len(history[key]) + 1)
            ax.plot(epochs, history[key], marker="o", markersize=3, label=label)
    ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(pred: Predictions, class_names: Sequence[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    skm.ConfusionMatrixDisplay.from_predictions(
        pred.labels, pred.probabilities.argmax(axis=1), labels=list(range(len(class_names))),
        display_labels=list(class_names), cmap="Blues", colorbar=False, ax=ax)
    ax.set_title("test confusion matrix")
    return _save(fig, path)


def plot_roc_curve(pred: Predictions, class_names: Sequence[str], positive: int,
                   path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    targets = [positive] if len(class_names) == 2 else range(len(class_names))
    for index in targets:
        skm.RocCurveDisplay.from_predictions(
            pred.labels == index, pred.probabilities[:, index], name=class_names[index], ax=ax)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_title("test ROC curve")
    return _save(fig, path)


def write_report(pred: Predictions, class_names: Sequence[str], positive: int,
                 history: dict[str, list[float]], best_epoch: int, folder: Path) -> list[Path]:
    """The four figures of the plain test predictions, written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    curves = [plot_curve(history, metric, best_epoch, folder / f"{metric}_curve.png")
              for metric in ("loss", "accuracy") if history.get(metric)]  # none: no epochs
    return [*curves,
            plot_confusion_matrix(pred, class_names, folder / "confusion_matrix.png"),
            plot_roc_curve(pred, class_names, positive, folder / "roc_curve.png")]


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

    @property
    def test_raw(self) -> Predictions:
        """Test with TTA (when on), no temperature: what an ensemble's members contribute."""
        return self.plain if self.tta is None else self.tta


def interval_metrics(pred: Predictions, positive: int, settings: EvalSettings, prefix: str,
                     threshold: float = 0.5) -> dict[str, float]:
    """Point estimates and bootstrap interval bounds: <prefix><metric>, _ci_low, _ci_high."""
    intervals = stats.bootstrap_intervals(pred.labels, pred.probabilities, positive, threshold,
                                          settings.bootstrap_resamples, settings.confidence,
                                          settings.seed)
    out = {}
    for name, (point, low, high) in intervals.items():
        out.update({f"{prefix}{name}": point, f"{prefix}{name}_ci_low": low,
                    f"{prefix}{name}_ci_high": high})
    return out


# (split name, TTA mode) -> p(class) of that split's images: a shortcut to the model's own
# predictions, e.g. from cached frozen-backbone features.
SplitPredictor = Callable[[str, str], np.ndarray]


INFERENCE_BATCH = 64  # evaluation has no gradients to hold: larger batches run faster


def views_of_both(model: keras.Model, splits: Splits, batch_size: int,
                  tta: str) -> SplitPredictor:
    """Test and validation images through the model once, in every view the evaluation needs
    (the plain prediction is view 0 of the dihedral ones)."""
    n_test = len(splits.test)
    images = np.concatenate([splits.test.images, splits.val.images])
    views = predict_views(model, images, max(batch_size, INFERENCE_BATCH),
                          1 if tta == "none" else 8)

    def predict(name: str, mode: str) -> np.ndarray:
        part = views[:, :n_test] if name == "test" else views[:, n_test:]
        return part[:1].mean(axis=0) if mode == "none" else part.mean(axis=0)
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
        return Predictions(split.files, np.asarray(split.labels, dtype=int), predict(name, tta))

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
    files = [write_predictions(plain, class_names, folder / "test_predictions.csv",
                               final=test, threshold=threshold, positive=positive),
             write_predictions(val_raw, class_names, folder / "val_predictions.csv"),
             *calibration_files]
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
        test = Predictions(test.files, test.labels,
                           apply_temperature(test.probabilities, temperature))
        val = Predictions(val.files, val.labels,
                          apply_temperature(val.probabilities, temperature))
        after = stats.reliability_bins(test.labels, test.probabilities,
                                       settings.calibration_bins)
        metrics.update({"temperature": temperature, "test_ece_calibrated": after.ece,
                        "test_loss_calibrated": stats.negative_log_likelihood(
                            test.labels, test.probabilities)})
        curves[f"temperature {temperature:.2f}"] = after
    return test, val, [plot_reliability(curves, folder / "reliability_diagram.png")]


def plot_reliability(curves: dict[str, stats.ReliabilityBins], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, bins in curves.items():
        filled = bins.count > 0
        ax.plot(bins.confidence[filled], bins.accuracy[filled], marker="o",
                label=f"{name} (ECE {bins.ece:.3f})")
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
           title="test reliability diagram")
    ax.legend(fontsize=8)
    return _save(fig, path)
