"""Backbones that come as files: KerasHub presets and saved Keras feature extractors.

Pathology users compare DenseNet and ResNet with foundation models (UNI, Virchow, Phikon,
DINOv2-style ViTs). In Keras 3 these come as KerasHub presets (a folder with `config.json`,
`model.weights.h5` and the preset's `image_converter.json`) or as a `.keras` file a user
converted. Both plug in where a `keras.applications` backbone does:

- `backbone=keras_hub backbone.preset=<folder>`: the preset's backbone, preprocessed by the
  preset's own image converter (its per-channel scale and offset, as a frozen Dense layer in
  the model - the same arithmetic, and the saved model needs no converter to serve);
- `backbone=keras_file backbone.path=<model.keras>`: any Keras model from RGB pixels in
  [0, 255] (its own preprocessing inside) to a feature map, tokens or a vector.

A feature map is average-pooled. A token sequence (a ViT's output) is pooled as
`backbone.pooling` says: `cls` (the class token), `mean` (the mean of the patch tokens, class
and register tokens left out) or `cls_mean` (both, concatenated: DINOv2's linear-probe
protocol). A vector is used as it is. The pooled features are the classifier's `gap` layer, so
the frozen-feature cache, the probes, CV, predict and serving treat them like any backbone's.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from pathlib import Path

import keras
import numpy as np

from experiments.config.choices import TOKEN_POOLINGS
from experiments.errors import ConfigError, MissingFileError, WeightsError
from experiments.models import pooling as pooling_layers
from experiments.models import weights_registry

KERAS_HUB = "keras_hub"
KERAS_FILE = "keras_file"
KINDS = (KERAS_HUB, KERAS_FILE)


def import_keras_hub():
    """keras_hub, or one error saying how to install it (an optional extra)."""
    try:
        import keras_hub
    except ImportError as error:
        raise ConfigError("backbone=keras_hub needs the keras-hub package: pip install "
                          "'experiments[hub]' (or pip install keras-hub)") from error
    return keras_hub


def load_preset(preset: str) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """A local KerasHub preset's backbone and its image converter's per-channel scale and
    offset (pixels in [0, 255] -> the backbone's input)."""
    folder = Path(preset).expanduser()
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"backbone.preset must be a local KerasHub preset folder (with "
                               f"config.json); offline, no preset is downloaded. Received: "
                               f"backbone.preset={preset!r}")
    if not (folder / "image_converter.json").is_file():
        raise ConfigError(f"{folder} has no image_converter.json: without the preset's image "
                          "converter its preprocessing is unknown (save it with "
                          "converter.save_to_preset). Received: "
                          f"backbone.preset={preset!r}")
    hub = import_keras_hub()
    network = hub.models.Backbone.from_preset(str(folder))
    converter = hub.layers.ImageConverter.from_preset(str(folder))
    return network, _per_channel(converter.scale, 1.0), _per_channel(converter.offset, 0.0)


def _per_channel(value: object, default: float) -> np.ndarray:
    """A converter's scale or offset (None, a number or one per channel) as 3 numbers."""
    if value is None:
        return np.full(3, default)
    return np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (3,)).copy()


def load_file(path: str) -> keras.Model:
    """A saved Keras feature extractor (`.keras`), loaded in Keras' safe mode."""
    file = Path(path).expanduser()
    if not file.is_file() or file.suffix != ".keras":
        raise MissingFileError(f"backbone.path must be a saved Keras model file (.keras). "
                               f"Received: backbone.path={path!r}")
    try:
        return load_saved(file)
    except Exception as error:  # Keras raises ValueError/TypeError for unknown objects
        raise WeightsError(f"Could not load backbone.path={path!r} with Keras (safe mode; "
                           f"custom layers must be registered): {error}") from error


def load_saved(path: str | Path) -> keras.Model:
    """A saved `.keras` model in Keras' safe mode (no arbitrary code), without its training
    state; keras_hub imported first when the file holds KerasHub layers (it registers them)."""
    if needs_keras_hub(path):
        import_keras_hub()
    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


