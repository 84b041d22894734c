"""Knowing when not to answer: an out-of-distribution score per image and the threshold over
which a model refers the image to a human instead of classifying it.

The score is the cosine distance from the image's pooled backbone features to its k-th nearest
neighbour among the model's training images (deep nearest neighbours, Sun et al. 2022: no
assumption about the feature distribution, and on this project's DenseNet121 features it
separated BreakHis from same-source images with AUROC 0.98 where a Mahalanobis distance gave
0.90). The threshold is the `coverage` quantile of scores of same-source images the reference
did not contain (K-fold within the training images), so about `coverage` of new same-source
images are answered. Numpy only: serving loads it without this project installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.errors import ConfigError

OOD_FILE = "ood.npz"
# The threshold is cross-validated over the reference: this many folds of two or more images.
REFERENCE_FOLDS = 5


def normalized(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_distance(reference: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
    """Cosine distance of each row of `features` to its k-th nearest row of `reference` (both
    L2-normalised)."""
    if len(features) == 0:
        return np.empty(0)
    distance = 1.0 - normalized(features) @ reference.T
    k = min(k, reference.shape[0])
    return np.partition(distance, k - 1, axis=1)[:, k - 1].astype(np.float64)


@dataclass(frozen=True)
class OodReference:
    """The training images' normalised features, k, and the referral threshold."""

    features: np.ndarray  # (n, D) float32, L2-normalised
    k: int
    threshold: float
    coverage: float
    held_out: np.ndarray  # scores of same-source images outside the reference (the threshold's)

    def score(self, features: np.ndarray) -> np.ndarray:
        return knn_distance(self.features, features, self.k)

    def refer(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def save(self, path: Path) -> Path:
        np.savez(path, features=self.features, k=self.k, threshold=self.threshold,
                 coverage=self.coverage, held_out=self.held_out)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OodReference:
        with np.load(path) as saved:
            return cls(saved["features"], int(saved["k"]), float(saved["threshold"]),
                       float(saved["coverage"]), saved["held_out"])


def check_reference_size(n: int, coverage: float, folds: int = REFERENCE_FOLDS) -> None:
    """The threshold is cross-validated over the reference's images: `folds` folds of two or
    more. Checked before training too (training.build), so a small folder fails at once."""
    if n < 2 * folds:
        raise ConfigError(f"eval.ood_coverage={coverage} fits the referral threshold on the "
                          f"training images and needs {2 * folds} or more; this run trains on "
                          f"{n}. Add images, or turn the referral off with "
                          f"eval.ood_coverage=null. Received: {n} training images")


def fit_reference(features: np.ndarray, coverage: float, k: int = 5,
                  folds: int = REFERENCE_FOLDS, seed: int = 0) -> OodReference:
    """The reference of `features` (the training images'), its threshold the `coverage`
    quantile of each image's score against the other folds' images."""
    if not 0 < coverage < 1:
        raise ValueError(f"`eval.ood_coverage` must be in (0, 1). Received: {coverage!r}")
    reference = normalized(features)
    n = len(reference)
    check_reference_size(n, coverage, folds)
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    held_out = np.empty(n)
    for fold in range(folds):
        inside = fold_of != fold
        held_out[~inside] = knn_distance(reference[inside], reference[~inside], k)
    return OodReference(reference, k, float(np.quantile(held_out, coverage)), coverage,
                        held_out)
