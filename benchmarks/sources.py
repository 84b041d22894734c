"""What do the stain tools do when a model trains on two sources? Measured on patients it never
saw (issue 18, item 4), with the linear probe of `experiment=transfer_cpu`.

    python benchmarks/sources.py --weights /abs/densenet121_imagenet_notop.weights.h5
    python benchmarks/sources.py --weights W --variants plain hed5 hed10 macenko

Both folders (`--data`, `--second`: the second source, with patient ids in its file names) are
decoded as runs decode them (224 px, centre square); ImageNet DenseNet121 cut after its third
dense block (`pool4_relu`, the preset's features), 8 dihedral views per image, computed once per
variant and cached in `--cache`. Variants of the features:
- plain: the images as they are (the preset);
- hedN: every view stain-jittered in HED space (sigma = bias = N/100, Tellez et al. 2019; the
  `hed` augmentation is N=5) - used as training views beside the plain ones (`plain+hedN`) or
  instead of them (`hedN`); tested on the plain views;
- macenko, reinhard: every image of both sources normalised to the first source's typical
  stain (`data.stain_normalization`, target fitted on `--data`), trained and tested normalised;
- <variant>-l, <variant>-r: the left (top) and right (bottom) end squares of a non-square image
  instead of its centre one - together they cover it ("covering crops"); a square image gives
  its centre square.
Probes: the preset's (standardised features, L2 logistic regression on every view, C by an
inner patient-grouped 5-fold CV of the log-loss, test views averaged); `+balanced`: the two
sources weighted equally; `+per-source`: features standardised per source (each test image with
its own source's statistics - an upper bound of what adapting to a new site could give);
`+patients` (and the "patients weighted equally" recipe): each image of the second source
weighted 1 / its patient's images, the source's total weight kept;
`mean`: each view's features averaged over the scales (one model input, three passes).
Splits: 5 folds stratified by label x source, a patient's images in one fold, `--repeats`
seeds, each its own partition of the patients (`experiments.data.group_folds`, as runs split;
until session 25 scikit-learn's StratifiedGroupKFold, whose seeds gave one partition of
BreakHis' patients); the probe's inner search for C splits as the project's does.
Columns: pooled out-of-fold metrics of each source (mean over seeds, min-max), the second
source per image and per patient (mean probability of a patient's images), and its ECE (no
temperature); then the probe trained on the first source alone, scored on every image of the
second. With several recipes, a second table sets each against the first seed by seed.
Colour variants: gray (luminance only) and haematoxylin (the H stain alone by colour
deconvolution), trained and tested alike - stain colour removed rather than matched. Scale
variants (magnification differs between laboratories): zoom2 (the centre at twice the
magnification) and zoom05 (half, surroundings mirrored) as more training views (`plain+zoomN`),
or as training and test views together (`multiscale`: test views averaged over the scales);
zoom2up: the x2 view made from the 224-px input (its centre half upsampled), no 448-px decode.
Layers: `variant@pool3_relu` cuts DenseNet121 elsewhere, `variant@pool3_relu+pool4_relu` puts
two layers' pooled features side by side (the "multiscale, upsampled x2, <layers>" recipes).
`--test-views K`: the test averages the first K dihedral views of each test variant (0-3 the
rotations, 4-7 the same flipped) - what a cheaper TTA costs; training keeps all 8.
"""

from __future__ import annotations

import argparse
import re
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from machine import cpu_line, paired, print_row, print_table, spread  # benchmarks/ (run from there)
from probe_recipes import by_group, scores
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold
from threadpoolctl import threadpool_limits

