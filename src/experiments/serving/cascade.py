"""A specialist and a generalist (`experiments.predict ... fallback=<model>`, one MLflow
model logged by `experiments.cascade`, or a multi-source cross-validation's model with
`cv.cascade=true`): the first model answers the images its
out-of-distribution reference accepts - the images of the source it was trained on - and hands
the ones it refers to the fallback, typically a model trained on that source and others.

Why: a second source in training is what carries a model to other laboratories, but it costs
the home source's images accuracy (the two-source DenseNet121 probe 0.917 on held-out seed
images against 0.953 trained on them alone). Letting the home model answer where its referral
accepts kept 0.942 on them, and the unseen BreakHis patients lost nothing (0.778 / 0.801 per
image against 0.776 / 0.801; nested, 3 seeds: benchmarks/README, session 18).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.data.decode import ImageSource
from experiments.serving.inference import MODEL_FILE, REFER, ModelInfo, Predictor

FIRST, FALLBACK = "first", "fallback"
FALLBACK_DIR = "fallback"  # a cascade's model folder (cv.cascade): the fallback's files in it


@dataclass(frozen=True)
class Cascade:
    """`first` answers what its referral accepts; `fallback` answers the rest with its own
    decision (its own referral may still refer). Rows keep the first model's `ood_score`
    (why an image was handed over), add the fallback's as `fallback_ood_score` when it has a
    reference, and say which model answered in `answered_by`."""

    first: Predictor
    fallback: Predictor

    def __post_init__(self) -> None:
        if self.first.ood is None:
            raise ValueError("The first model of a cascade needs an out-of-distribution "
                             "reference (ood.npz) to decide what it hands over; this one has "
                             "none (trained with eval.ood_coverage=null?)")
        mine, theirs = self.first.info, self.fallback.info
        if (mine.class_names, mine.positive_class) != (theirs.class_names,
                                                       theirs.positive_class):
            raise ValueError(
                "The two models of a cascade must predict the same classes with the same "
                f"positive class. Received: first={mine.class_names} (positive "
                f"{mine.positive_class!r}), fallback={theirs.class_names} (positive "
                f"{theirs.positive_class!r})")

    @property
    def info(self) -> ModelInfo:
        """The first model's: classes, positive class, input size (the fallback's match)."""
        return self.first.info

    @property
    def columns(self) -> list[str]:
        """The output columns, in order."""
        extra = ["fallback_ood_score"] if self.fallback.ood is not None else []
        return [*(c for c in self.first.columns if c != "error"), *extra, "answered_by",
                "error"]

    def failed_row(self, error: str) -> dict[str, object]:
        """The row of an image that could not be read."""
        return {**self.first.failed_row(error), **self._unscored(), "answered_by": ""}

    def _unscored(self) -> dict[str, float]:
        """The fallback's score of an image it did not see: NaN, when it has a reference."""
        return {"fallback_ood_score": float("nan")} if self.fallback.ood is not None else {}

    def score(self, sources: Sequence[ImageSource], names: Sequence[str] | None = None,
              batch_size: int = 32, max_pixels: int | None = None,
              mpp: float | Sequence[float | None] | None = None) -> list[dict[str, object]]:
        """One row per source, as `Predictor.score`. Sources are read twice when handed over:
        give paths or bytes, not file objects."""
        rows = self.first.score(sources, names, batch_size, max_pixels, mpp)
        handed = [i for i, row in enumerate(rows)
                  if row["decision"] == REFER and not row["error"]]
        each = list(mpp) if isinstance(mpp, Sequence) else [mpp] * len(rows)
        answers = self.fallback.score(
            [sources[i] for i in handed], None if names is None else [names[i] for i in handed],
            batch_size, max_pixels, [each[i] for i in handed]) if handed else []
        out = [{**row, **self._unscored(), "answered_by": FIRST if not row["error"] else ""}
               for row in rows]
        for i, answer in zip(handed, answers, strict=True):
            own = ({"fallback_ood_score": answer["ood_score"]}
                   if self.fallback.ood is not None else {})
            out[i] = {**answer, **own, "ood_score": rows[i]["ood_score"],
                      "answered_by": FALLBACK}
        return out


def load_artifacts(files: Mapping[str, str | Path]) -> Predictor | Cascade:
    """A logged model from its pyfunc artifacts by name (`model`, `info`, `ood`, and a
    cascade's `fallback_*`; `tracking.model_registry.model_artifacts`): a cascade when it has
    a fallback."""
    first = Predictor.load(files["model"], files["info"], files.get("ood"))
    if "fallback_model" not in files:
        return first
    return Cascade(first, Predictor.load(files["fallback_model"], files["fallback_info"],
                                         files.get("fallback_ood")))


def load_folder(model_dir: Path) -> Predictor | Cascade:
    """A run's model folder: a cascade when it holds its fallback's files (cv.cascade), else
    the one model."""
    first = Predictor.load(model_dir / MODEL_FILE)
    if (model_dir / FALLBACK_DIR / MODEL_FILE).is_file():
        return Cascade(first, Predictor.load(model_dir / FALLBACK_DIR / MODEL_FILE))
    return first
