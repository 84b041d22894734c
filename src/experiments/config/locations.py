"""The folders and files a config names must exist, each error naming the key that set it.
`config.validation.check_locations` asks before TensorFlow loads (a mistyped path answers in
half a second instead of after six seconds of imports); the data layer and the backbone
builder ask again when they read them (a resumed run's, or one removed in between), with the
same messages. Nothing here imports more than pathlib: the data layer and serving use it."""

from __future__ import annotations

from pathlib import Path

from experiments.errors import MissingFileError


def require_folder(root: str | Path, key: str) -> Path:
    """`root` as a Path, or a MissingFileError naming the config key that set it."""
    path = Path(root)
    if not path.is_dir():
        raise MissingFileError(f"Data folder does not exist: {path} (set {key})")
    return path


def require_weights_file(weights: str) -> Path:
    """A `backbone.weights` file (not "imagenet"), `~` expanded, or a MissingFileError."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingFileError(f"backbone.weights file not found: {path}")
    return path