from experiments.data.group_folds import group_kfold
from experiments.models.pooling import GeneralizedMeanPooling2D

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
C_GRID = np.logspace(-4, 2, 13)
RECIPES = {  # name -> (training feature variants, test variant(s), probe option)
    "plain": (("plain",), "plain", ""),
    "plain +balanced": (("plain",), "plain", "balanced"),
    "plain +per-source": (("plain",), "plain", "per-source"),
    "plain +patients": (("plain",), "plain", "patients"),
    "plain+hed5": (("plain", "hed5"), "plain", ""),
    "hed5": (("hed5",), "plain", ""),
    "hed10": (("hed10",), "plain", ""),
    "macenko": (("macenko",), "macenko", ""),
    "reinhard": (("reinhard",), "reinhard", ""),
    "gray": (("gray",), "gray", ""),
    "plain+zoom2": (("plain", "zoom2"), "plain", ""),
    "plain+zoom05": (("plain", "zoom05"), "plain", ""),
    "multiscale": (("plain", "zoom2", "zoom05"), ("plain", "zoom2", "zoom05"), ""),
    "multiscale, plain test": (("plain", "zoom2", "zoom05"), "plain", ""),
    "multiscale, upsampled x2": (("plain", "zoom2up", "zoom05"), ("plain", "zoom2up", "zoom05"),
                                 ""),
    "plain+zoom05, both tested": (("plain", "zoom05"), ("plain", "zoom05"), ""),
    "scale-averaged features": (("plain", "zoom2", "zoom05"), ("plain", "zoom2", "zoom05"),
                                "mean"),
    "haematoxylin": (("haematoxylin",), "haematoxylin", ""),
}
RECIPES["multiscale, upsampled x2, + hed5 training views"] = (
    ("plain", "zoom2up", "zoom05", "hed5"), ("plain", "zoom2up", "zoom05"), "")
RECIPES["multiscale, upsampled x2, + hed10 training views"] = (
    ("plain", "zoom2up", "zoom05", "hed10"), ("plain", "zoom2up", "zoom05"), "")
for _layers in ("pool3_relu", "pool3_relu+pool4_relu", "pool4_relu+relu",
                "pool4_relu~mean+pool4_relu~std", "pool4_relu~mean+pool4_relu~max",
                "pool4_relu~gem", "pool4_relu~mean", "pool4_relu~std", "pool4_relu~max",
                "pool4_relu~gem+pool4_relu~std", "pool4_relu~gem2", "pool4_relu~gem4"):
    _views = tuple(f"{v}@{_layers}" for v in ("plain", "zoom2up", "zoom05"))
    RECIPES[f"multiscale, upsampled x2, {_layers}"] = (_views, _views, "")


_GEM_VIEWS = ("plain", "zoom2up", "zoom05")
_COVER = tuple(f"{v}-{side}" for v in _GEM_VIEWS for side in "lr")
RECIPES["multiscale, upsampled x2, gem, covering crops"] = (
    tuple(f"{v}@pool4_relu~gem" for v in _COVER), tuple(f"{v}@pool4_relu~gem" for v in _COVER),
    "")
RECIPES["multiscale, upsampled x2, gem, patients weighted equally"] = (
    tuple(f"{v}@pool4_relu~gem" for v in _GEM_VIEWS),
    tuple(f"{v}@pool4_relu~gem" for v in _GEM_VIEWS), "patients")
RECIPES["multiscale, upsampled x2, gem, per-source"] = (
    tuple(f"{v}@pool4_relu~gem" for v in _GEM_VIEWS),
    tuple(f"{v}@pool4_relu~gem" for v in _GEM_VIEWS), "per-source")
RECIPES["multiscale, upsampled x2, gem, centre trained, covering crops tested"] = (
    tuple(f"{v}@pool4_relu~gem" for v in _GEM_VIEWS), tuple(f"{v}@pool4_relu~gem" for v in _COVER),
    "")
RECIPES["multiscale, upsampled x2, gem, covering crops trained, centre tested"] = (
    tuple(f"{v}@pool4_relu~gem" for v in _COVER), tuple(f"{v}@pool4_relu~gem" for v in _GEM_VIEWS),
    "")


def grey(x: tf.Tensor) -> tf.Tensor:
    """Luminance in all three channels: no stain colour left, morphology kept."""
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))


def haematoxylin(x: tf.Tensor) -> tf.Tensor:
    """The haematoxylin stain alone (colour deconvolution, eosin and DAB set to zero): the
    nuclei, drawn in the same blue for every laboratory's stain mix."""
    from experiments.data.transforms import HED_FROM_RGB, RGB_FROM_HED

    density = -tf.math.log((x + 1.0) / 256.0)
    stains = tf.einsum("nhwc,cs->nhws", density, tf.constant(HED_FROM_RGB, tf.float32))
    stains = stains * tf.constant([1.0, 0.0, 0.0])
    density = tf.einsum("nhws,sc->nhwc", stains, tf.constant(RGB_FROM_HED, tf.float32))
    return tf.clip_by_value(256.0 * tf.exp(-density) - 1.0, 0.0, 255.0)


