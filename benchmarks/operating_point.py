"""What does a user get from `experiment=transfer_cpu`'s cross-validation? Nested: the whole
pipeline (5-fold CV of linear probes -> temperature and threshold fitted on their pooled
out-of-fold predictions -> the probe refitted on every image) runs on 4/5 of the images, and
the refitted model - the one a run ships - is scored on the 1/5 it never saw.

    python benchmarks/operating_point.py --weights /abs/densenet121_imagenet_notop.weights.h5
    python benchmarks/operating_point.py --weights W --sources both

Two ways to fit each fold's probe, the refit always the same (standardised features, L2
logistic regression on all 24 views, C by an inner 5-fold CV of the log-loss):
- split: the fold's training images split again 80/20, C chosen on the 20% by log-loss on
  their first view (`finetune=linear_probe` until session 14);
- refit-like: C chosen as the refit chooses it, by an inner 5-fold CV on all of the fold's
  training images - the fold models are trained the way the shipped model is;
- refit-like on the 80%: the same on the 80% of the first design, the 20% left for the fold's
  own operating point (`finetune=linear_probe` since session 14);
- refit-like, temperature at its own C: folds as refit-like, but the temperature and
  thresholds come from the refit's own inner cross-validation at the C it chose (held-out
  predictions of models as sharp as the shipped one), not from the fold probes' pooled ones,
  whose C differ (session 24).
Thresholds (Youden's J on the calibrated out-of-fold predictions): of all of them (`pooled`,
as runs choose it), of the first source's alone, or 0.5 (`eval.threshold=fixed`).
Columns: the pooled out-of-fold estimate (accuracy at its own threshold, ROC-AUC) and the
shipped model on the held-out fifth: accuracy at the threshold, ROC-AUC, ECE and log-loss
of its calibrated probabilities, and the temperature. Features: benchmarks/sources.py's cache
(the x1, x0.5 and x2-upsampled views of `eval.tta=rot90_multiscale`; tested on views 0 and 1
of each scale). `--sources both`: the second source (BreakHis) in training too, patient-
grouped folds; scores on the held-out images of each source, and the second source's patients
(the mean probability of their images); and three more ways to decide, each at 0.5 unless it
says: a temperature and threshold per training source, each held-out image decided with those
of the source most of its 5 nearest training images belong to (`nearest_source`); the first
source's own pipeline (trained on it alone) for the images routed to it and the two-source
model for the others; the same for the images the first source's own referral accepts
(`accepted_by_first`: the project's, on the average-pooled features and the stain); and the
second source's ECE as runs report it (`stats.reliability_bins`), what a perfectly calibrated
model would stay under on as many images, and that ECE without its costliest patient.
`--pooling gem`: the features pooled by the generalised mean (`backbone.global_pool=gem`)
instead of the average.
"""

from __future__ import annotations

import copy
import time
from multiprocessing import Pool

import numpy as np
from machine import cpu_line, print_row, print_table, spread  # benchmarks/ (run from there)
from probe_recipes import by_group
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sources import ece, extract, image_groups, source_arguments
from threadpoolctl import threadpool_limits

from experiments.data.decode import load_image
from experiments.evaluation.stats import (
    apply_temperature,
    calibrated_ece_quantile,
    choose_threshold,
    fit_operating_point,
    reliability_bins,
)
from experiments.serving.ood import fit_reference
from experiments.training.probe import C_GRID, view_folds

SCALES = ("plain", "zoom05", "zoom2up")  # views 0-7, 8-15, 16-23 as the project caches them
TEST_VIEWS = (0, 1, 8, 9, 16, 17)  # eval.tta=rot90_multiscale
OWN_C = "refit-like, temperature at its own C"
DESIGNS = ("split", "refit-like", "refit-like on the 80%", OWN_C)


def standardised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = x.reshape(-1, x.shape[-1])
    return flat.mean(0), flat.std(0) + 1e-3


def predict(model: LogisticRegression, x: np.ndarray, mean: np.ndarray, scale: np.ndarray
            ) -> np.ndarray:
    """p(malignant) of each image: the probabilities of its test views averaged."""
    q = x[:, TEST_VIEWS]
    return model.predict_proba((q.reshape(-1, q.shape[-1]) - mean) / scale)[:, 1].reshape(
        len(q), -1).mean(1)


