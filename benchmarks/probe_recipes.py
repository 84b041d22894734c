"""Which recipe on pretrained features? Input size x feature layer x probe, by repeated nested
cross-validation on a labeled folder and, trained on all of it, on an external cohort.

    python benchmarks/probe_recipes.py --weights /abs/densenet121_imagenet_notop.weights.h5
    python benchmarks/probe_recipes.py --weights W --sizes 224 448 --layers pool4_relu relu

Features: the project's own classifier cut at each layer (`backbone.feature_layer`; `relu` is
DenseNet121's last block, as without a cut), images decoded as runs decode them (centre
square, `data.resize=crop`), 8 dihedral views, float32; computed once per size and cached in
`--cache` (one forward pass gives every layer). Probes (UNI's protocol, Chen et al. 2024):
- lr: standardised features, L2 logistic regression on every view, C chosen by an inner
  5-fold CV of the log-loss (`finetune=linear_probe` with `cv.refit`), views averaged (TTA);
- knn20: k=20 nearest neighbours on centred, L2-normalised features (view-averaged);
- simpleshot: nearest class centroid on the same features.
Columns: mean out-of-fold accuracy / ROC-AUC over `--repeats` 5-fold splits of `--data`; the
probe trained on all of `--data` scored on `--external` (images, and patients when
`--group-pattern` finds them); seconds.
"""

from __future__ import annotations

import argparse
import re
import time
import warnings
from pathlib import Path

import numpy as np
from machine import cpu_line, print_row, print_table  # benchmarks/ (run from there)
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
C_GRID = np.logspace(-4, 2, 13)
LAYERS = ("pool3_relu", "pool4_relu", "relu")  # DenseNet121: after dense blocks 2, 3, 4


def extract(folder: Path, size: int, weights: str, cache: Path) -> dict[str, np.ndarray]:
    """Per layer (n, 8, C) features of every image of a class folder, with labels/files."""
    path = cache / f"{folder.name}_{size}.npz"
    if path.is_file():
        return dict(np.load(path))
    import keras
    import tensorflow as tf

    from experiments.data.decode import load_image
    from experiments.data.folders import scan_folder
    from experiments.data.transforms import dihedral_view
    from experiments.models.classifier import build_classifier

    _, files, labels = scan_folder(folder)
    images = np.stack([load_image(f, size, resize="crop") for f in files])
    classifier = build_classifier("densenet121", weights, False, size, 2)
    backbone = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    outputs = [keras.layers.GlobalAveragePooling2D()(backbone.get_layer(n).output)
               for n in LAYERS]
    cut = keras.Model(backbone.input, outputs)
    extractor = keras.Model(classifier.input,
                            cut(classifier.get_layer("preprocess")(classifier.input)))
    pixels = tf.convert_to_tensor(images, tf.float32)
    per_view = [extractor.predict(np.asarray(dihedral_view(pixels, v)), batch_size=32,
                                  verbose=0) for v in range(8)]
    out = {name: np.stack([view[i] for view in per_view], 1) for i, name in enumerate(LAYERS)}
    out.update(labels=np.asarray(labels), files=np.asarray(files))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def view_folds(y: np.ndarray, views: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rows = [np.arange(i * views, (i + 1) * views) for i in range(len(y))]
    return [(np.concatenate([rows[i] for i in tr]), np.concatenate([rows[i] for i in te]))
            for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(y, y)]


def fit_lr(x: np.ndarray, y: np.ndarray, seed: int):
    n, views, width = x.shape
    flat = x.reshape(-1, width)
    mean, scale = flat.mean(0), flat.std(0) + 1e-3
    z, labels = (flat - mean) / scale, np.repeat(y, views)
    search = LogisticRegressionCV(Cs=list(C_GRID), cv=view_folds(y, views, seed),
                                  scoring="neg_log_loss", l1_ratios=(0.0,),
                                  use_legacy_attributes=False, max_iter=3000).fit(z, labels)
    model = LogisticRegression(C=float(search.C_), max_iter=3000).fit(z, labels)
    return lambda q: model.predict_proba((q.reshape(-1, width) - mean) / scale)[:, 1].reshape(
        len(q), views).mean(1)


def centred_unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    centred = x.mean(1) - mean
    return centred / np.linalg.norm(centred, axis=-1, keepdims=True)


def fit_knn20(x: np.ndarray, y: np.ndarray, seed: int):
    mean = x.reshape(-1, x.shape[-1]).mean(0)
    reference = centred_unit(x, mean)
    return lambda q: y[np.argsort(-(centred_unit(q, mean) @ reference.T), 1)[:, :20]].mean(1)


def fit_simpleshot(x: np.ndarray, y: np.ndarray, seed: int):
    mean = x.reshape(-1, x.shape[-1]).mean(0)
    unit = centred_unit(x, mean)
    centroids = np.stack([unit[y == c].mean(0) for c in (0, 1)])

    def predict(q: np.ndarray) -> np.ndarray:
        d = ((centred_unit(q, mean)[:, None] - centroids[None]) ** 2).sum(-1)
        return 1 / (1 + np.exp(-10 * (d[:, 0] - d[:, 1])))  # a score for ROC-AUC
    return predict


PROBES = {"lr": fit_lr, "knn20": fit_knn20, "simpleshot": fit_simpleshot}


def scores(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return float(np.mean((p > 0.5) == y)), float(roc_auc_score(y, p))


def by_group(p: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    names = np.unique(groups)
    return (np.array([p[groups == g].mean() for g in names]),
            np.array([y[groups == g][0] for g in names]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="DenseNet121 ImageNet no-top weights")
    parser.add_argument("--data", type=Path, default=SHARED / "biopsy-seed" / "train")
    parser.add_argument("--external", type=Path, default=SHARED / "breakhis-100x")
    parser.add_argument("--group-pattern", default=r"SOB_[BM]_([^-]+-\d+-[^-]+)-")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--probes", nargs="+", default=list(PROBES), choices=list(PROBES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/probe_recipes"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    threadpool_limits(1, user_api="blas")  # as the probe fits (training/probe.py): 5-10x faster
    print(cpu_line(), flush=True)
    header = ("size", "layer", "probe", "CV accuracy", "CV ROC-AUC", "external accuracy",
              "external ROC-AUC", "patients accuracy", "patients ROC-AUC", "s")
    rows = []
    for size in args.sizes:
        own = extract(args.data, size, args.weights, args.cache)
        other = extract(args.external, size, args.weights, args.cache)
        groups = np.array([(re.search(args.group_pattern, Path(f).name) or [None, f])[1]
                           for f in other["files"]])
        for layer in args.layers:
            x, y, xe, ye = own[layer], own["labels"], other[layer], other["labels"]
            for probe in args.probes:
                start, cv = time.perf_counter(), []
                for repeat in range(args.repeats):
                    oof = np.zeros(len(y))
                    for tr, te in StratifiedKFold(5, shuffle=True,
                                                  random_state=repeat).split(y, y):
                        oof[te] = PROBES[probe](x[tr], y[tr], repeat)(x[te])
                    cv.append(scores(oof, y))
                external = PROBES[probe](x, y, 0)(xe)
                row = (str(size), layer, probe, *(f"{v:.3f}" for v in np.mean(cv, 0)),
                       *(f"{v:.3f}" for v in scores(external, ye)),
                       *(f"{v:.3f}" for v in scores(*by_group(external, ye, groups))),
                       f"{time.perf_counter() - start:.0f}")
                rows.append(row)
                print_row(row)
    print_table(header, rows)


if __name__ == "__main__":
    main()
