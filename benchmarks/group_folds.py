"""Do the seeds of a patient-grouped cross-validation test different patients together?
The two training sources of `experiment=transfer_multisource` (data.root's images, each its own
group, and a second folder's patients from its file names), grouped and stratified by class x
source as a run does, split into 5 folds for `--seeds` seeds by scikit-learn's
StratifiedGroupKFold (shuffled; what runs used until session 25) and by the project's
`group_kfold` with 1, 5 (the project's) and 10 random orders per seed. Columns: how many
distinct partitions of the second source's patients the seeds give, the share of seeds in which
the most often paired two patients share a fold (1/5 if folds were drawn freely), how many
pairs never do, and how evenly the folds hold the strata (the mean over strata of the spread
of their shares across folds; lower is more even). No images are decoded.

    python benchmarks/group_folds.py [--data FOLDER --second FOLDER --group-pattern REGEX]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from machine import cpu_line, print_table  # benchmarks/ (run from there)
from sklearn.model_selection import StratifiedGroupKFold

from experiments.data import folders, group_folds
from experiments.data.splits import group_ids

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
Folds = list[tuple[np.ndarray, np.ndarray]]


def sources(first: Path, second: Path, pattern: str) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """(strata, groups, is_second) of every image, as `loading.read_sources` groups them."""
    classes, files, labels = folders.scan_folder(str(first), None)
    other_classes, other_files, other_labels = folders.scan_folder(str(second), None)
    if other_classes != classes:
        raise SystemExit(f"{second} has classes {other_classes}, {first} {classes}")
    strata = [f"{y}|first" for y in labels] + [f"{y}|second" for y in other_labels]
    groups = [f"first:{f}" for f in files] + [f"second:{g}"
                                              for g in group_ids(other_files, pattern)]
    is_second = np.r_[np.zeros(len(files), bool), np.ones(len(other_files), bool)]
    return np.asarray(strata), np.asarray(groups), is_second


def with_orders(candidates: int) -> Callable[..., Folds]:
    def split(strata: np.ndarray, groups: np.ndarray, seed: int) -> Folds:
        return group_folds.group_kfold(strata, groups, 5, seed, candidates)
    return split


def scikit_learn(strata: np.ndarray, groups: np.ndarray, seed: int) -> Folds:
    return list(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(
        strata, strata, groups))


def row(name: str, split: Callable[..., Folds], strata: np.ndarray, groups: np.ndarray,
        is_second: np.ndarray, seeds: int) -> list[str]:
    patients = sorted(set(groups[is_second]))
    together = {pair: 0 for pair in itertools.combinations(patients, 2)}
    partitions, spreads = set(), []
    kinds = np.unique(strata)
    for seed in range(seeds):
        folds = split(strata, groups, seed)
        tested = [sorted(set(groups[test][is_second[test]])) for _, test in folds]
        partitions.add(frozenset(tuple(t) for t in tested))
        for members in tested:
            for pair in itertools.combinations(members, 2):
                together[pair] += 1
        table = np.array([[np.sum(strata[test] == k) for k in kinds] for _, test in folds])
        spreads.append(float(group_folds.unevenness(table, table.sum(axis=0))))
    shares = np.array(list(together.values())) / seeds
    return [name, f"{len(partitions)} of {seeds}", f"{shares.max():.2f}",
            f"{int(np.sum(shares == 0))} of {len(shares)}", f"{np.mean(spreads):.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "biopsy-seed" / "train")
    parser.add_argument("--second", type=Path, default=SHARED / "breakhis-100x")
    parser.add_argument("--group-pattern", default=r"SOB_[BM]_([^-]+-\d+-[^-]+)-")
    parser.add_argument("--seeds", type=int, default=40)
    args = parser.parse_args()
    strata, groups, is_second = sources(args.data, args.second, args.group_pattern)
    print(cpu_line())
    print(f"{len(groups)} images, {len(set(groups[is_second]))} patients in the second source")
    splits = {"scikit-learn StratifiedGroupKFold (before)": scikit_learn,
              "group_kfold, 1 order per seed": with_orders(1),
              f"group_kfold, {group_folds.CANDIDATES} orders (the project's)":
                  with_orders(group_folds.CANDIDATES),
              "group_kfold, 10 orders": with_orders(10)}
    print_table(["folds by", "distinct patient partitions", "most paired two: share",
                 "pairs never together", "strata spread"],
                [row(name, split, strata, groups, is_second, args.seeds)
                 for name, split in splits.items()])


if __name__ == "__main__":
    main()
