"""The MLflow model a run logs: a pyfunc `PythonModel` around `inference.Predictor`.

Why a PythonModel and not the Keras flavor: a client of `mlflow models serve` or of
`mlflow.pyfunc.load_model` has image files, not 4-D tensors at the model's input size, and needs
the run's test-time augmentation, temperature and validation threshold applied the way
`experiments.predict` applies them. The model carries its `.keras` file and `model_info.json` as
artifacts and this package as `code_paths` (only `inference` and the layer modules are
imported when it loads), so it loads and serves in a Python that never installed this project.

Input: a DataFrame with a column `image` (the image file's bytes, base64-encoded; raw bytes also
work from Python) and/or `path` (a file the server can read), one of them per row; any size,
any format Pillow reads.
Output: one row per input, `p_<class>` for each class, `predicted`, `decision` (at the threshold
chosen on validation; two classes) and `error` (an unreadable image is reported there).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel
from PIL import Image

from experiments.serving.inference import Predictor

INPUT_COLUMNS = ("image", "path")


class ImageClassifier(PythonModel):
    """A run's classifier for MLflow: image bytes or paths in, the run's final predictions
    out."""

    def load_context(self, context: Any) -> None:
        self.predictor = Predictor.load(context.artifacts["model"], context.artifacts["info"])

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        """One row of predictions per input row (`image` and/or `path`)."""
        sources, names = read_sources(pd.DataFrame(model_input))
        readable = [(source, name) for source, name in zip(sources, names, strict=True)
                    if not isinstance(source, ValueError)]
        scored = iter(self.predictor.score([source for source, _ in readable],
                                           [name for _, name in readable]))
        rows = [next(scored) if not isinstance(source, ValueError)
                else self.predictor.failed_row(str(source)) for source in sources]
        return pd.DataFrame(rows, columns=self.predictor.columns)


def read_sources(frame: pd.DataFrame) -> tuple[list[bytes | str | ValueError], list[str]]:
    """Each row's image: its decoded `image` bytes, else its `path`; a row with neither, or
    with text that is not base64, gets a ValueError in its place (reported per row)."""
    present = [c for c in INPUT_COLUMNS if c in frame.columns]
    if not present:
        raise ValueError("The input needs a column `image` (base64-encoded image file) or "
                         f"`path` (an image file). Received columns: {list(frame.columns)}")
    sources: list[bytes | str | ValueError] = []
    names = []
    for index, row in enumerate(frame[present].itertuples(index=False)):
        values = dict(zip(present, row, strict=True))
        image, path = values.get("image"), values.get("path")
        names.append(str(path) if _given(path) else f"row {index}")
        if _given(image):
            sources.append(_decode(image))
        elif _given(path):
            sources.append(str(path))
        else:
            sources.append(ValueError("neither `image` nor `path` given"))
    return sources, names


def _given(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) \
        and value != ""


def _decode(value: object) -> bytes | ValueError:
    """Base64 text (or its ASCII bytes) -> the file's bytes; raw image bytes pass as they are
    (an image file's bytes are never valid strict base64: they hold non-ASCII bytes)."""
    try:
        return base64.b64decode(value if isinstance(value, (bytes, bytearray)) else str(value),
                                validate=True)
    except (binascii.Error, ValueError):
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        return ValueError("`image` is not base64-encoded bytes")


def example_image(size: int = 32) -> str:
    """A small synthetic H&E-coloured PNG, base64-encoded: the logged input example (valid
    input for the model, and no patient image inside the model's files)."""
    rng = np.random.default_rng(0)
    pixels = np.clip(np.array([230.0, 160.0, 200.0]) + rng.normal(0, 20, (size, size, 3)),
                     0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
