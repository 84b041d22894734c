"""Which patients does the patient-level ROC-AUC turn on? Leave one BreakHis patient out at a
time and score it with the preset's probe (`experiment=transfer_multisource`'s features and
recipe, as in `sources.py`) trained on three sets: both sources (every other patient and the
seed images), the second source's other patients alone, and the seed images alone.

    cd benchmarks && python patients.py --weights /abs/densenet121_imagenet_notop.weights.h5

Features: DenseNet121 `pool4_relu`, GeM-pooled, the x1, upsampled x2 and x0.5 views (24 trained
on, the first 2 dihedral views of each scale tested), cached by `sources.py` in `--cache`. The
probe: standardised features, L2 logistic regression, C by an inner 5-fold CV of the log-loss
grouped by patient. Prints each patient's mean p(malignant) per training set, then the
patient-level ROC-AUC with every patient and without the patient that costs it most.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from machine import cpu_line, print_table  # benchmarks/ (run from there)
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sources import C_GRID, extract, image_groups, source_arguments, view_rows
from threadpoolctl import threadpool_limits

VIEWS = tuple(f"{v}@pool4_relu~gem" for v in ("plain", "zoom2up", "zoom05"))
TEST_VIEWS = [v * 8 + k for v in range(len(VIEWS)) for k in range(2)]


def fit(x: np.ndarray, y: np.ndarray, groups: np.ndarray
        ) -> tuple[np.ndarray, np.ndarray, LogisticRegression]:
    """The preset's probe trained on `x` (n, views, C): the features' mean and scale, and the
    L2 logistic regression on the standardised views, C by an inner 5-fold CV of the log-loss
    grouped by `groups`."""
    views, width = x.shape[1], x.shape[2]
    flat = x.reshape(-1, width)
    mean, scale = flat.mean(0), flat.std(0) + 1e-3
    z, labels = (flat - mean) / scale, np.repeat(y, views)
    inner = [(view_rows(a, views), view_rows(b, views)) for a, b in StratifiedGroupKFold(
        5, shuffle=True, random_state=0).split(y, y, groups)]
    search = LogisticRegressionCV(Cs=list(C_GRID), cv=inner, scoring="neg_log_loss",
                                  l1_ratios=(0.0,), use_legacy_attributes=False,
                                  max_iter=3000).fit(z, labels)
    return mean, scale, LogisticRegression(C=float(search.C_), max_iter=3000).fit(z, labels)


def averaged(model: LogisticRegression, z: np.ndarray) -> np.ndarray:
    """p(positive) of each image of `z` (n, views, C; standardised): its views' mean."""
    return model.predict_proba(z.reshape(-1, z.shape[-1]))[:, 1].reshape(len(z), -1).mean(1)


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p(positive) of each image of `q` (n, views, C): the preset's probe trained on `x`."""
    mean, scale, model = fit(x, y, groups)
    return averaged(model, (q[:, TEST_VIEWS] - mean) / scale)


def hardest(labels: np.ndarray, scores: np.ndarray) -> tuple[int, float]:
    """The patient whose removal raises the ROC-AUC most, and the ROC-AUC without it."""
    without = [roc_auc_score(np.delete(labels, i), np.delete(scores, i))
               for i in range(len(labels))]
    return int(np.argmax(without)), float(np.max(without))


def main(argv: list[str] | None = None) -> None:
    args = source_arguments(__doc__).parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    threadpool_limits(1, user_api="blas")  # as the probe fits (training/probe.py)
    print(cpu_line(), flush=True)
    folders = {"first": args.data, "second": args.second}
    data = [extract(v, folders, args.weights, args.cache) for v in VIEWS]
    x = np.concatenate([np.concatenate([d["first"], d["second"]]) for d in data], axis=1)
    y = np.concatenate([data[0]["first_labels"], data[0]["second_labels"]]).astype(int)
    source = np.repeat([0, 1], [len(data[0]["first_labels"]), len(data[0]["second_labels"])])
    groups = image_groups(data[0], args.group_pattern, ("first", "second"))
    patients = sorted(set(groups[source == 1]))
    sets = {"both sources": np.ones(len(y), bool), "second source alone": source == 1,
            "seed images alone": source == 0}
    start = time.perf_counter()
    means = {name: [] for name in sets}
    for patient in patients:
        held = groups == patient
        for name, keep in sets.items():
            train = keep & ~held
            means[name].append(float(probe(x[train], y[train], groups[train], x[held]).mean()))
    labels = np.array([y[groups == p][0] for p in patients])
    order = np.argsort(means["both sources"])
    print_table(("patient", "label", "images", *sets),
                [(patients[i], "malignant" if labels[i] else "benign",
                  str(int(np.sum(groups == patients[i]))),
                  *(f"{means[name][i]:.2f}" for name in sets)) for i in order])
    rows = []
    for name in sets:
        scores = np.array(means[name])
        worst, without = hardest(labels, scores)
        rows.append((name, f"{roc_auc_score(labels, scores):.3f}", patients[worst],
                     f"{without:.3f}"))
    print_table(("trained on", "patient ROC-AUC", "the patient that costs most",
                 "ROC-AUC without it"), rows)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
