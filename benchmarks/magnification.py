"""Does the preset hold at a magnification it never saw, and does standardising each cohort's
features by its own statistics carry it there? (issue 18: "per-site standardisation of the
features helped the other magnification"; the kept cohorts include BreakHis 400X.)

    cd benchmarks && python magnification.py --weights /abs/densenet121_imagenet_notop.weights.h5

Another magnification is simulated from the same slides: every image seen at 1.5x and 2x the
magnification the model sees it at (decoded with its shorter side at 336 or 448 px, centre
224 px kept: real pixels, `sources.at_magnification`), through the preset's three views (x1,
upsampled x2, x0.5; 2 dihedral views each tested). The probe (the preset's: DenseNet121
`pool4_relu`, GeM, L2 logistic regression, C by inner CV) trains on the images as they are,
on both sources (5 folds stratified by label x source, a patient's images in one fold,
`--repeats` seeds; the held-out fold scored at every magnification) or on the seed images
alone (scored on every BreakHis image); `--train-powers 10 20` adds the views of every
training image at 2x (real pixels) - magnification as training data. The features are
standardised three ways:
- training: by the training images' mean and spread (the preset);
- cohort: each test cohort (a source at a magnification, all its images, unlabeled) by its
  own - the probe's standardisation re-estimated on the cohort, AdaBN of the head alone
  (`eval.external.<name>.adapt` re-estimates the backbone's BatchNorm statistics as well);
- source + cohort: each training source by its own too, so that every site is centred alike.
Columns: the seed images and the BreakHis images (accuracy at 0.5 / ROC-AUC, ECE) and
BreakHis patients (mean probability of a patient's images), the mean over the seeds.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from machine import cpu_line, print_row, print_table  # benchmarks/ (run from there)
from patients import TEST_VIEWS, averaged, fit
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sources import by_patient, ece, extract, image_groups, source_arguments
from threadpoolctl import threadpool_limits

POWERS = (10, 15, 20)  # tenths of the magnification the model sees an image at
NORMALISATIONS = ("training", "cohort", "source + cohort")


def features(power: int, args) -> dict[str, np.ndarray]:
    folders = {"first": args.data, "second": args.second}
    parts = [extract(f"mag{power}_{view}@pool4_relu~gem", folders, args.weights, args.cache)
             for view in ("plain", "zoom2up", "zoom05")]
    joined = dict(parts[0])
    for name in folders:
        joined[name] = np.concatenate([part[name] for part in parts], axis=1)
    return joined


def statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return flat.mean(0), flat.std(0) + 1e-3


def per_source(x: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Each source's features standardised by its own mean and spread."""
    out = x.astype(np.float64)
    for k in np.unique(source):
        mean, scale = statistics(x[source == k])
        out[source == k] = (x[source == k] - mean) / scale
    return out


def predictions(train_x: np.ndarray, y: np.ndarray, source: np.ndarray, groups: np.ndarray,
                raw: dict[int, np.ndarray], cohort: dict[int, np.ndarray], normalisation: str
                ) -> dict[int, np.ndarray]:
    """p(positive) of the test images at each magnification from the probe trained on
    `train_x` (the images as they are). `raw`: power -> the test images' features (n, views,
    C); `cohort`: the same, standardised by their whole cohort's statistics."""
    if normalisation == "source + cohort":
        train_x = per_source(train_x, source)
    mean, scale, model = fit(train_x, y, groups)
    out = {}
    for power in raw:
        if normalisation == "training":
            z = (raw[power] - mean) / scale
        elif normalisation == "cohort":
            z = cohort[power]
        else:
            z = (cohort[power] - mean) / scale
        out[power] = averaged(model, z)
    return out


def metrics(p: np.ndarray, y: np.ndarray, source: np.ndarray, groups: np.ndarray
            ) -> tuple[float, ...]:
    first, second = source == 0, source == 1
    seed = (np.mean((p[first] > 0.5) == y[first]), roc_auc_score(y[first], p[first])) \
        if first.any() else (np.nan, np.nan)
    return (*seed, np.mean((p[second] > 0.5) == y[second]),
            roc_auc_score(y[second], p[second]), ece(p[second], y[second]),
            *by_patient(p[second], y[second], groups[second]))


def main(argv: list[str] | None = None) -> None:
    parser = source_arguments(__doc__)
    parser.add_argument("--train-powers", nargs="+", type=int, default=[10], choices=POWERS,
                        help="train on the preset's views at these magnifications (tenths; "
                        "default the images as they are)")
    parser.add_argument("--normalisations", nargs="+", default=list(NORMALISATIONS),
                        choices=NORMALISATIONS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    threadpool_limits(1, user_api="blas")  # as the probe fits (training/probe.py)
    print(cpu_line(), flush=True)
    start = time.perf_counter()
    data = {power: features(power, args) for power in POWERS}
    both = {power: np.concatenate([d["first"], d["second"]]) for power, d in data.items()}
    reference = data[10]
    y = np.concatenate([reference["first_labels"], reference["second_labels"]]).astype(int)
    source = np.repeat([0, 1], [len(reference["first_labels"]),
                                len(reference["second_labels"])])
    groups = image_groups(reference, args.group_pattern, ("first", "second"))
    tests = {power: x[:, TEST_VIEWS] for power, x in both.items()}
    train_x = np.concatenate([both[power] for power in args.train_powers], axis=1)
    cohorts = {power: per_source(q, source) for power, q in tests.items()}  # whole cohorts
    results: dict[tuple[str, str, int], list[tuple[float, ...]]] = {}
    for normalisation in args.normalisations:
        for seed in range(args.repeats):
            p = {power: np.zeros(len(y)) for power in POWERS}
            folds = StratifiedGroupKFold(5, shuffle=True, random_state=seed)
            for train, test in folds.split(y, y * 2 + source, groups):
                fold = predictions(train_x[train], y[train], source[train], groups[train],
                                   {pw: q[test] for pw, q in tests.items()},
                                   {pw: q[test] for pw, q in cohorts.items()}, normalisation)
                for power in POWERS:
                    p[power][test] = fold[power]
            for power in POWERS:
                results.setdefault(("both sources", normalisation, power), []).append(
                    metrics(p[power], y, source, groups))
        if normalisation != "source + cohort":  # one source: the same as cohort
            home, away = source == 0, source == 1
            alone = predictions(train_x[home], y[home], source[home], groups[home],
                                {pw: q[away] for pw, q in tests.items()},
                                {pw: q[away] for pw, q in cohorts.items()}, normalisation)
            for power in POWERS:
                results[("seed images alone", normalisation, power)] = [metrics(
                    alone[power], y[away], source[away], groups[away])]
        print(f"{normalisation}: {time.perf_counter() - start:.0f} s", flush=True)
    header = ("trained on", "standardised by", "magnification", "seed acc", "seed AUC",
              "BreakHis acc", "BreakHis AUC", "BreakHis ECE", "patients acc", "patients AUC")
    rows = []
    for (trained, normalisation, power), runs in results.items():
        rows.append((trained, normalisation, f"x{power / 10:g}",
                     *(f"{value:.3f}" if np.isfinite(value) else "-"
                       for value in np.mean(np.array(runs, float), 0))))
        print_row(rows[-1])
    print_table(header, rows)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
