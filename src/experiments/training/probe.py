"""`finetune=linear_probe`: how good are a backbone's frozen features for this task?

The standard way pathology papers compare feature extractors: a logistic regression on the
pooled features (scikit-learn; its regularisation C chosen by a cross-validation of the log-loss
on the training images, as the refit of a cross-validation chooses it) and a
k-nearest-neighbour classifier (k chosen on validation by accuracy), both on cached
features (`experiments.features`). The logistic regression becomes the run's model: the
features' standardisation is written into the head's BatchNormalization and the coefficients
into its Dense layer, so the saved classifier (backbone -> pooling -> head) predicts exactly what
the regression does and is evaluated, served and predicted with like any other run. The k-NN
is reported beside it (knn_test_*).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from experiments.config.schema import EvalConfig
from experiments.errors import ConfigError
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
    result's model); log C, k and the k-NN's test metrics.

    The regression is fitted as the cross-validation refit fits it (C by an inner
    cross-validation of the training split, `search`): a fold's model, whose predictions
    give the refit its temperature and threshold, is trained the way the shipped model is,
    and the validation split stays held out for the operating point. C chosen on the
    validation split instead gave worse-calibrated shipped models (benchmarks/
    operating_point.py, two sources: held-out ECE 0.104 -> 0.081 on the first, 0.117 ->
    0.104 on the second)."""
    splits, classifier = prepared.splits, prepared.model
    x_val, y_val = cached["val"][:, 0].astype(np.float64), np.asarray(splits.val.labels)
    labels = list(range(len(splits.class_names)))
    train_labels = np.asarray(splits.train.labels)
    with threadpool_limits(BLAS_THREADS, user_api="blas"):  # both probes' fits
        best, mean, scale = search(cached["train"], train_labels, seed,
                                   classifier.get_layer("head_bn").epsilon,
                                   inner_folds(train_labels, splits.train.groups),
                                   splits.train.strata(), splits.train.groups)
        write_into_head(classifier, best, mean, scale)
        # No checkpoint file: the fitted classifier is returned in memory and logged as the
        # run's model (saving it too cost 1-2 s per fold of a backbone comparison).
        checkpoint = find_checkpoint(prepared.callbacks)
        z_val = (x_val - mean) / scale
        val_metrics = {"val_loss": float(log_loss(y_val, best.predict_proba(z_val),
                                                  labels=labels)),
                       "val_accuracy": float(np.mean(best.predict(z_val) == y_val))}
        records.log_metrics({"probe_C": best.C, **val_metrics})
        views, width = cached["train"].shape[1:]
        z_train = (cached["train"].reshape(-1, width) - mean) / scale
        records.log_metrics(knn_metrics(z_train, np.repeat(train_labels, views), z_val, y_val,
                                        (cached["test"][:, 0] - mean) / scale, splits,
                                        prepared, settings))
    value = val_metrics.get(checkpoint.monitor, float("nan"))
    return TrainResult({}, 1, value, checkpoint.monitor, monitor_increases(checkpoint),
                       Path(checkpoint.filepath), model=classifier)


def inner_folds(labels: np.ndarray, groups: Sequence[str] | None, most: int = 5) -> int:
    """How many folds the search for C can have: at most `most`, at most the number of
    images (patients, with groups) of the rarest class."""
    if groups is None:
        units = np.unique(labels, return_counts=True)[1].tolist()
    else:
        units = [len(set(np.asarray(groups)[labels == label])) for label in np.unique(labels)]
    fewest = min(units)
    if fewest < 2:
        unit = "images" if groups is None else "patients (groups)"
        raise ConfigError(f"finetune=linear_probe chooses its regularisation by cross-"
                          f"validation on the training images: it needs 2 or more {unit} of "
                          f"each class there. Received: {fewest} in the rarest class")
    return min(most, fewest)


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


def search(features: np.ndarray, labels: np.ndarray, seed: int, epsilon: float,
           folds: int = 5, strata: np.ndarray | None = None,
           groups: Sequence[str] | None = None
           ) -> tuple[LogisticRegression, np.ndarray, np.ndarray]:
    """The regression on (n, views, C) features of images, its C chosen by a stratified
    `folds`-fold cross-validation of the log-loss on these images (an image's views stay in
    one fold; with `groups`, a patient's images too - else C is chosen on patients the
    regression has already seen, too weakly regularised; stratified on `strata`, e.g. label x
    source, else the labels). Returns it with the features' standardisation."""
    views = features.shape[1]
    x = features.reshape(-1, features.shape[-1]).astype(np.float64)
    y = np.repeat(np.asarray(labels), views)
    mean, scale = standardize(x, epsilon)
    z = (x - mean) / scale
    splits = view_folds(np.asarray(labels) if strata is None else strata, views, folds, seed,
                        groups)
    found = LogisticRegressionCV(Cs=list(C_GRID), cv=splits, scoring="neg_log_loss",
                                 l1_ratios=(0.0,), use_legacy_attributes=False,
                                 max_iter=5000, random_state=seed).fit(z, y)
    best = LogisticRegression(C=float(found.C_), max_iter=5000, random_state=seed).fit(z, y)
    return best, mean, scale


def refit(classifier, features: np.ndarray, labels: np.ndarray, seed: int,
          folds: int = 5, strata: np.ndarray | None = None,
          groups: Sequence[str] | None = None) -> float:
    """cv.refit for finetune=linear_probe: the regression on every image's features (C by
    `search`), written into the classifier's head. Returns C."""
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        best, mean, scale = search(features, labels, seed,
                                   classifier.get_layer("head_bn").epsilon, folds, strata,
                                   groups)
    write_into_head(classifier, best, mean, scale)
    return float(best.C)
