"""`finetune=linear_probe`: how good are a backbone's frozen features for this task?

The standard way pathology papers compare feature extractors: a logistic regression on the
pooled features (scikit-learn; its regularisation C chosen on the validation split by log-loss)
and a k-nearest-neighbour classifier (k chosen on validation by accuracy), both on cached
features (`experiments.features`). The logistic regression becomes the run's model: the
features' standardisation is written into the head's BatchNormalization and the coefficients
into its Dense layer, so the saved classifier (backbone -> pooling -> head) predicts exactly what
the regression does and is evaluated, served and predicted with like any other run. The k-NN
is reported beside it (knn_test_*).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from experiments.config.schema import EvalConfig
from experiments.evaluation import metrics as metrics_lib
from experiments.evaluation.metrics import Predictions
from experiments.tracking import records
from experiments.training.build import Prepared
from experiments.training.callbacks import TrainResult, find_checkpoint, monitor_increases

C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))
K_GRID = (1, 3, 5, 7, 9, 11, 15, 21)
# The regressions' work is matrix-vector products of a few thousand rows: OpenBLAS splitting
# each over two threads made them 5-10x slower than one thread (a DenseNet201 refit's C search
# 17.6 s -> 2.9 s on the 2-core EPYC), so the probe fits on one BLAS thread.
BLAS_THREADS = 1


def standardize(train: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Feature means and scales as the head's BatchNormalization will apply them."""
    mean = train.mean(axis=0)
    return mean, np.sqrt(train.var(axis=0) + epsilon)


def fit(prepared: Prepared, cached: dict[str, np.ndarray], settings: EvalConfig,
        seed: int) -> TrainResult:
    """Fit both probes and write the regression into the classifier (returned as the
    result's model); log C, k and the k-NN's test metrics."""
    splits, classifier = prepared.splits, prepared.model
    views = cached["train"].shape[1]  # dihedral views are more training images, exact ones
    x_train = cached["train"].reshape(-1, cached["train"].shape[-1]).astype(np.float64)
    y_train = np.repeat(np.asarray(splits.train.labels), views)
    x_val, y_val = cached["val"][:, 0].astype(np.float64), np.asarray(splits.val.labels)
    bn = classifier.get_layer("head_bn")
    mean, scale = standardize(x_train, bn.epsilon)
    z_train, z_val = (x_train - mean) / scale, (x_val - mean) / scale
    n_classes = len(splits.class_names)
    labels = list(range(n_classes))

    def val_loss(model) -> float:
        return float(log_loss(y_val, model.predict_proba(z_val), labels=labels))

    with threadpool_limits(BLAS_THREADS, user_api="blas"):  # both probes' fits
        best = min(regularisation_path(z_train, y_train, seed), key=val_loss)
        write_into_head(classifier, best, mean, scale)
        # No checkpoint file: the fitted classifier is returned in memory and logged as the
        # run's model (saving it too cost 1-2 s per fold of a backbone comparison).
        checkpoint = find_checkpoint(prepared.callbacks)
        val_metrics = {"val_loss": val_loss(best),
                       "val_accuracy": float(np.mean(best.predict(z_val) == y_val))}
        records.log_metrics({"probe_C": best.C, **val_metrics})
        records.log_metrics(knn_metrics(z_train, y_train, z_val, y_val,
                                        (cached["test"][:, 0] - mean) / scale, splits,
                                        prepared, settings))
    value = val_metrics.get(checkpoint.monitor, float("nan"))
    return TrainResult({}, 1, value, checkpoint.monitor, monitor_increases(checkpoint),
                       Path(checkpoint.filepath), model=classifier)


def regularisation_path(z: np.ndarray, y: np.ndarray, seed: int) -> list[LogisticRegression]:
    """One regression per C of C_GRID, in increasing C, each solved from the previous one's
    coefficients (warm start): the same optima (the loss is convex), in a fraction of the
    iterations - weakly regularised fits on wide features otherwise take seconds each."""
    model = LogisticRegression(max_iter=5000, random_state=seed, warm_start=True)
    fits = []
    for c in sorted(C_GRID):
        model.set_params(C=c).fit(z, y)
        fits.append(copy.deepcopy(model))
    return fits


