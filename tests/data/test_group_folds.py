"""Patient-grouped folds: whole patients, strata in proportion, and a partition that moves with
the seed (scikit-learn's StratifiedGroupKFold gives nearly the same one for every seed)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from experiments.data import splits as splits_lib
from experiments.data.group_folds import group_kfold
from experiments.errors import DataError


def patients_and_singletons() -> tuple[np.ndarray, np.ndarray]:
    """Like data.root plus BreakHis: 40 ungrouped images (each its own group) of two classes
    and 16 one-class patients of 5 to 20 images each."""
    sizes = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    strata = [f"{c}|main" for c in ("b", "m") for _ in range(20)]
    groups = [f"img{i}" for i in range(40)]
    for p, size in enumerate(sizes):
        strata += [f"{'b' if p % 2 else 'm'}|bh"] * size
        groups += [f"patient{p}"] * size
    return np.asarray(strata), np.asarray(groups)


def patient_partition(folds, groups: np.ndarray) -> frozenset:
    return frozenset(frozenset(g for g in groups[test] if g.startswith("patient"))
                     for _, test in folds)


def test_every_group_is_tested_once_whole_and_every_fold_holds_every_stratum():
    strata, groups = patients_and_singletons()
    folds = group_kfold(strata, groups, 5, seed=3)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(groups)))
    for rest, test in folds:
        assert not set(groups[rest]) & set(groups[test])
        assert sorted(np.r_[rest, test]) == list(range(len(groups)))
        assert set(strata[test]) == set(strata)
    main = [np.sum(np.char.endswith(strata[test], "main")) for _, test in folds]
    assert max(main) - min(main) <= 2  # the ungrouped images spread evenly


def test_the_partition_of_patients_moves_with_the_seed_and_repeats_with_it():
    strata, groups = patients_and_singletons()
    ours = {patient_partition(group_kfold(strata, groups, 5, seed), groups) for seed in range(10)}
    assert len(ours) == 10
    assert patient_partition(group_kfold(strata, groups, 5, 7), groups) == patient_partition(
        group_kfold(strata, groups, 5, 7), groups)
    # what it replaces: one-class patients ordered by size, the seed only breaking ties
    theirs = {patient_partition(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(
        strata, strata, groups), groups) for seed in range(10)}
    assert len(theirs) <= 2


def test_the_strata_are_balanced_far_better_than_by_dealing_out_patients_at_random():
    strata, groups = patients_and_singletons()
    kinds = np.unique(strata)
    names, group_of = np.unique(groups, return_inverse=True)

    def spread(fold_of_image: np.ndarray) -> float:
        table = np.array([[np.sum(strata[fold_of_image == f] == k) for k in kinds]
                          for f in range(5)])
        return float(np.mean(np.std(table / table.sum(axis=0), axis=0)))

    def ours(seed: int) -> np.ndarray:
        fold_of_image = np.empty(len(groups), dtype=int)
        for f, (_, test) in enumerate(group_kfold(strata, groups, 5, seed)):
            fold_of_image[test] = f
        return fold_of_image

    rng = np.random.default_rng(0)
    dealt = [rng.permutation(np.arange(len(names)) % 5)[group_of] for _ in range(10)]
    assert np.mean([spread(ours(s)) for s in range(10)]) < 0.5 * np.mean(
        [spread(d) for d in dealt])


def test_fewer_patients_than_folds_is_a_data_error_naming_the_counts():
    pool = splits_lib.Split(tuple(f"f{i}.png" for i in range(8)), (0, 0, 0, 0, 1, 1, 1, 1),
                            np.zeros((8, 4, 4, 3), np.uint8),
                            groups=("p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"))
    with pytest.raises(DataError, match=r"Cannot make 5 stratified folds of 8 images.*"
                                        r"n_splits=5 greater than the number of groups: 4"):
        splits_lib.make_folds(("a", "b"), pool, 5, 0.2, 0)
