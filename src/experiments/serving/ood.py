"""Knowing when not to answer: an out-of-distribution score per image and the threshold over
which a model refers the image to a human instead of classifying it.

The score measures the cosine distance from the image's pooled backbone features to its k-th
nearest neighbour among the model's training images (deep nearest neighbours, Sun et al. 2022:
no assumption about the feature distribution, and on this project's DenseNet121 features it
separated BreakHis from same-source images with AUROC 0.98 where a Mahalanobis distance gave
0.90). With `stain` (eval.ood_stain) it adds the distance of the image's optical-density
statistics to the training images' (`stain_statistics`), each distance in units of its
held-out same-source spread: a network fed stain-normalised images cannot see that a slide
was stained or scanned elsewhere, and the statistics of the raw pixels can (BreakHis against
the seed images with the scratch model of `histology_cpu`: AUROC 0.76 on its features, 0.98
with both; benchmarks/README, session 16). The threshold is the `coverage` quantile of scores
of same-source images the reference did not contain (K-fold within the training images), so
about `coverage` of new same-source images are answered. Numpy only: serving loads it without
this project installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.errors import ConfigError

OOD_FILE = "ood.npz"
# The threshold is cross-validated over the reference: this many folds of two or more images.
REFERENCE_FOLDS = 5
# The optical-density percentiles `stain_statistics` takes per channel, besides mean and spread.
STAIN_QUANTILES = (0.1, 0.5, 0.9)
STAIN_CHUNK = 64  # images at a time: the histograms of a large folder need not fit in memory
# The optical density of each uint8 level.
LEVEL_DENSITY = -np.log((np.arange(256) + 1) / 256)
# The least spread a distance is divided by: float32 features carry rounding of about 1e-6 in a
# cosine distance, which a model whose features barely vary (an untrained one: spread 1e-6)
# would magnify into the score. Trained models' spreads are 0.008-0.02 (features) and 0.7-0.8
# (stain).
MIN_SPREAD = 1e-3


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


def stain_statistics(images: np.ndarray) -> np.ndarray:
    """(n, 5 * channels): per channel of each uint8 image (others are rounded to it), the
    mean, standard deviation and `STAIN_QUANTILES` of its optical density -log((I + 1) / 256)
    - how much of which dye the slide took up and how the scanner rendered it, whatever the
    tissue shows."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    channels = images.shape[-1] if images.ndim == 4 else 3
    rows = [np.empty((0, (2 + len(STAIN_QUANTILES)) * channels), np.float32)]
    for start in range(0, len(images), STAIN_CHUNK):
        rows.append(density_statistics(images[start:start + STAIN_CHUNK]))
    return np.concatenate(rows).astype(np.float32)


def density_statistics(images: np.ndarray) -> np.ndarray:
    """`stain_statistics` of a few uint8 images, from each channel's histogram of its 256
    levels: exact as np.mean/std/quantile (linear interpolation) of the densities, 10x
    faster (0.5 ms per 224 px image)."""
    n, channels = len(images), images.shape[-1]
    pixels = images.shape[1] * images.shape[2]
    offsets = (np.arange(n * channels, dtype=np.int32) * 256).reshape(n, 1, 1, channels)
    counts = np.bincount((images + offsets).ravel(), minlength=n * channels * 256)
    counts = counts.reshape(n, channels, 256)[..., ::-1]  # densities ascending
    levels = LEVEL_DENSITY[::-1]
    mean = counts @ levels / pixels
    statistics = [mean, np.sqrt(np.maximum(counts @ levels ** 2 / pixels - mean ** 2, 0.0))]
    cumulative = np.cumsum(counts, axis=-1)
    for quantile in STAIN_QUANTILES:  # between the order statistics around (pixels - 1) q
        position = (pixels - 1) * quantile
        below, above = int(np.floor(position)), int(np.ceil(position))
        low = levels[(cumulative <= below).sum(axis=-1)]
        high = levels[(cumulative <= above).sum(axis=-1)]
        statistics.append(low + (position - below) * (high - low))
    return np.concatenate(statistics, axis=1)


def euclidean_knn_distance(reference: np.ndarray, statistics: np.ndarray,
                           k: int) -> np.ndarray:
    """Euclidean distance of each row of `statistics` to its k-th nearest row of
    `reference`."""
    if len(statistics) == 0:
        return np.empty(0)
    statistics, reference = statistics.astype(np.float64), reference.astype(np.float64)
    squared = ((statistics ** 2).sum(axis=1)[:, None] - 2 * statistics @ reference.T
               + (reference ** 2).sum(axis=1)[None, :])
    k = min(k, reference.shape[0])
    return np.sqrt(np.maximum(np.partition(squared, k - 1, axis=1)[:, k - 1], 0.0))


