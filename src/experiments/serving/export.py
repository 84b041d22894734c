"""The model a run hands to its users: raw RGB image in, class probabilities out.

The trained network is wrapped in what prediction needs in front of it - the stain normaliser
fitted on the training split, the grid of native-resolution patches whose predictions it
averages - and several such models (cross-validation folds, a sweep's seeds) can be averaged
into one ensemble. Each is saved as `model.keras` with `model_info.json` (classes, input size,
test-time augmentation, and the temperature and threshold chosen on validation or on pooled
out-of-fold predictions) and logged as the run's MLflow model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from experiments.data import patches, stain
from experiments.errors import DataError
from experiments.serving import inference, views
from experiments.serving.ood import OodReference, fit_reference


def deliverable(network: keras.Model, image_size: int, patch_size: int | None,
                stain_layer: stain.StainNormalization | None) -> keras.Model:
    """image -> stain normalisation (when fitted) -> the patch grid (when trained on patches)
    -> the network; wrappers in float32 whatever the training's precision policy."""
    model = network
    if patch_size is not None:
        model = patches.with_patch_grid(model, image_size, patch_size)
    if stain_layer is None:
        return model
    inputs = keras.Input((image_size, image_size, 3), name="image")
    normalized = stain.StainNormalization.from_config(
        {**stain_layer.get_config(), "dtype": "float32"})(inputs)
    return keras.Model(inputs, model(normalized), name=model.name)


def ensemble(members: Sequence[keras.Model], name: str = "ensemble") -> keras.Model:
    """One model whose output is the mean of the members' probabilities (standard layers:
    it saves, loads and serves like a single model)."""
    if not members:
        raise DataError("An ensemble needs at least one member model")
    sizes = {tuple(m.input_shape[1:]) for m in members}
    if len(sizes) != 1:
        raise DataError(f"Ensemble members take different input shapes: {sorted(sizes)}")
    inputs = keras.Input(members[0].input_shape[1:], name="image")
    outputs = [keras.Model(m.input, m.output, name=f"member_{i + 1}")(inputs)
               for i, m in enumerate(members)]
    averaged = outputs[0] if len(outputs) == 1 else keras.layers.Average(
        name="member_average", dtype="float32")(outputs)
    return keras.Model(inputs, averaged, name=name)


def model_info(class_names: Sequence[str], image_size: int, positive: int, tta: str,
               temperature: float, threshold: float | None, **extra: Any) -> dict[str, Any]:
    """model_info.json: classes, input size, and the choices made on held-out predictions
    (TTA, temperature, decision threshold on p(positive class)); `extra` describes the model
    (backbone, kind, members, ...)."""
    return {"class_names": list(class_names), "image_size": image_size,
            "positive_class": class_names[positive], "tta": tta,
            "temperature": float(temperature), "threshold": threshold, **extra}


def pooled_features(model: keras.Model, images: np.ndarray,
                    batch_size: int = 64) -> np.ndarray | None:
    """The pooled backbone features `model` classifies, of uint8 images as they are (view 0);
    None when the model has none (`inference.feature_extractor`)."""
    extractor = inference.feature_extractor(model)
    if extractor is None:
        return None
    return views.predict_views(extractor, images, batch_size, (0,))[0]


def ood_reference(model: keras.Model, images: np.ndarray, coverage: float, seed: int,
                  stain: bool = True) -> OodReference | None:
    """The out-of-distribution reference of `model` fitted on its training images' pooled
    features (and, with `stain`, their stain statistics; `experiments.serving.ood`); None when
    the model has no pooled features."""
    features = pooled_features(model, images)
    return None if features is None else fit_reference(features, coverage, seed=seed,
                                                        images=images if stain else None)