COLOUR_DROPS = {"gray": grey, "haematoxylin": haematoxylin}


def end_square(file: str, size: int, side: str) -> np.ndarray:
    """The first ("l": left or top) or last ("r": right or bottom) square of a non-square image
    along its longer side, at size x size: with the other end's square, the two cover the
    whole image, where the centre square drops its ends (a third of a BreakHis image). A
    square image gives its centre square, exactly as `load_image(resize="crop")`."""
    from PIL import Image

    from experiments.data.decode import load_image

    with Image.open(file) as image:
        width, height = image.size
        if width == height:
            return load_image(file, size, resize="crop")
        rgb = image.convert("RGB")
    short = min(width, height)
    offset = 0 if side == "l" else max(width, height) - short
    box = (offset, 0, offset + short, short) if width > height else \
        (0, offset, short, offset + short)
    return np.asarray(rgb.crop(box).resize((size, size), Image.Resampling.BILINEAR), np.uint8)


def at_scale(file: str, variant: str) -> np.ndarray:
    """The 224-px input of an image: its centre square (plain); zoom2: the centre 224 px of
    it decoded at 448 (twice the magnification); zoom05: decoded at 112 and mirrored out to
    224 (half the magnification, the missing surroundings reflected); zoom2up: the 224-px
    input's x2 view as the project makes it (`transforms.zoom_in`: the centre 112 px upsampled
    to 224, no new pixels), rounded back to uint8."""
    from experiments.data.decode import load_image
    from experiments.data.transforms import zoom_in

    if variant.startswith("mag"):  # "mag<k>_<view>": the preset's view of the k/10-x image
        power, _, view = variant[3:].partition("_")
        return at_magnification(file, int(power) / 10, view)
    variant, _, side = variant.partition("-")
    if side:  # one of the two end squares (end_square) instead of the centre one
        if variant == "zoom05":
            return np.pad(end_square(file, 112, side), ((56, 56), (56, 56), (0, 0)),
                          mode="reflect")
        square = end_square(file, 224, side)
        if variant == "plain":
            return square
        pixels = tf.constant(square[None], tf.float32)
        return np.asarray(zoom_in(pixels)[0]).round().clip(0, 255).astype("uint8")
    if variant == "zoom2up":
        pixels = tf.constant(load_image(file, 224, resize="crop")[None], tf.float32)
        return np.asarray(zoom_in(pixels)[0]).round().clip(0, 255).astype("uint8")
    if variant == "zoom2":
        return load_image(file, 448, resize="crop")[112:336, 112:336]
    if variant == "zoom05":
        return np.pad(load_image(file, 112, resize="crop"), ((56, 56), (56, 56), (0, 0)),
                      mode="reflect")
    return load_image(file, 224, resize="crop")


def at_magnification(file: str, factor: float, view: str) -> np.ndarray:
    """The model's `view` (plain, zoom2up, zoom05: the preset's three scales, made as the
    project makes them from its 224-px input) of the image at `factor` times the
    magnification the model sees it at (its shorter side at 224 px): decoded with its shorter
    side at 224 x factor and its centre 224 px kept - real pixels, no upsampling, for factor
    up to the shorter side / 224 (BreakHis' 460 px: 2.05x). A laboratory imaging at another
    magnification, simulated from the same patients' slides."""
    from experiments.data.decode import load_image
    from experiments.data.transforms import zoom_in, zoom_out

    side = round(224 * factor)
    top = (side - 224) // 2
    pixels = load_image(file, side, resize="crop")[top:top + 224, top:top + 224]
    if view == "plain":
        return pixels
    made = {"zoom2up": zoom_in, "zoom05": zoom_out}[view](tf.constant(pixels[None], tf.float32))
    return np.asarray(made[0]).round().clip(0, 255).astype("uint8")