def needs_keras_hub(path: str | Path) -> bool:
    """Whether a saved `.keras` model holds KerasHub layers (its config names the package),
    so that keras_hub must be imported to load it."""
    try:
        with zipfile.ZipFile(path) as archive:
            return b'"module": "keras_hub' in archive.read("config.json")
    except (zipfile.BadZipFile, KeyError):
        return False


def build(kind: str, location: str) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """The network of an external backbone and the per-channel affine map (scale, offset)
    that takes RGB pixels in [0, 255] to its input."""
    if kind == KERAS_HUB:
        return load_preset(location)
    return load_file(location), np.ones(3), np.zeros(3)


def network_input(network: keras.Model, images):
    """`images` as the network's input structure: KerasHub backbones take {"images": ...}."""
    if isinstance(network.input, dict) and len(network.input) == 1:
        return {next(iter(network.input)): images}
    return images


def check_input_size(network: keras.Model, image_size: int, kind: str) -> None:
    """A network built for one input size refuses another: say which data.image_size fits."""
    shape = network.input_shape
    shape = shape[0] if isinstance(shape, list) else shape
    if isinstance(shape, dict):
        shape = next(iter(shape.values()))
    fixed = [s for s in tuple(shape)[1:3] if s is not None]
    if fixed and any(s != image_size for s in fixed):
        raise ConfigError(f"The {kind} backbone takes {tuple(shape)[1:3]} inputs; set "
                          f"data.image_size to match. Received: data.image_size={image_size!r}")


def pooled(features, network: keras.Model, image_size: int, pooling: str,
           global_pool: str = "avg"):
    """The `gap` layer's output for an external network's output `features` (a feature map
    pooled as `global_pool` says, tokens as `pooling` says)."""
    if pooling not in TOKEN_POOLINGS:
        raise ConfigError(f"backbone.pooling must be one of {TOKEN_POOLINGS}. Received: "
                          f"backbone.pooling={pooling!r}")
    rank = len(features.shape)
    if rank == 4:
        return pooling_layers.global_pool(features, global_pool)
    if rank == 2:
        return keras.layers.Identity(name="gap")(features)
    if rank != 3:
        raise ConfigError(f"A backbone must output a feature map, tokens or a vector. "
                          f"Received: output shape {tuple(features.shape)}")
    tokens = int(features.shape[1])
    prefix = tokens - patch_tokens(network, image_size, tokens)
    if pooling != "mean" and prefix < 1:
        raise ConfigError(f"The backbone's {tokens} tokens have no class token; use "
                          f"backbone.pooling=mean. Received: backbone.pooling={pooling!r}")
    cls = keras.layers.Flatten(name="gap" if pooling == "cls" else "cls_token")(
        keras.layers.Cropping1D((0, tokens - 1), name="class_token")(features))
    if pooling == "cls":
        return cls
    patches = keras.layers.Cropping1D((prefix, 0), name="patch_tokens")(features)
    mean = keras.layers.GlobalAveragePooling1D(name="gap" if pooling == "mean" else "mean_tokens"
                                               )(patches)
    return mean if pooling == "mean" else keras.layers.Concatenate(name="gap")([cls, mean])


def patch_tokens(network: keras.Model, image_size: int, tokens: int) -> int:
    """How many of `tokens` are patches: from the network's patch size when it has one, else
    the largest square grid that fits (the class and register tokens are few)."""
    patch = getattr(network, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[0]
    if isinstance(patch, int) and patch > 0:
        return min(tokens, (image_size // patch) ** 2)
    return math.isqrt(tokens) ** 2


def fingerprint(location: str) -> str:
    """sha256 of a model file, or of a preset folder's files (names and contents): what the
    feature cache and a run's provenance key on."""
    path = Path(location).expanduser()
    if not path.exists():
        raise MissingFileError(f"Backbone location not found: {path}")
    if path.is_file():
        return weights_registry.sha256_of(path)
    digest = hashlib.sha256()  # of each file's name and sha256 (remembered per file)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}:{weights_registry.sha256_of(file)}\n".encode())
    return digest.hexdigest()