def fit_refit_like(x: np.ndarray, y: np.ndarray, strata: np.ndarray, groups: np.ndarray,
                   seed: int):
    """The refit's recipe: C by an inner grouped 5-fold CV of the log-loss on all views."""
    views = x.shape[1]
    mean, scale = standardised(x)
    z = (x.reshape(-1, x.shape[-1]) - mean) / scale
    labels = np.repeat(y, views)
    splits = view_folds(strata, views, 5, seed, list(groups))
    search = LogisticRegressionCV(Cs=list(C_GRID), cv=splits, scoring="neg_log_loss",
                                  l1_ratios=(0.0,), use_legacy_attributes=False,
                                  max_iter=5000, random_state=seed).fit(z, labels)
    model = LogisticRegression(C=float(search.C_), max_iter=5000, random_state=seed).fit(
        z, labels)
    return model, mean, scale


def regularisation_path(z: np.ndarray, y: np.ndarray, seed: int) -> list[LogisticRegression]:
    """One regression per C of C_GRID, each solved from the previous one's coefficients."""
    model = LogisticRegression(max_iter=5000, random_state=seed, warm_start=True)
    return [copy.deepcopy(model.set_params(C=c).fit(z, y)) for c in sorted(C_GRID)]


def fit_split(x: np.ndarray, y: np.ndarray, strata: np.ndarray, groups: np.ndarray,
              seed: int):
    """A fold's probe as the pipeline fits it: 80% to train, C by log-loss on the other 20%'s
    first view."""
    train, val = next(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(
        x, strata, groups))
    mean, scale = standardised(x[train])
    z = (x[train].reshape(-1, x.shape[-1]) - mean) / scale
    z_val = (x[val][:, 0] - mean) / scale
    path = regularisation_path(z, np.repeat(y[train], x.shape[1]), seed)
    model = min(path, key=lambda m: log_loss(y[val], m.predict_proba(z_val), labels=[0, 1]))
    return model, mean, scale


def fit_refit_like_on_train(x: np.ndarray, y: np.ndarray, strata: np.ndarray,
                            groups: np.ndarray, seed: int):
    """The refit's recipe on the 80% a fold trains on; the other 20% left for the fold's own
    operating point."""
    train, _ = next(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(
        x, strata, groups))
    return fit_refit_like(x[train], y[train], strata[train], groups[train], seed)