def extract(variant: str, folders: dict[str, Path], weights: str, cache: Path
            ) -> dict[str, np.ndarray]:
    """(n, 8, C) features of each source's images under `variant`, with labels and files.
    `variant@layer1+layer2`: DenseNet121 cut at each layer, its pooled features side by side
    (default pool4_relu, the preset's)."""
    base, _, layers = variant.partition("@")
    if "+" in layers:
        parts = [extract(f"{base}@{layer}", folders, weights, cache)
                 for layer in layers.split("+")]
        joined = dict(parts[0])
        for name in folders:
            joined[name] = np.concatenate([part[name] for part in parts], axis=-1)
        return joined
    layer, _, pooling = (layers or "pool4_relu").partition("~")
    stem = base if layer == "pool4_relu" else f"{base}@{layer}"
    path = cache / (f"{stem}~{pooling}.npz" if pooling else f"{stem}.npz")
    if path.is_file():
        return dict(np.load(path))
    from experiments.data import stain
    from experiments.data.folders import scan_folder
    from experiments.data.transforms import dihedral_view, hed_jitter
    from experiments.models import features
    from experiments.models.classifier import build_classifier

    classifier = build_classifier("densenet121", weights, False, 224, 2, feature_layer=layer)
    extractor = (pooled_statistics(classifier) if pooling
                 else features.feature_model(classifier))
    decoded = {}
    for name, folder in folders.items():
        _, files, labels = scan_folder(folder)
        decoded[name] = (files, labels, np.stack([at_scale(f, base) for f in files]))
    normaliser = None
    if base in ("macenko", "reinhard"):
        normaliser = stain.fit(base, decoded["first"][2])
    out: dict[str, np.ndarray] = {}
    for name, (files, labels, images) in decoded.items():
        if normaliser is not None:
            images = stain.apply(normaliser, images)
        pixels = tf.convert_to_tensor(images, tf.float32)
        views = []
        for view in range(8):
            x = dihedral_view(pixels, view)
            if base in COLOUR_DROPS:
                x = COLOUR_DROPS[base](x)
            if base.startswith("hed"):
                strength = int(base[3:]) / 100
                x = hed_jitter(x, strength, strength, tf.constant([view, 17], tf.int32))
            views.append(extractor.predict(np.asarray(x), batch_size=32, verbose=0))
        out[name] = np.stack(views, 1)
        out[f"{name}_labels"] = np.asarray(labels)
        out[f"{name}_files"] = np.asarray([str(f) for f in files])
    cache.mkdir(parents=True, exist_ok=True)
    if not pooling:
        np.savez(path, **out)
        return out
    width = out["first"].shape[-1] // len(POOLINGS)
    for k, name in enumerate(POOLINGS):  # one pass computes every pooling: save each
        np.savez(cache / f"{stem}~{name}.npz", **{
            key: (value[..., k * width:(k + 1) * width] if key in folders else value)
            for key, value in out.items()})
    return dict(np.load(path))


POOLINGS = ("mean", "std", "max", "gem", "gem2", "gem4")


def pooled_statistics(classifier: keras.Model) -> keras.Model:
    """Raw image -> the feature map's spatial mean, standard deviation, maximum and
    generalised mean (GeM, Radenovic et al. 2018: p=3, and p=2, p=4) per channel, side by
    side: statistics beyond the average (`~std`, `~max`, `~gem`... variants; `~mean` is the
    preset's pooling)."""
    fmap = keras.ops.cast(classifier.get_layer("gap").input, "float32")
    mean = keras.ops.mean(fmap, axis=(1, 2))
    std = keras.ops.sqrt(keras.ops.maximum(
        keras.ops.mean(fmap * fmap, axis=(1, 2)) - mean * mean, 0.0))
    peak = keras.ops.max(fmap, axis=(1, 2))
    gems = [GeneralizedMeanPooling2D(power=p)(fmap) for p in (3.0, 2.0, 4.0)]  # the project's
    return keras.Model(classifier.input, keras.ops.concatenate([mean, std, peak, *gems], -1))


def view_rows(images: np.ndarray, views: int) -> np.ndarray:
    return np.concatenate([np.arange(i * views, (i + 1) * views) for i in images])


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the decided class's probability (equal-width bins)."""
    confidence = np.maximum(p, 1 - p)
    correct = (p >= 0.5) == y
    which = np.minimum(((confidence - 0.5) * 2 * bins).astype(int), bins - 1)
    return float(sum(np.mean(which == b) * abs(confidence[which == b].mean()
                                               - correct[which == b].mean())
                     for b in range(bins) if np.any(which == b)))