@dataclass(frozen=True)
class StainReference:
    """The training images' standardised stain statistics and how a distance to them adds to
    the feature distance: each distance minus its held-out mean, over its held-out standard
    deviation (`spread`: feature mean, feature sd, stain mean, stain sd)."""

    statistics: np.ndarray  # (n, S) float32, standardised by center and scale
    center: np.ndarray
    scale: np.ndarray
    spread: np.ndarray

    @classmethod
    def of(cls, statistics: np.ndarray) -> StainReference:
        """Standardised by its own mean and spread (a statistic equal on every training image
        by 1e-6); `spread` set by `with_spread`."""
        center, scale = statistics.mean(axis=0), np.maximum(statistics.std(axis=0), 1e-6)
        return cls(((statistics - center) / scale).astype(np.float32), center, scale,
                   np.array([0.0, 1.0, 0.0, 1.0]))

    def distance(self, statistics: np.ndarray, k: int) -> np.ndarray:
        return euclidean_knn_distance(self.statistics, (statistics - self.center) / self.scale,
                                      k)

    def with_spread(self, features: np.ndarray, stain: np.ndarray) -> StainReference:
        """This reference combining distances by the spreads of held-out ones."""
        spread = np.array([features.mean(), max(features.std(), MIN_SPREAD), stain.mean(),
                           max(stain.std(), MIN_SPREAD)])
        return StainReference(self.statistics, self.center, self.scale, spread)

    def combined(self, features: np.ndarray, stain: np.ndarray) -> np.ndarray:
        return ((features - self.spread[0]) / self.spread[1]
                + (stain - self.spread[2]) / self.spread[3])


@dataclass(frozen=True)
class OodReference:
    """The training images' normalised features (and stain statistics), k, and the referral
    threshold."""

    features: np.ndarray  # (n, D) float32, L2-normalised
    k: int
    threshold: float
    coverage: float
    held_out: np.ndarray  # scores of same-source images outside the reference (the threshold's)
    stain: StainReference | None = None

    def score(self, features: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        """Each image's score from its pooled `features` (and, for a reference with stain
        statistics, its uint8 `images` as the model takes them)."""
        distance = knn_distance(self.features, features, self.k)
        if self.stain is None:
            return distance
        if images is None:
            raise ValueError("This out-of-distribution reference also measures stain "
                             "statistics: score(features, images) needs the images")
        stain = self.stain.distance(stain_statistics(images), self.k)
        return self.stain.combined(distance, stain)

    def refer(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def save(self, path: Path) -> Path:
        arrays: dict[str, Any] = {
            "features": self.features, "k": self.k, "threshold": self.threshold,
            "coverage": self.coverage, "held_out": self.held_out}
        if self.stain is not None:
            arrays |= {"stain_statistics": self.stain.statistics,
                       "stain_center": self.stain.center, "stain_scale": self.stain.scale,
                       "stain_spread": self.stain.spread}
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OodReference:
        """A saved reference; one saved before stain statistics scores features alone."""
        with np.load(path) as saved:
            stain = (StainReference(saved["stain_statistics"], saved["stain_center"],
                                    saved["stain_scale"], saved["stain_spread"])
                     if "stain_statistics" in saved else None)
            return cls(saved["features"], int(saved["k"]), float(saved["threshold"]),
                       float(saved["coverage"]), saved["held_out"], stain)


def check_reference_size(n: int, coverage: float, folds: int = REFERENCE_FOLDS) -> None:
    """The threshold is cross-validated over the reference's images: `folds` folds of two or
    more. Checked before training too (training.build), so a small folder fails at once."""
    if n < 2 * folds:
        raise ConfigError(f"eval.ood_coverage={coverage} fits the referral threshold on the "
                          f"training images and needs {2 * folds} or more; this run trains on "
                          f"{n}. Add images, or turn the referral off with "
                          f"eval.ood_coverage=null. Received: {n} training images")


def reference_folds(n: int, folds: int = REFERENCE_FOLDS, seed: int = 0) -> np.ndarray:
    """The fold of each of a reference's n images, for its held-out scores."""
    return np.random.default_rng(seed).permutation(n) % folds


def held_out_distances(rows: np.ndarray, distance: Callable[[np.ndarray, np.ndarray, int],
                                                             np.ndarray],
                       k: int, fold_of: np.ndarray) -> np.ndarray:
    """Each row's `distance(reference, queries, k)` to the rows of the other folds."""
    held_out = np.empty(len(rows))
    for fold in np.unique(fold_of):
        inside = fold_of != fold
        held_out[~inside] = distance(rows[inside], rows[~inside], k)
    return held_out


def fit_reference(features: np.ndarray, coverage: float, k: int = 5,
                  folds: int = REFERENCE_FOLDS, seed: int = 0,
                  images: np.ndarray | None = None) -> OodReference:
    """The reference of `features` (the training images'; with their uint8 `images`, of
    their stain statistics too), its threshold the `coverage` quantile of each image's score
    against the other folds' images."""
    if not 0 < coverage < 1:
        raise ValueError(f"`eval.ood_coverage` must be in (0, 1). Received: {coverage!r}")
    reference = normalized(features)
    n = len(reference)
    check_reference_size(n, coverage, folds)
    if images is not None and len(images) != n:
        raise ValueError(f"fit_reference got {n} feature rows and {len(images)} images")
    stain = None if images is None else StainReference.of(stain_statistics(images))
    fold_of = reference_folds(n, folds, seed)
    held_out = held_out_distances(reference, knn_distance, k, fold_of)
    if stain is not None:
        held_out_stain = held_out_distances(stain.statistics, euclidean_knn_distance, k,
                                            fold_of)
        stain = stain.with_spread(held_out, held_out_stain)
        held_out = stain.combined(held_out, held_out_stain)
    return OodReference(reference, k, float(np.quantile(held_out, coverage)), coverage,
                        held_out, stain)
