"""What a served model accepts from a client: how many rows a request may hold, how large an
image file and how many pixels one image may have, and whether a row may name a file on the
server (`path`) instead of sending its bytes.

A served model sits behind a network port: a client must not make the server read any file it
can read (nor learn which files exist), nor decode an image that takes gigabytes. So paths are
refused unless the deployment names a folder they must stay inside, and every image is
checked against the limits before it is decoded. `experiments.predict` (the user's own files,
on the user's machine) has no such limits.

Each limit comes from, in order: the `model_config` given when loading the model in Python
(`mlflow.pyfunc.load_model(uri, model_config={"max_rows": 16})`; the model is logged with every
key set to None - "not set" - as MLflow only lets a load override keys the model declares), an
environment variable of the serving process (`EXPERIMENTS_SERVE_MAX_ROWS=16 mlflow models
serve ...`), the default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

# Defaults sized for a 2-core, 24 GB server: a full request of the largest images decodes one
# image at a time (at most ~100 MB of pixels) and answers within MLflow's 60 s request timeout
# even for a 5-fold ensemble with test-time augmentation (benchmarks/serve_load.py).
DEFAULT_MAX_ROWS = 64
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # 5000 x 5000; Pillow refuses above 2 x 89.5 M

ENVIRONMENT = {"path_root": "EXPERIMENTS_SERVE_PATH_ROOT",
               "max_rows": "EXPERIMENTS_SERVE_MAX_ROWS",
               "max_image_bytes": "EXPERIMENTS_SERVE_MAX_IMAGE_BYTES",
               "max_image_pixels": "EXPERIMENTS_SERVE_MAX_IMAGE_PIXELS"}

def unset() -> dict[str, None]:
    """The `model_config` a model is logged with: every setting declared, none set."""
    return dict.fromkeys(ENVIRONMENT)


PATHS_REFUSED = "`path` is not accepted by this server: send the image file's bytes in `image`"

PATH_OUTSIDE_ROOT = "`path` must name a file inside the folder this server allows"


@dataclass(frozen=True)
class ServingLimits:
    """The limits one loaded model enforces on every request."""

    max_rows: int = DEFAULT_MAX_ROWS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    path_root: Path | None = None  # resolved; None: no `path` accepted

    def __post_init__(self) -> None:
        for key in ("max_rows", "max_image_bytes", "max_image_pixels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Serving limit `{key}` must be a positive integer. "
                                 f"Received: {key}={value!r}")
        bomb = Image.MAX_IMAGE_PIXELS  # None when a user switched Pillow's check off
        if bomb is not None and self.max_image_pixels >= bomb:
            raise ValueError(f"Serving limit `max_image_pixels` must stay below Pillow's "
                             f"decompression-bomb limit ({bomb}). "
                             f"Received: max_image_pixels={self.max_image_pixels!r}")

    @classmethod
    def resolve(cls, model_config: Mapping[str, object] | None = None,
                environ: Mapping[str, str] | None = None) -> ServingLimits:
        """The limits from `model_config`, else the environment, else the defaults. Raises
        ValueError naming the key or variable of a value that is not valid."""
        model_config = dict(model_config or {})
        environ = os.environ if environ is None else environ
        unknown = sorted(set(model_config) - set(ENVIRONMENT))
        if unknown:
            raise ValueError(f"Unknown serving setting(s) {unknown} in model_config; known: "
                             f"{sorted(ENVIRONMENT)}")
        values: dict[str, Any] = {}
        for key, variable in ENVIRONMENT.items():
            if model_config.get(key) is not None:
                values[key] = model_config[key]
            elif environ.get(variable, "") != "":
                values[key] = _from_environment(key, variable, environ[variable])
        root = values.pop("path_root", None)
        return cls(**values, path_root=None if root is None else allowed_root(str(root)))

    def check_path(self, path: str) -> Path:
        """The resolved file a `path` row may read, or ValueError: refused when no folder is
        allowed, and when it resolves (symlinks and `..` followed) outside the allowed folder -
        the same message whether or not the file exists. Relative paths start at the folder."""
        if self.path_root is None:
            raise ValueError(PATHS_REFUSED)
        resolved = (self.path_root / path).resolve()
        if not resolved.is_relative_to(self.path_root):
            raise ValueError(PATH_OUTSIDE_ROOT)
        return resolved

    def check_bytes(self, size: int) -> None:
        """ValueError when an image file of `size` bytes is over the limit."""
        if size > self.max_image_bytes:
            raise ValueError(f"the image file has {size} bytes; this server accepts at most "
                             f"{self.max_image_bytes} per image")

    def check_rows(self, rows: int) -> None:
        """ValueError when a request holds more rows than the limit."""
        if rows > self.max_rows:
            raise ValueError(f"The request has {rows} rows; this server answers at most "
                             f"{self.max_rows} per request: split it into smaller requests")


def allowed_root(folder: str) -> Path:
    """The folder `path` rows must stay inside, resolved; it must exist."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"The allowed path folder is not a folder on this server. Received: "
                         f"path_root={folder!r} ({ENVIRONMENT['path_root']})")
    return root


def _from_environment(key: str, variable: str, text: str) -> object:
    if key == "path_root":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{variable} must be a positive integer. Received: "
                         f"{variable}={text!r}") from None
