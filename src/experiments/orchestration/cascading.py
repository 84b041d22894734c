"""`cv.cascade`: a cross-validation on several sources whose model is a cascade
(`serving.cascade`) - a model trained on the home source alone (data.root) answers the images
its out-of-distribution referral accepts, the model trained on every source answers the rest.

Why: a second source in training carries a model to other laboratories but costs the home
images accuracy (the two-source DenseNet121 probe 0.917 on held-out study images, 0.953
trained on them alone); the cascade keeps 0.942 on them and loses nothing on unseen BreakHis
patients (nested, 3 seeds: benchmarks/README, session 18).

The estimate is the cascade's, out of fold: every fold also trains a home model on its home
training and validation images (child run `fold k home`), tested on the fold's whole test
split; each test image takes the home model's answer where that model's referral (fitted on
its own training images) accepts it, else the fold's all-source model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from experiments.config.cohorts import MAIN_SOURCE
from experiments.config.instantiate import Components
from experiments.config.schema import Config, EvalConfig
from experiments.data import loading
from experiments.data import splits as splits_lib
from experiments.evaluation.evaluate import Evaluation
from experiments.evaluation.metrics import Predictions, classification_metrics
from experiments.orchestration.oof import Fold, pooled_metrics, referred_of

HOME = "home"  # the home model's fold runs and refit: `<run> fold k home`, `<run> home refit`


def home_settings(settings: Config, components: Components) -> tuple[Config, Components]:
    """The settings (and recorded params) of the home model's runs and operating point: its
    temperature per cv.home_temperature (null: eval.temperature_scaling, as the all-source
    model's)."""
    chosen = settings.cv.home_temperature
    if chosen is None:
        return settings, components
    evaluation = dataclasses.replace(settings.eval, temperature_scaling=chosen)
    return (dataclasses.replace(settings, eval=evaluation), dataclasses.replace(
        components, params={**components.params, "eval.temperature_scaling": chosen}))


def of_home(split: splits_lib.Split) -> splits_lib.Split:
    """The images of `split` from data.root (the home source)."""
    if split.sources is None:
        raise ValueError("cv.cascade needs images of several sources (data.sources)")
    return split.subset(np.flatnonzero(np.asarray(split.sources) == MAIN_SOURCE))


def home_splits(splits: splits_lib.Splits) -> splits_lib.Splits:
    """A fold's splits for its home model: trained and validated on the home images, tested
    on the whole test split (every test image is routed)."""
    return dataclasses.replace(splits, train=of_home(splits.train), val=of_home(splits.val))


def home_data(loaded: loading.LoadedData) -> loading.LoadedData:
    """The home images alone: what the home model is refitted on."""
    return dataclasses.replace(loaded, pool=of_home(loaded.pool))


def routed(fallback: Predictions, home: Predictions, accepted: np.ndarray) -> Predictions:
    """The home model's predictions where it accepts the image, else the fallback's."""
    if fallback.files != home.files:
        raise RuntimeError("A fold's home and all-source models were tested on different "
                           "images; they must share the fold's test split")
    probabilities = np.where(accepted[:, None], home.probabilities, fallback.probabilities)
    return dataclasses.replace(fallback, probabilities=probabilities)


def cascade_fold(fallback: Fold, home: Fold, positive: int) -> Fold:
    """The fold's cascade: its all-source model's results with the home model's answers
    on the test images the home model's referral accepts (`Evaluation.referred`: which went
    to the fallback)."""
    mine, theirs = home.evaluation, fallback.evaluation
    if mine.referred is None:
        raise RuntimeError(f"Fold {home.number}'s home model fitted no out-of-distribution "
                           "referral to route by")
    accepted = ~mine.referred

    plain, test = (routed(getattr(theirs, name), getattr(mine, name), accepted)
                   for name in ("plain", "test"))
    tta = None if theirs.tta is None or mine.tta is None else routed(theirs.tta, mine.tta,
                                                                     accepted)
    metrics = classification_metrics(plain, positive, "test_")
    if tta is not None:
        metrics.update(classification_metrics(tta, positive, "test_tta_"))
    # both decide at the one fixed threshold (cv.cascade), 0.5 for two classes
    metrics.update(classification_metrics(test, positive, "test_op_"))
    evaluation = Evaluation(metrics, plain, tta, test, theirs.val, theirs.val_raw,
                            theirs.threshold, referred=mine.referred)
    return dataclasses.replace(fallback, evaluation=evaluation)


def cascade_folds(fallback: Sequence[Fold], home: Sequence[Fold], positive: int) -> list[Fold]:
    """Every fold's cascade, fold by fold."""
    return [cascade_fold(f, h, positive) for f, h in zip(fallback, home, strict=True)]


def cascade_metrics(cascade: Sequence[Fold], fallback: Sequence[Fold], positive: int,
                    settings: EvalConfig) -> dict[str, float]:
    """The parent's metrics: the cascade's pooled out-of-fold test_* (as any cross-
    validation's), the share of images the home model answered (test_answered_by_first,
    overall and per source), and the all-source model's own pooled metrics as fallback_test_*
    (what a cascade gains over it)."""
    # its two models have a temperature each: not the one test_shipped_ece describes
    metrics = pooled_metrics(cascade, positive, settings, one_temperature=False)
    accepted = ~referred_of(cascade)
    sources = np.asarray([s for f in cascade for s in f.evaluation.test.sources or ()])
    metrics["test_answered_by_first"] = float(accepted.mean())
    for name in sorted(set(sources)):
        metrics[f"test_source_{name}_answered_by_first"] = float(accepted[sources == name].mean())
    alone = pooled_metrics(fallback, positive, settings)
    metrics.update({f"fallback_{name}": value for name, value in alone.items()
                    if name.startswith("test_")})
    return metrics