def out_of_fold(train_x: np.ndarray, test_x: np.ndarray, y: np.ndarray, source: np.ndarray,
                groups: np.ndarray, option: str, seed: int) -> np.ndarray:
    """Pooled out-of-fold probabilities of the positive class, one per image."""
    p = np.zeros(len(y))
    strata = y * 2 + source
    views, width = train_x.shape[1], train_x.shape[2]
    inner_folds = StratifiedGroupKFold(5, shuffle=True, random_state=seed)
    for train, test in group_kfold(strata, groups, 5, seed):
        x, q = train_x[train].astype(np.float64), test_x[test].astype(np.float64)
        if option == "per-source":
            for k in (0, 1):
                mean = x[source[train] == k].reshape(-1, width).mean(0)
                scale = x[source[train] == k].reshape(-1, width).std(0) + 1e-3
                x[source[train] == k] = (x[source[train] == k] - mean) / scale
                q[source[test] == k] = (q[source[test] == k] - mean) / scale
        flat = x.reshape(-1, width)
        mean, scale = flat.mean(0), flat.std(0) + 1e-3
        z, labels = (flat - mean) / scale, np.repeat(y[train], views)
        weight = None
        if option == "balanced":
            share = np.array([np.mean(source[train] == k) for k in (0, 1)])
            weight = np.repeat(0.5 / share[source[train]], views)
        if option == "patients":  # each patient of a source the same weight, the source's
            weight = patient_weights(groups[train])  # total unchanged
            weight = np.repeat(weight * len(train) / weight.sum(), views)
        inner = [(view_rows(a, views), view_rows(b, views)) for a, b in inner_folds.split(
            train, strata[train], groups[train])]
        search = LogisticRegressionCV(Cs=list(C_GRID), cv=inner, scoring="neg_log_loss",
                                      l1_ratios=(0.0,), use_legacy_attributes=False,
                                      max_iter=3000).fit(z, labels, sample_weight=weight)
        model = LogisticRegression(C=float(search.C_), max_iter=3000).fit(
            z, labels, sample_weight=weight)
        p[test] = model.predict_proba((q.reshape(-1, width) - mean) / scale)[:, 1].reshape(
            len(test), -1).mean(1)
    return p


def patient_weights(groups: np.ndarray) -> np.ndarray:
    """Each image's weight 1 / (its patient's images), scaled so that every source keeps the
    total weight of its images (a source's prefix before '/' or ':' names it; images of
    a source without patients are their own group and keep weight 1)."""
    counts = dict(zip(*np.unique(groups, return_counts=True), strict=True))
    weight = np.array([1.0 / counts[g] for g in groups])
    kinds = np.array([g.startswith("first/") for g in groups])
    for kind in (True, False):
        if (kinds == kind).any():
            weight[kinds == kind] *= (kinds == kind).sum() / weight[kinds == kind].sum()
    return weight


def first_only(train_x: np.ndarray, test_x: np.ndarray, y: np.ndarray, source: np.ndarray,
               seed: int) -> np.ndarray:
    """Probabilities of the second source's images from the probe trained on the first source
    alone (C by an inner 5-fold CV): what a model that never saw the second source does."""
    first = source == 0
    x, q = train_x[first].astype(np.float64), test_x[~first].astype(np.float64)
    views, width = x.shape[1], x.shape[2]
    flat = x.reshape(-1, width)
    mean, scale = flat.mean(0), flat.std(0) + 1e-3
    z, labels = (flat - mean) / scale, np.repeat(y[first], views)
    inner = [(view_rows(a, views), view_rows(b, views)) for a, b in StratifiedGroupKFold(
        5, shuffle=True, random_state=seed).split(y[first], y[first], np.arange(first.sum()))]
    search = LogisticRegressionCV(Cs=list(C_GRID), cv=inner, scoring="neg_log_loss",
                                  l1_ratios=(0.0,), use_legacy_attributes=False,
                                  max_iter=3000).fit(z, labels)
    model = LogisticRegression(C=float(search.C_), max_iter=3000).fit(z, labels)
    return model.predict_proba((q.reshape(-1, width) - mean) / scale)[:, 1].reshape(
        len(q), -1).mean(1)


