"""The MLflow model a run logs: a pyfunc `PythonModel` around `inference.Predictor`.

Why a PythonModel and not the Keras flavor: a client of `mlflow models serve` or of
`mlflow.pyfunc.load_model` has image files, not 4-D tensors at the model's input size, and needs
the run's test-time augmentation, temperature and validation threshold applied the way
`experiments.predict` applies them. The model carries its `.keras` file and `model_info.json` as
artifacts and this package as `code_paths` (only `inference` and the layer modules are
imported when it loads), so it loads and serves in a Python that never installed this project.

Input: a DataFrame with a column `image` (the image file's bytes, base64-encoded; raw bytes also
work from Python) and/or `path` (a file inside the folder the deployment allows; refused by
default), one of them per row; any format Pillow reads, within the limits of
`experiments.serving.limits`. An optional column `mpp` gives an image's micrometres per pixel:
it is rescaled to the model's training scale (a model trained with data.mpp).
Output: one row per input, `p_<class>` for each class, `predicted`, `decision` (at the threshold
chosen on validation; two classes; `refer` for an image unlike the training images), `ood_score`
(when the run fitted an out-of-distribution reference) and `error` (an unreadable or refused
image is reported there); a cascade's (`experiments.cascade`) also `answered_by` (and
`fallback_ood_score` when its fallback has a reference). A request without either column, or
with more rows than allowed, is refused as a whole (HTTP 400 from `mlflow models serve`, one
line).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel
from PIL import Image

from experiments.serving.cascade import load_artifacts
from experiments.serving.limits import ServingLimits

INPUT_COLUMNS = ("image", "path")


class RequestRefused(MlflowException):
    """A request refused as a whole: HTTP 400 whose message is this one line.

    MLflow's scoring server prefixes the message of an MlflowException raised by `predict` with
    the whole input ("Failed to predict data '<every row>'"), which would echo a client's images
    back in the error; this exception keeps its message as it was raised."""

    def __init__(self, reason: str) -> None:
        self._reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        """Ignored: the reason stays as raised."""


class ImageClassifier(PythonModel):
    """A run's classifier for MLflow: image bytes or paths in, the run's final predictions
    out."""

    def load_context(self, context: Any) -> None:
        self.predictor = load_artifacts(context.artifacts)  # one model, or a cascade
        self.limits = ServingLimits.resolve(getattr(context, "model_config", None))

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        """One row of predictions per input row (`image` and/or `path`)."""
        frame = pd.DataFrame(model_input)
        try:
            self.limits.check_rows(len(frame))
            sources, names = read_sources(frame, self.limits)
        except ValueError as error:
            raise RequestRefused(str(error)) from None
        scales = row_mpp(frame)
        readable = [(source, name, mpp) for source, name, mpp
                    in zip(sources, names, scales, strict=True)
                    if not isinstance(source, ValueError)]
        scored = iter(self.predictor.score([source for source, _, _ in readable],
                                           [name for _, name, _ in readable],
                                           max_pixels=self.limits.max_image_pixels,
                                           mpp=[mpp for _, _, mpp in readable]))
        rows = [next(scored) if not isinstance(source, ValueError)
                else self.predictor.failed_row(str(source)) for source in sources]
        return unscored_as_null(pd.DataFrame(rows, columns=self.predictor.columns))


def unscored_as_null(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with its missing numbers (an unreadable image's scores, the fallback score of
    an image a cascade's first model answered) as None: MLflow's server writes NaN as a bare
    `NaN`, which is not JSON - JavaScript's JSON.parse and most clients refuse the whole
    answer - and None as `null`. Columns with nothing missing stay float."""
    frame = frame.copy()
    for column in frame.columns[frame.isna().any()]:
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def row_mpp(frame: pd.DataFrame) -> list[float | None]:
    """Each row's optional `mpp` (micrometres per pixel of its image; empty: as trained)."""
    if "mpp" not in frame.columns:
        return [None] * len(frame)
    values = pd.to_numeric(frame["mpp"], errors="coerce")
    given = [_given(v) for v in frame["mpp"]]
    # not a number: -1, which the row's scoring reports as an error (never silently ignored)
    return [None if not g else (-1.0 if np.isnan(v) else float(v))
            for v, g in zip(values, given, strict=True)]


def read_sources(frame: pd.DataFrame, limits: ServingLimits | None = None,
                 ) -> tuple[list[bytes | str | ValueError], list[str]]:
    """Each row's image: its decoded `image` bytes, else the file its `path` names; a row with
    neither, with text that is not base64, with a refused path or over the byte limit gets a
    ValueError in its place (reported per row). Raises ValueError when neither column is
    there."""
    limits = limits or ServingLimits()
    present = [c for c in INPUT_COLUMNS if c in frame.columns]
    if not present:
        raise ValueError("The input needs a column `image` (base64-encoded image file) or "
                         f"`path` (an image file). Received columns: {list(frame.columns)}")
    sources: list[bytes | str | ValueError] = []
    names = []
    for index, row in enumerate(frame[present].itertuples(index=False)):
        values = dict(zip(present, row, strict=True))
        image, path = values.get("image"), values.get("path")
        names.append(str(path) if _given(path) and not _given(image) else f"row {index}")
        if _given(image):
            sources.append(_checked(_decode, image, limits))
        elif _given(path):
            sources.append(_checked(_allowed_file, str(path), limits))
        else:
            sources.append(ValueError("neither `image` nor `path` given"))
    return sources, names


def _checked(read: Any, value: object, limits: ServingLimits) -> Any:
    try:
        return read(value, limits)
    except ValueError as error:
        return error


def _allowed_file(path: str, limits: ServingLimits) -> str:
    """The resolved file a `path` row names, when the limits allow it and it is not over the
    byte limit."""
    resolved = limits.check_path(path)
    if resolved.is_file():
        limits.check_bytes(resolved.stat().st_size)
    return str(resolved)


def _given(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) \
        and value != ""


def _decode(value: object, limits: ServingLimits) -> bytes:
    """Base64 text (or its ASCII bytes) -> the file's bytes; raw image bytes pass as they are
    (an image file's bytes are never valid strict base64: they hold non-ASCII bytes). Text
    longer than the byte limit allows is refused before it is decoded."""
    raw = value if isinstance(value, (bytes, bytearray)) else str(value)
    limits.check_bytes(len(raw) * 3 // 4 - 2)  # the least base64 text of this length holds
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        if not isinstance(raw, (bytes, bytearray)):
            raise ValueError("`image` is not base64-encoded bytes") from None
        decoded = bytes(raw)
    limits.check_bytes(len(decoded))
    return decoded


def example_image(size: int = 32) -> str:
    """A small synthetic H&E-coloured PNG, base64-encoded: the logged input example (valid
    input for the model, and no patient image inside the model's files)."""
    rng = np.random.default_rng(0)
    pixels = np.clip(np.array([230.0, 160.0, 200.0]) + rng.normal(0, 20, (size, size, 3)),
                     0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
