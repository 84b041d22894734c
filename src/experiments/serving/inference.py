"""Prediction outside training, the one code path for `experiments.predict`, the MLflow model
(`experiments.serving`) and the test evaluation: decode image files or bytes exactly as
training did, run the model with its test-time augmentation, apply its temperature and decide
at its threshold.

A run's model is a Keras file that takes raw RGB pixels in [0, 255] at `image_size` and gives
class probabilities (preprocessing, stain normalisation, a native-patch grid or an ensemble's
members are inside it) plus `model_info.json` (classes, input size, and the choices made on
validation). This module imports only numpy, Pillow, TensorFlow, Keras and the modules that
define the layers a saved model may hold, so serving needs nothing else of this project.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from experiments.config.choices import TTA_VIEWS
from experiments.data import stain  # noqa: F401  (register the layers saved models hold)
from experiments.data.decode import ImageSource, load_image
from experiments.models import (
    backbones,  # noqa: F401  (register the layers saved models hold)
    external,
    pooling,  # also registers the layer saved models may hold
)
from experiments.models.fused_bn import fuse_batchnorm
from experiments.serving.ood import OOD_FILE, OodReference
from experiments.serving.views import (
    predict_probabilities,
    predict_view_outputs,
    predict_views,
)

MODEL_FILE = "model.keras"


MODEL_INFO = "model_info.json"


# The decision for an image unlike the training images (its ood_score over the threshold).
REFER = "refer"


def load_model(path: str | Path) -> keras.Model:
    """Load a saved `.keras` model with Keras' safe mode on (no arbitrary code) and without its
    training state (predicting needs no optimizer; restoring one only warns); its
    BatchNormalization layers run as TensorFlow's fused op (same numbers, faster). A model
    with a KerasHub backbone imports keras_hub first (it registers the layers)."""
    model = external.load_saved(path)
    fuse_batchnorm(model)
    return model


def in_memory(model: keras.Model) -> keras.Model:
    """A model that is already loaded, prepared as `load_model` prepares a loaded one."""
    fuse_batchnorm(model)
    return model


def save_model(model: keras.Model, info: Mapping[str, Any], folder: Path) -> Path:
    """Write `model.keras` and `model_info.json` into `folder`, each replaced atomically (a
    run killed while saving never leaves half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{MODEL_FILE}.partial.keras"
    model.save(staging)
    staging.replace(folder / MODEL_FILE)
    staging_info = folder / f".{MODEL_INFO}.partial"
    staging_info.write_text(json.dumps(dict(info), indent=2))
    staging_info.replace(folder / MODEL_INFO)
    return folder / MODEL_FILE


def feature_extractor(model: keras.Model) -> keras.Model | None:
    """image -> the pooled backbone features the out-of-distribution score measures
    (`ood_features`): the model's own, or those of the network inside a wrapper (stain
    normalisation in front) or of an ensemble's first member. None when the model has no
    `gap` layer."""
    if "gap" in {layer.name for layer in model.layers}:
        return keras.Model(model.input, ood_features(model.get_layer("gap")))
    inputs = keras.Input(model.input_shape[1:])
    x = inputs
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            inner = feature_extractor(layer)
            return None if inner is None else keras.Model(inputs, inner(x))
        x = layer(x)
    return None


def ood_features(gap: keras.layers.Layer):
    """The average of the feature map the head pools: the `gap` layer's output, or for a GeM
    head (`backbone.global_pool=gem`) the plain average of the same map, in float32. GeM
    weighs a few strong positions more, which tells the classes apart a little better and
    another laboratory's images from the training ones worse (BreakHis against held-out seed
    images: AUROC 0.96 against 0.99; benchmarks/README, session 15)."""
    if isinstance(gap, pooling.GeneralizedMeanPooling2D):
        return keras.layers.GlobalAveragePooling2D(name="ood_average", dtype="float32")(
            gap.input)
    return gap.output


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens over-confident predictions, ranking unchanged."""
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def decide(probabilities: np.ndarray, positive: int,
           threshold: float | np.ndarray) -> np.ndarray:
    """Two classes: the class index of each row at the threshold on p(positive) (one
    threshold, or one per row)."""
    return np.where(probabilities[:, positive] >= threshold, positive, 1 - positive)


@dataclass(frozen=True)
class ModelInfo:
    """model_info.json: what predicting needs besides the model file."""

    class_names: tuple[str, ...]
    image_size: int
    tta: str = "none"
    temperature: float = 1.0
    threshold: float | None = None  # on p(positive_class), chosen on validation
    positive_class: str | None = None
    resize: str = "squash"  # how images become squares (models saved before it: squash)
    input_mpp: float | None = None  # micrometres per pixel of the model's input, when known

    @classmethod
    def read(cls, path: str | Path) -> ModelInfo:
        raw = json.loads(Path(path).read_text())
        return cls(tuple(raw["class_names"]), int(raw["image_size"]), raw.get("tta", "none"),
                   float(raw.get("temperature") or 1.0), raw.get("threshold"),
                   raw.get("positive_class"), raw.get("resize", "squash"),
                   raw.get("input_mpp"))

    @property
    def decides(self) -> bool:
        """A decision column at the threshold: two classes and a threshold."""
        return self.threshold is not None and len(self.class_names) == 2


@dataclass(frozen=True)
class Predictor:
    """A loaded model with its info: images in, the run's final probabilities and decisions
    out (the same numbers wherever it runs); with an out-of-distribution reference, also each
    image's `ood_score` and the decision `refer` over its threshold."""

    model: keras.Model
    info: ModelInfo
    ood: OodReference | None = None

    @classmethod
    def load(cls, model_path: str | Path, info_path: str | Path | None = None,
             ood_path: str | Path | None = None) -> Predictor:
        """The model file and the model_info.json (and ood.npz, when the run fitted one)
        beside it, or at the paths given."""
        info_path = Path(info_path or Path(model_path).with_name(MODEL_INFO))
        model = load_model(model_path)
        info = ModelInfo.read(info_path)
        size = int(model.input_shape[1])
        if size != info.image_size:
            raise ValueError(f"{model_path}: model input {size} px but {info_path} says "
                             f"{info.image_size}")
        ood_path = Path(ood_path or Path(model_path).with_name(OOD_FILE))
        return cls(model, info, OodReference.load(ood_path) if ood_path.is_file() else None)

    @property
    def columns(self) -> list[str]:
        """The output columns, in order."""
        ood = ["ood_score"] if self.ood is not None else []
        return [*(f"p_{c}" for c in self.info.class_names), "predicted", "decision", *ood,
                "error"]

    @functools.cached_property
    def features(self) -> keras.Model | None:
        """image -> pooled features, for the out-of-distribution score."""
        return feature_extractor(self.model) if self.ood is not None else None

    @functools.cached_property
    def joint(self) -> keras.Model | None:
        """image -> (probabilities, pooled features) in one pass, for a model with a
        reference whose `gap` layer is its own (not inside a wrapper or an ensemble)."""
        if self.ood is None or "gap" not in {layer.name for layer in self.model.layers}:
            return None
        return keras.Model(self.model.input,
                           [self.model.output, ood_features(self.model.get_layer("gap"))])

    def ood_scores(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Each image's distance to the training images (on the image as it is, view 0)."""
        if self.ood is None or self.features is None:
            raise ValueError("This model has no out-of-distribution reference (ood.npz)")
        return self.ood.score(predict_views(self.features, images, batch_size, (0,))[0], images)

    def probabilities(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Final probabilities of uint8 images: test-time augmentation, then temperature."""
        raw = predict_probabilities(self.model, images, batch_size, self.info.tta)
        return apply_temperature(raw, self.info.temperature) if len(raw) else raw

    def probabilities_and_scores(self, images: np.ndarray, batch_size: int = 32
                                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """`probabilities` and, with a reference, `ood_scores` - from one pass over the
        images when the model allows (the plain view's features come with its
        probabilities), else two."""
        if self.ood is None:
            return self.probabilities(images, batch_size), None
        if self.joint is None or len(images) == 0:
            return self.probabilities(images, batch_size), self.ood_scores(images, batch_size)
        probs, features = predict_view_outputs(self.joint, images, batch_size,
                                               TTA_VIEWS[self.info.tta])
        raw = probs.mean(axis=0)
        return (apply_temperature(raw, self.info.temperature),
                self.ood.score(features[0], images))

    def score(self, sources: Sequence[ImageSource], names: Sequence[str] | None = None,
              batch_size: int = 32, max_pixels: int | None = None,
              mpp: float | Sequence[float | None] | None = None) -> list[dict[str, object]]:
        """One row per source (file path, bytes or file object): p_<class>, predicted,
        decision (at the validation threshold; two classes) and error (an unreadable image, or
        one over `max_pixels`, is reported there, without probabilities, instead of failing
        the batch)."""
        names = list(names) if names is not None else [
            str(s) if isinstance(s, (str, Path)) else f"image {i}" for i, s in enumerate(sources)]
        stacked, errors = self.decode(sources, names, max_pixels, mpp)
        found, distances = (self.probabilities_and_scores(stacked, batch_size)
                            if stacked is not None else (np.empty((0, 0)), None))
        probs, scores = iter(found), iter(distances if distances is not None else [])
        return [self.failed_row(errors[i]) if i in errors
                else self._row(next(probs), next(scores, None)) for i in range(len(names))]

    def decode(self, sources: Sequence[ImageSource], names: Sequence[str],
               max_pixels: int | None = None,
               mpp: float | Sequence[float | None] | None = None
               ) -> tuple[np.ndarray | None, dict[int, str]]:
        """The readable images as the model takes them (None: none readable), and why each
        other one (by index) could not be read. `mpp`: the images' micrometres per pixel (one
        for all, or one per image; None: as the training images), rescaled to the model's."""
        each = list(mpp) if isinstance(mpp, Sequence) else [mpp] * len(sources)
        images, errors = [], {}
        for index, (source, name) in enumerate(zip(sources, names, strict=True)):
            try:
                images.append(load_image(source, self.info.image_size, name=name,
                                         max_pixels=max_pixels, resize=self.info.resize,
                                         scale=self.scale(each[index])))
            except ValueError as error:
                errors[index] = str(error).removeprefix(f"{name}: ")
        return (np.stack(images) if images else None), errors

    def scale(self, mpp: float | None) -> float | None:
        """How much an image at `mpp` is resized to the model's input scale (None: not)."""
        if mpp is None or mpp != mpp:  # None or NaN (a serving row without mpp)
            return None
        if self.info.input_mpp is None:
            raise ValueError(f"mpp={mpp} given but the model does not know its training scale "
                             "(train with data.mpp)")
        return float(mpp) / self.info.input_mpp

    def failed_row(self, error: str) -> dict[str, object]:
        """The row of an image that could not be read: no probabilities, the reason."""
        ood = {"ood_score": float("nan")} if self.ood is not None else {}
        return {**{f"p_{c}": float("nan") for c in self.info.class_names}, "predicted": "",
                "decision": "", **ood, "error": error}

    def _row(self, p: np.ndarray, ood_score: float | None = None) -> dict[str, object]:
        names = self.info.class_names
        decision = ""
        threshold = self.info.threshold
        if self.info.decides and threshold is not None:
            positive = names.index(self.info.positive_class or names[-1])
            decision = names[int(decide(p[None], positive, threshold)[0])]
        ood: dict[str, object] = {}
        if self.ood is not None and ood_score is not None:
            ood = {"ood_score": float(ood_score)}
            if self.ood.refer(np.array([ood_score]))[0]:
                decision = REFER
        return {**{f"p_{c}": float(v) for c, v in zip(names, p, strict=True)},
                "predicted": names[int(np.argmax(p))], "decision": decision, **ood, "error": ""}