def write_into_head(classifier, regression: LogisticRegression, mean: np.ndarray,
                    scale: np.ndarray) -> None:
    """head_bn standardises (moving mean/variance = the features' mean and scale, gamma 1,
    beta 0; dropout is off at inference) and the Dense softmax reproduces the regression:
    binary p1 = sigmoid(w.z + b) = softmax([-(w.z + b)/2, (w.z + b)/2])."""
    bn = classifier.get_layer("head_bn")
    bn.set_weights([np.ones_like(mean), np.zeros_like(mean), mean,
                    scale ** 2 - bn.epsilon])
    coef, intercept = regression.coef_, regression.intercept_
    if coef.shape[0] == 1:  # binary: one row for class 1
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    classifier.get_layer("predictions").set_weights([coef.T.astype(np.float32),
                                                     intercept.astype(np.float32)])


def knn_metrics(z_train: np.ndarray, y_train: np.ndarray, z_val: np.ndarray, y_val: np.ndarray,
                z_test: np.ndarray, splits, prepared: Prepared,
                settings: EvalConfig) -> dict[str, float]:
    """k-NN (cosine distance on standardised features), k chosen on validation accuracy;
    its test metrics with bootstrap intervals as knn_test_*."""
    ks = [k for k in K_GRID if k <= len(z_train)]

    def knn(k: int) -> KNeighborsClassifier:
        return KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(z_train, y_train)

    best_k = max(ks, key=lambda k: (np.mean(knn(k).predict(z_val) == y_val), k))
    test = Predictions(splits.test.files, np.asarray(splits.test.labels),
                       knn(best_k).predict_proba(z_test), splits.test.groups)
    return {"knn_k": best_k,
            **metrics_lib.classification_metrics(test, prepared.positive, "knn_test_"),
            **metrics_lib.interval_metrics(test, prepared.positive, settings, "knn_test_")}


def view_folds(strata: np.ndarray, views: int, folds: int, seed: int,
               groups: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) row indices of a stratified K-fold over images whose `views` rows
    each sit together (image i: rows i*views .. i*views + views - 1); whole groups stay in one
    fold when `groups` is given."""
    index = np.zeros(len(strata))
    by_image = (StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(
        index, strata) if groups is None else StratifiedGroupKFold(
        n_splits=folds, shuffle=True, random_state=seed).split(index, strata, groups))
    return [(np.concatenate([np.arange(i * views, (i + 1) * views) for i in train]),
             np.concatenate([np.arange(i * views, (i + 1) * views) for i in held_out]))
            for train, held_out in by_image]


def refit(classifier, features: np.ndarray, labels: np.ndarray, seed: int,
          folds: int = 5, strata: np.ndarray | None = None,
          groups: Sequence[str] | None = None) -> float:
    """cv.refit for finetune=linear_probe: the regression on every image's features, its C
    chosen by a stratified `folds`-fold cross-validation of the log-loss on these images (an
    image's dihedral views stay in one fold; with `groups`, a patient's images too - else C is
    chosen on patients the regression has already seen, too weakly regularised; stratified
    on `strata`, e.g. label x source, else the labels), written into the classifier's head.
    Returns C."""
    views = features.shape[1]
    x = features.reshape(-1, features.shape[-1]).astype(np.float64)
    y = np.repeat(np.asarray(labels), views)
    mean, scale = standardize(x, classifier.get_layer("head_bn").epsilon)
    z = (x - mean) / scale
    splits = view_folds(np.asarray(labels) if strata is None else strata, views, folds, seed,
                        groups)
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        search = LogisticRegressionCV(Cs=list(C_GRID), cv=splits, scoring="neg_log_loss",
                                      l1_ratios=(0.0,), use_legacy_attributes=False,
                                      max_iter=5000, random_state=seed).fit(z, y)
        chosen = float(search.C_)
        best = LogisticRegression(C=chosen, max_iter=5000, random_state=seed).fit(z, y)
    write_into_head(classifier, best, mean, scale)
    return chosen
