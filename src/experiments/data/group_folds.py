"""Stratified K-fold over groups (patients) whose partition moves with the seed.

scikit-learn's StratifiedGroupKFold orders the groups by the spread of their class counts -
for groups of one class, by their size - and `shuffle` only breaks ties, so the seed barely
moves whole patients: on the seed images plus BreakHis' 16 patients, 40 seeds gave 2 distinct
patient partitions, and a recipe's "3 seeds" or `cv.repeats` tested the same patients together
again (benchmarks/README, session 25). Here each seed draws a few random orders of the groups,
puts each group in turn into the fold that keeps the strata most even (scikit-learn's measure:
the mean over strata of the spread of their shares across folds), and keeps the most even of
those partitions: 40 seeds, 40 partitions, nearly as even as scikit-learn's (the spread of
the strata's shares across folds 0.022 against 0.019) and no two patients together in more than
55% of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Random orders tried per seed: more make the partitions more even and more alike (10: spread
# 0.020, two patients together in up to 80% of seeds; benchmarks/README, session 25).
CANDIDATES = 5


def group_kfold(strata: Sequence | np.ndarray, groups: Sequence, n_splits: int, seed: int,
                candidates: int = CANDIDATES) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rest, fold) image indices of each of `n_splits` folds; every group in exactly one
    fold, each fold holding the strata (e.g. class x source) in proportion as far as whole
    groups allow; the most even of `candidates` random group orders. Raises ValueError when
    there are fewer groups than folds."""
    names, group_of = np.unique(np.asarray(groups), return_inverse=True)
    if n_splits > len(names):
        raise ValueError(f"Cannot have number of splits n_splits={n_splits} greater than the "
                         f"number of groups: {len(names)}")
    kinds, stratum_of = np.unique(np.asarray(strata), return_inverse=True)
    counts = np.zeros((len(names), len(kinds)))
    np.add.at(counts, (group_of, stratum_of), 1)
    rng = np.random.default_rng(seed)
    tried = [assign(counts, n_splits, rng) for _ in range(candidates)]
    best = min(tried, key=lambda fold_of: unevenness(per_fold(counts, fold_of, n_splits),
                                                          counts.sum(axis=0)))
    image_fold = best[group_of]
    index = np.arange(len(group_of))
    return [(index[image_fold != f], index[image_fold == f]) for f in range(n_splits)]


def per_fold(counts: np.ndarray, fold_of: np.ndarray, n_splits: int) -> np.ndarray:
    """(folds, strata) image counts of an assignment of groups to folds."""
    return np.stack([counts[fold_of == f].sum(axis=0) for f in range(n_splits)])


def unevenness(fold_counts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """The mean over strata of the spread of a stratum's share across folds; over the last
    two axes, so a stack of candidate (folds, strata) tables gives one value each."""
    return np.mean(np.std(fold_counts / total, axis=-2), axis=-1)


def assign(counts: np.ndarray, n_splits: int, rng: np.random.Generator) -> np.ndarray:
    """Each group's fold: groups in a random order, each into the fold that leaves the strata
    most even (ties: the fold with fewer images, then at random); the last groups fill any
    fold still empty."""
    total = counts.sum(axis=0)
    fold_counts = np.zeros((n_splits, counts.shape[1]))
    fold_of = np.empty(len(counts), dtype=int)
    order = rng.permutation(len(counts))
    for done, group in enumerate(order):
        empty = np.flatnonzero(fold_counts.sum(axis=1) == 0)
        allowed = empty if len(empty) >= len(order) - done else np.arange(n_splits)
        allowed = rng.permutation(allowed)
        trials = np.repeat(fold_counts[None], len(allowed), axis=0)
        trials[np.arange(len(allowed)), allowed] += counts[group]
        costs = np.round(unevenness(trials, total), 12)  # equal up to rounding: a tie
        sizes = fold_counts[allowed].sum(axis=1)
        chosen = allowed[np.lexsort((sizes, costs))[0]]
        fold_of[group] = chosen
        fold_counts[chosen] += counts[group]
    return fold_of
