"""Running a model over images and their test-time views (dihedral, zoomed out and in): one
`predict` call for all views (the per-call overhead paid once), eagerly for a request's few
images."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from experiments.config.choices import TTA_MODES, TTA_VIEWS
from experiments.data.transforms import tta_view, tta_view_tensor

# Up to this many image views, models run eagerly: tracing `predict`'s graph costs more than
# it saves (a served request, a few files, MLflow's check of the input example).
EAGER_LIMIT = 64


def image_batches(images: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Unshuffled float32 batches of uint8 images."""
    ds = tf.data.Dataset.from_tensor_slices(images)
    return ds.batch(batch_size).map(lambda x: tf.cast(x, tf.float32))


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int,
                          tta: str = "none") -> np.ndarray:
    """p(class) for uint8 images, averaged over the views of `tta` (`TTA_VIEWS`)."""
    if tta not in TTA_MODES:
        raise ValueError(f"`eval.tta` must be one of {TTA_MODES}. Received: eval.tta={tta!r}")
    return predict_views(model, images, batch_size, TTA_VIEWS[tta]).mean(axis=0)


def predict_views(model: keras.Model, images: np.ndarray, batch_size: int,
                  views: Sequence[int]) -> np.ndarray:
    """(len(views), n, classes) p(class) of the given views of uint8 images (`tta_view`
    numbers; view 0: the image as it is), all in one `predict` call, so the per-call overhead
    is paid once."""
    return predict_view_outputs(model, images, batch_size, views)[0]


def predict_view_outputs(model: keras.Model, images: np.ndarray, batch_size: int,
                         views: Sequence[int]) -> list[np.ndarray]:
    """`predict_views` for a model with one or more outputs: a (len(views), n, width) array
    per output."""
    count = len(views)
    if len(images) == 0:
        return [np.empty((count, 0, int(shape[-1]))) for shape in _output_shapes(model)]
    if len(images) * count <= EAGER_LIMIT:  # a request's few images: no graph to trace
        batch = tf.convert_to_tensor(images, tf.float32)
        stacked = tf.concat([tta_view(batch, v) for v in views], axis=0)
        return _by_view(model(stacked, training=False), count, len(images))
    ds = image_batches(images, batch_size)
    if tuple(views) != (0,):
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(views, tf.int32)).flat_map(
            lambda v: image_batches(images, batch_size).map(lambda x: tta_view_tensor(x, v)))
        batches = -(-len(images) // batch_size)
        ds = ds.apply(tf.data.experimental.assert_cardinality(count * batches))
    return _by_view(model.predict(ds.prefetch(tf.data.AUTOTUNE), verbose=0), count,
                    len(images))


def _output_shapes(model: keras.Model) -> list[tuple]:
    shapes = model.output_shape
    return list(shapes) if isinstance(shapes, list) else [shapes]


def _by_view(outputs, views: int, n: int) -> list[np.ndarray]:
    """A model's output(s) for `views` stacked copies of n images, as (views, n, width)."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [np.asarray(o, np.float64).reshape(views, n, -1) for o in outputs]