def by_patient(p: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    return scores(*by_group(p, y, groups))


def source_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options of every two-source benchmark: weights, both folders, the second's patient
    pattern, repeats and the feature cache."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="DenseNet121 ImageNet no-top weights")
    parser.add_argument("--data", type=Path, default=SHARED / "biopsy-seed" / "train")
    parser.add_argument("--second", type=Path, default=SHARED / "breakhis-100x")
    parser.add_argument("--group-pattern", default=r"SOB_[BM]_([^-]+-\d+-[^-]+)-")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sources_features"))
    return parser


def image_groups(features: dict[str, np.ndarray], pattern: str, names: tuple[str, ...]
                 ) -> np.ndarray:
    """Each image's group: its own for the first source, its patient for the second."""
    found = re.compile(pattern)
    return np.array([f"first/{f}" for f in features["first_files"]]
                    + ([found.search(Path(f).name).group(1) for f in features["second_files"]]
                       if "second" in names else []))


def main(argv: list[str] | None = None) -> None:
    parser = source_arguments(__doc__)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--test-views", type=int, default=8, choices=range(1, 9),
                        help="test on the first K dihedral views of each test variant (TTA "
                        "cost; training keeps all 8)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    threadpool_limits(1, user_api="blas")  # as the probe fits (training/probe.py): 5-10x faster
    print(cpu_line(), flush=True)
    folders = {"first": args.data, "second": args.second}
    header = ("recipe", "first acc", "first AUC", "second acc", "second AUC", "second ECE",
              "patients acc", "patients AUC", "first-only: second acc", "AUC",
              "patients acc", "patients AUC", "s")
    rows, measured = [], {}
    for recipe in args.recipes:
        start = time.perf_counter()
        train_variants, test_variants, option = RECIPES[recipe]
        if isinstance(test_variants, str):
            test_variants = (test_variants,)
        data = {v: extract(v, folders, args.weights, args.cache)
                for v in {*train_variants, *test_variants}}
        test = data[test_variants[0]]
        y = np.concatenate([test["first_labels"], test["second_labels"]])
        source = np.repeat([0, 1], [len(test["first_labels"]), len(test["second_labels"])])
        groups = image_groups(test, args.group_pattern, ("first", "second"))
        train_x, test_x = (np.concatenate([np.concatenate([data[v]["first"], data[v]["second"]])
                                           for v in variants], axis=1)
                           for variants in (train_variants, test_variants))
        keep = [v * 8 + k for v in range(len(test_variants)) for k in range(args.test_views)]
        test_x = test_x[:, keep]
        if option == "mean":  # one feature per view: the mean over the scales
            train_x, test_x = (x.reshape(len(x), len(variants), -1, x.shape[-1]).mean(1)
                               for x, variants in ((train_x, train_variants),
                                                   (test_x, test_variants)))
        runs = []
        alone = first_only(train_x, test_x, y, source, 0)  # no folds: one fit is enough
        solo = (*scores(alone, y[source == 1]),
                *by_patient(alone, y[source == 1], groups[source == 1]))
        for seed in range(args.repeats):
            p = out_of_fold(train_x, test_x, y, source, groups, option, seed)
            first, second = source == 0, source == 1
            runs.append((*scores(p[first], y[first]), *scores(p[second], y[second]),
                         ece(p[second], y[second]),
                         *by_patient(p[second], y[second], groups[second]),
                         *solo))
        values = measured[recipe] = np.array(runs)
        rows.append((recipe, *(spread(column) for column in values.T),
                     f"{time.perf_counter() - start:.0f}"))
        print_row(rows[-1])
    print_table(header, rows)
    if len(measured) > 1:
        print_paired(measured)


def print_paired(measured: dict[str, np.ndarray]) -> None:
    """Each recipe against the first, seed by seed (the same partition of the patients): the
    mean difference and on how many seeds it is ahead / level / behind - what `--repeats`
    partitions of 16 patients can and cannot tell apart."""
    columns = {"first acc": 0, "second AUC": 3, "second ECE": 4, "patients acc": 5,
               "patients AUC": 6}
    names = list(measured)
    base = measured[names[0]]
    rows = []
    for name in names[1:]:
        diff = measured[name] - base
        rows.append((name, *(paired(diff[:, k]) for k in columns.values())))
    print(f"\nAgainst {names[0]!r}, paired by seed: mean difference (ahead/level/behind)")
    print_table(("recipe", *columns), rows)


if __name__ == "__main__":
    main()