def inner_out_of_fold(x: np.ndarray, y: np.ndarray, strata: np.ndarray, groups: np.ndarray,
                      seed: int, c: float) -> np.ndarray:
    """p(malignant) of each image from the refit's own inner cross-validation (the folds its
    C was chosen on) at its chosen C `c`: held-out predictions of models as sharp as it is."""
    views = x.shape[1]
    mean, scale = standardised(x)
    z = (x.reshape(-1, x.shape[-1]) - mean) / scale
    labels = np.repeat(y, views)
    out = np.zeros(len(y))
    for train, held in view_folds(strata, views, 5, seed, list(groups)):
        model = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(z[train],
                                                                             labels[train])
        images = np.unique(held // views)
        out[images] = predict(model, x[images], mean, scale)
    return out


FITS = {"split": fit_split, "refit-like": fit_refit_like,
        "refit-like on the 80%": fit_refit_like_on_train, OWN_C: fit_refit_like}


def shipped(x, y, strata, groups, source, design: str, seed: int):
    """The pipeline on (x, y): out-of-fold probabilities of `design`'s fold probes, the
    temperature fitted on them, a threshold per rule of THRESHOLDS, and the refitted model."""
    oof = np.zeros(len(y))
    for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(
            x, strata, groups):
        model, mean, scale = FITS[design](x[train], y[train], strata[train], groups[train],
                                          seed)
        oof[test] = predict(model, x[test], mean, scale)
    refit = fit_refit_like(x, y, strata, groups, seed)
    # OWN_C: the operating point from the refit's inner out-of-fold predictions at its C
    points = inner_out_of_fold(x, y, strata, groups, seed, float(refit[0].C)) \
        if design == OWN_C else oof
    temperature, _ = fit_operating_point(y, np.stack([1 - points, points], 1), 1, "fixed",
                                         0.5, 0.95, True)
    calibrated = apply_temperature(np.stack([1 - points, points], 1), temperature)[:, 1]
    thresholds = {rule: choose(calibrated, y, source) for rule, choose in THRESHOLDS.items()}
    return oof, temperature, thresholds, refit, per_source_points(points, y, source)


def per_source_points(oof: np.ndarray, y: np.ndarray, source: np.ndarray
                      ) -> dict[int, tuple[float, float]]:
    """Each training source's own temperature and Youden threshold, fitted on its out-of-fold
    predictions alone."""
    points = {}
    for k in np.unique(source):
        s = source == k
        two = np.stack([1 - oof[s], oof[s]], 1)
        temperature, _ = fit_operating_point(y[s], two, 1, "fixed", 0.5, 0.95, True)
        calibrated = apply_temperature(two, temperature)[:, 1]
        points[int(k)] = (temperature, choose_threshold(y[s], calibrated, "youden"))
    return points


def accepted_by_first(referral: tuple[np.ndarray, np.ndarray], train_source: np.ndarray,
                      train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    """Whether the first source's own referral - the project's (`fit_reference`: the average-
    pooled features and the stain statistics of its training images, 95% coverage) - accepts
    each test image. `referral`: every image's (features, uint8 pixels)."""
    features, images = referral
    first = train[train_source == 0]
    reference = fit_reference(features[first], 0.95, seed=seed, images=images[first])
    return ~reference.refer(reference.score(features[test], images[test]))


def nearest_source(train: np.ndarray, train_source: np.ndarray, test: np.ndarray,
                   k: int = 5) -> np.ndarray:
    """The source of most of each test image's k nearest training images (cosine, view 0,
    standardised features): where a model that knows its sources would route the image."""
    mean, scale = standardised(train[:, :1])
    a = (train[:, 0] - mean) / scale
    b = (test[:, 0] - mean) / scale
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    nearest = np.argsort(-b @ a.T, axis=1)[:, :k]
    return (train_source[nearest].mean(1) >= 0.5).astype(int)


THRESHOLDS = {  # where the decision threshold is chosen (Youden's J) on the out-of-fold set
    "pooled": lambda p, y, source: choose_threshold(y, p, "youden"),
    "main source": lambda p, y, source: choose_threshold(y[source == 0], p[source == 0],
                                                         "youden"),
    "0.5": lambda p, y, source: 0.5,
}


def patient_scores(p: np.ndarray, y: np.ndarray, groups: np.ndarray, cut: np.ndarray
                   ) -> list[float]:
    """Patient-level accuracy and ROC-AUC: the mean probability of a patient's images, decided
    at the threshold of the outer fold that held the patient out."""
    mean_p, label = by_group(p, y, groups)
    threshold, _ = by_group(cut, y, groups)  # one threshold per patient: its mean is it
    return [float(np.mean((mean_p >= threshold) == label)), roc_auc_score(label, mean_p)]


def project_ece(p: np.ndarray, y: np.ndarray, groups: np.ndarray) -> list[float]:
    """The ECE as runs report it (`stats.reliability_bins`: 10 bins of the top-class
    confidence over [0, 1], where `ece` above bins confidence - 0.5), the 95% bound a perfectly
    calibrated model stays under on these images (`stats.calibrated_ece_quantile`), and the
    runs' ECE without the one patient whose removal lowers it most."""
    two = np.stack([1 - p, p], 1)
    labels = y.astype(int)
    without = [reliability_bins(labels[groups != g], two[groups != g]).ece
               for g in np.unique(groups)]
    return [reliability_bins(labels, two).ece, calibrated_ece_quantile(two), min(without)]


def one_seed(job) -> dict[str, list[tuple[float, ...]]]:
    """Outer 5-fold: per design and threshold rule, the estimate and the shipped model's
    held-out metrics, the held-out predictions pooled over the outer folds."""
    x, y, source, groups, seed, designs, referral = job
    strata = y * 2 + source
    rows: dict[str, list] = {}
    with threadpool_limits(1, user_api="blas"):
        for design in designs:
            held = np.zeros(len(y))
            decided = {rule: np.zeros(len(y), bool) for rule in THRESHOLDS}
            cut = {rule: np.zeros(len(y)) for rule in THRESHOLDS}  # each image's threshold
            routed = np.zeros(len(y))  # per-source operating point, by the nearest source
            decided_routed, cut_routed = np.zeros(len(y), bool), np.zeros(len(y))
            right_route = []
            experts = np.zeros(len(y))  # the first source's own pipeline where routed there
            cascade = np.zeros(len(y))  # ... where the first source's referral accepts
            estimate, temperatures = [], []
            for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=100 + seed
                                                    ).split(x, strata, groups):
                oof, temperature, thresholds, (model, mean, scale), points = shipped(
                    x[train], y[train], strata[train], groups[train], source[train], design,
                    seed)
                estimate.append((np.mean((oof >= 0.5) == y[train]),
                                 roc_auc_score(y[train], oof)))
                p = predict(model, x[test], mean, scale)
                held[test] = apply_temperature(np.stack([1 - p, p], 1), temperature)[:, 1]
                for rule, threshold in thresholds.items():
                    decided[rule][test] = held[test] >= threshold
                    cut[rule][test] = threshold
                temperatures.append(temperature)
                route = nearest_source(x[train], source[train], x[test])
                right_route.append(np.mean(route == source[test]))
                for k, (t_k, h_k) in points.items():
                    r = test[route == k]
                    q = predict(model, x[r], mean, scale)
                    routed[r] = apply_temperature(np.stack([1 - q, q], 1), t_k)[:, 1]
                    decided_routed[r], cut_routed[r] = routed[r] >= h_k, h_k
                if len(np.unique(source)) > 1:
                    experts[test] = held[test]
                    first = train[source[train] == 0]
                    _, t_first, _, (alone, mean_first, scale_first), _ = shipped(
                        x[first], y[first], strata[first], groups[first], source[first],
                        design, seed)
                    r = test[route == 0]
                    q = predict(alone, x[r], mean_first, scale_first)
                    experts[r] = apply_temperature(np.stack([1 - q, q], 1), t_first)[:, 1]
                    cascade[test] = held[test]
                    r = test[accepted_by_first(referral, source[train], train, test, seed)]
                    q = predict(alone, x[r], mean_first, scale_first)
                    cascade[r] = apply_temperature(np.stack([1 - q, q], 1), t_first)[:, 1]
            outcomes = {f"threshold: {rule}": (held, decided[rule], cut[rule])
                        for rule in THRESHOLDS}
            if len(np.unique(source)) > 1:
                outcomes["per-source point, routed"] = (routed, decided_routed, cut_routed)
                outcomes["first source's own model where routed there, 0.5"] = (
                    experts, experts >= 0.5, np.full(len(y), 0.5))
                outcomes["first source's own model where its referral accepts, 0.5"] = (
                    cascade, cascade >= 0.5, np.full(len(y), 0.5))
                print(f"seed {seed}, {design}: {np.mean(right_route):.3f} of the held-out "
                      "images routed to their own source", flush=True)
            for label, (p, decision, threshold) in outcomes.items():
                per_source = []
                for k in np.unique(source):
                    s = source == k
                    per_source += [np.mean(decision[s] == y[s]),
                                   roc_auc_score(y[s], p[s]), ece(p[s], y[s]),
                                   log_loss(y[s], p[s], labels=[0, 1])]
                if len(np.unique(source)) > 1:  # the second source's patients, held out whole
                    s = source == 1
                    per_source += patient_scores(p[s], y[s], groups[s], threshold[s])
                    per_source += project_ece(p[s], y[s], groups[s])
                rows.setdefault(f"{design}, {label}", []).append(
                    (*np.mean(estimate, 0), *per_source, np.mean(temperatures)))
    return rows


def referral_inputs(folders: dict, names: tuple[str, ...], args) -> tuple[np.ndarray,
                                                                         np.ndarray]:
    """What the project's referral sees of every image: the average-pooled features of the
    plain view and the pixels as the model takes them (224 px, centre square)."""
    plain = extract("plain", folders, args.weights, args.cache)
    features = np.concatenate([plain[n][:, 0] for n in names])
    files = [f for n in names for f in plain[f"{n}_files"]]
    return features, np.stack([load_image(f, 224, resize="crop") for f in files])


def main(argv: list[str] | None = None) -> None:
    parser = source_arguments(__doc__)
    parser.add_argument("--sources", choices=("first", "both"), default="first")
    parser.add_argument("--pooling", choices=("avg", "gem"), default="avg")
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    args = parser.parse_args(argv)
    print(cpu_line(), flush=True)
    start = time.perf_counter()
    folders = {"first": args.data, "second": args.second}
    suffix = "" if args.pooling == "avg" else "@pool4_relu~gem"
    data = [extract(v + suffix, folders, args.weights, args.cache) for v in SCALES]
    names = ("first",) if args.sources == "first" else ("first", "second")
    x = np.concatenate([np.concatenate([d[n] for d in data], axis=1) for n in names])
    y = np.concatenate([data[0][f"{n}_labels"] for n in names])
    source = np.concatenate([np.full(len(data[0][f"{n}_labels"]), i)
                             for i, n in enumerate(names)])
    groups = image_groups(data[0], args.group_pattern, names)
    referral = referral_inputs(folders, names, args) if len(names) > 1 else None
    with Pool(2) as pool:
        results = pool.map(one_seed, [(x, y, source, groups, seed, args.designs, referral)
                                      for seed in range(args.repeats)])
    header = ("design", "estimate acc", "estimate AUC",
              *(f"{n}: {m}" for n in names for m in ("acc", "AUC", "ECE", "log-loss")),
              *(("second: patients acc", "patients AUC", "second: runs' ECE",
                 "a calibrated model's 95%", "runs' ECE without the costliest patient")
                if len(names) > 1 else ()),
              "temperature")
    rows = []
    for name in results[0]:
        values = np.array([row for result in results for row in result[name]])
        rows.append((name, *(spread(column) for column in values.T)))
        print_row(rows[-1])
    print_table(header, rows)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
