"""Backbone registry: a name picks a Keras constructor plus its companions.

Each entry knows the constructor, the backbone's own `preprocess_input` (named by its
`keras.applications` module), its default and minimum input size and the ImageNet weights file
Keras caches for `include_top=False`. Preprocessing lives inside the model as a standard Keras
layer (`preprocessing_layer`: every `preprocess_input` here is a per-pixel affine map), so a
saved `.keras` file takes raw RGB pixels in [0, 255] and loads with plain Keras.
"""

from __future__ import annotations

import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from experiments.config.locations import require_weights_file
from experiments.errors import ConfigError, WeightsError
from experiments.models import external, weights_registry


@dataclass(frozen=True)
class BackboneSpec:
    constructor: Callable[..., keras.Model]
    # keras.applications submodule whose preprocess_input this backbone expects.
    preprocess_module: str
    default_size: int
    min_size: int
    # File name of the ImageNet no-top weights in Keras' cache; None: no ImageNet weights.
    imagenet_file: str | None


def _simple_cnn(include_top: bool, weights: str | None, input_shape: tuple[int, int, int],
                **_: object) -> keras.Model:
    """A compact VGG-style CNN (8 convs, 32-256 channels): the best no-ImageNet recipe measured
    on 200 biopsy images (shared notes/findings.md), and fast to build for tests."""
    if include_top:
        raise ValueError("simplecnn is a feature extractor only. Received: include_top=True")
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((32, 64, 128, 256)):
        for conv in range(2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                    name=f"block{block + 1}_conv{conv + 1}")(x)
            x = keras.layers.BatchNormalization(name=f"block{block + 1}_bn{conv + 1}")(x)
            x = keras.layers.Activation("relu", name=f"block{block + 1}_relu{conv + 1}")(x)
        if block < 3:
            x = keras.layers.MaxPooling2D(name=f"block{block + 1}_pool")(x)
    model = keras.Model(inputs, x, name="simplecnn")
    if weights is not None:
        model.load_weights(weights)
    return model


_APPS = keras.applications
BACKBONES: dict[str, BackboneSpec] = {
    "densenet201": BackboneSpec(_APPS.DenseNet201, "densenet", 224, 32,
                                "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "densenet121": BackboneSpec(_APPS.DenseNet121, "densenet", 224, 32,
                                "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet50": BackboneSpec(_APPS.ResNet50, "resnet50", 224, 32,
                             "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "efficientnetv2b0": BackboneSpec(_APPS.EfficientNetV2B0, "efficientnet_v2", 224, 32,
                                     "efficientnetv2-b0_notop.h5"),
    "mobilenetv3large": BackboneSpec(_APPS.MobileNetV3Large, "mobilenet_v3", 224, 32,
                                     "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    "convnexttiny": BackboneSpec(_APPS.ConvNeXtTiny, "convnext", 224, 32, "convnext_tiny_notop.h5"),
    "xception": BackboneSpec(_APPS.Xception, "xception", 299, 71,
                             "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "simplecnn": BackboneSpec(_simple_cnn, "identity", 96, 16, None),
}


# Backbones from files (`experiments.models.external`): any input size their network takes.
EXTERNAL_DEFAULT_SIZE, EXTERNAL_MIN_SIZE = 224, 16


def get_spec(name: str) -> BackboneSpec:
    if name in external.KINDS:
        raise ConfigError(f"{name} is a backbone from a file, not a keras.applications "
                          f"architecture (its weights come from backbone.preset or "
                          f"backbone.path). Received: backbone.name={name!r}")
    if name not in BACKBONES:
        known = sorted([*BACKBONES, *external.KINDS])
        raise ConfigError(f"Unknown backbone; known: {', '.join(known)}. "
                          f"Received: backbone.name={name!r}")
    return BACKBONES[name]


def resolve_image_size(name: str, image_size: int | None) -> int:
    """The input size to use: the configured one, else the backbone's default."""
    if name in external.KINDS:
        default, minimum = EXTERNAL_DEFAULT_SIZE, EXTERNAL_MIN_SIZE
    else:
        default, minimum = get_spec(name).default_size, get_spec(name).min_size
    size = default if image_size is None else image_size
    if size < minimum:
        raise ConfigError(f"{name} needs inputs of at least {minimum} px. "
                          f"Received: data.image_size={size!r}")
    return size


def input_size(name: str, image_size: int | None, patch_size: int | None) -> int:
    """The size images are decoded at (data.image_size, else the backbone's default), checked
    against the backbone's minimum, as is the network's input when it trains on patches."""
    size = resolve_image_size(name, image_size)
    if patch_size is not None:
        resolve_image_size(name, patch_size)
    return size


def keras_cache_dir() -> Path:
    """Folder where Keras looks for downloaded weights: `$KERAS_HOME/models`, as Keras read
    KERAS_HOME when it was imported (default `~/.keras`)."""
    from keras.src.backend.config import keras_home  # no public accessor in Keras 3

    return Path(keras_home()).expanduser() / "models"


def preprocessing_layer(module: str) -> keras.layers.Layer:
    """`keras.applications.<module>.preprocess_input` (or /255 for "identity") as a frozen
    float32 Dense layer on the channel axis: each of these maps is affine per pixel (scaling,
    mean/std, RGB->BGR), so a standard layer reproduces it exactly and the saved model needs no
    custom code to load or serve."""
    if module == "identity":
        def apply(x: np.ndarray) -> np.ndarray:
            return x / 255.0
    else:
        preprocess = getattr(getattr(_APPS, module, None), "preprocess_input", None)
        if preprocess is None:
            raise ValueError(f"No keras.applications.{module}.preprocess_input. "
                             f"Received: module={module!r}")

        def apply(x: np.ndarray) -> np.ndarray:
            return np.asarray(preprocess(x.copy()), np.float64)
    bias = apply(np.zeros((1, 3)))[0]
    kernel = np.stack([apply(np.eye(3)[i:i + 1] * 255.0)[0] - bias for i in range(3)]) / 255.0
    probe = np.random.default_rng(0).uniform(0, 255, (64, 3))
    if not np.allclose(apply(probe), probe @ kernel + bias, atol=1e-4):
        raise ValueError(f"keras.applications.{module}.preprocess_input is not affine per pixel")
    return affine_layer(kernel, bias)


def affine_layer(kernel: np.ndarray, bias: np.ndarray) -> keras.layers.Layer:
    """pixel @ kernel + bias on the channel axis as a frozen float32 Dense layer."""
    layer = keras.layers.Dense(3, name="preprocess", dtype="float32", trainable=False)
    layer.build((None, 3))
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return layer


@keras.saving.register_keras_serializable(package="experiments")
class PreprocessInput(keras.layers.Layer):
    """The custom preprocessing layer of models saved before `preprocessing_layer` (kept so
    that they still load inside this project)."""

    def __init__(self, module: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.module = module

    def call(self, inputs):
        if self.module == "identity":
            return inputs / 255.0
        return getattr(_APPS, self.module).preprocess_input(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "module": self.module}


def _resolve_weights(name: str, weights: str | None) -> str | None:
    """Turn `backbone.weights` into what the Keras constructor accepts, failing clearly."""
    if weights is None:
        return None
    spec = get_spec(name)
    if weights == "imagenet":
        record = weights_registry.registered(name)
        if record is not None:  # imported by the user: no download, no Keras cache needed
            return weights_registry.checked_path(record)
        if spec.imagenet_file is None:
            raise ConfigError(f"{name} has no ImageNet weights; use backbone.weights=null, a "
                              "weights file, or import one (python -m experiments.weights "
                              f"import FILE --backbone {name}). Received: "
                              f"backbone.weights={weights!r}")
        return weights
    return str(require_weights_file(weights))


def build_backbone(name: str, weights: str | None, image_size: int) -> keras.Model:
    """The headless backbone for `image_size` inputs, with ImageNet or file weights or none."""
    spec = get_spec(name)
    resolved = _resolve_weights(name, weights)
    shape = (image_size, image_size, 3)
    try:
        return spec.constructor(include_top=False, weights=resolved, input_shape=shape)
    except Exception as error:
        if resolved != "imagenet" or not _looks_like_download_failure(error):
            raise
        cache = keras_cache_dir()
        raise WeightsError(
            f"Could not load ImageNet weights for {name}: {spec.imagenet_file} is not in the Keras "
            f"cache ({cache}) and downloading it failed ({error}). Offline, copy the file into "
            f"{cache} (or set KERAS_HOME to a folder whose models/ holds it), import a weights "
            f"file once (python -m experiments.weights import FILE --backbone {name}), pass one "
            f"with backbone.weights=/path/to/{spec.imagenet_file}, or train from scratch with "
            f"backbone.weights=null."
        ) from error


def cut_at(network: keras.Model, layer: str) -> keras.Model:
    """`network` cut at `layer`: its feature map instead of the last block's. Mid-level
    features often transfer better to histology than the last block's."""
    known = [item.name for item in network.layers]
    if layer not in known:
        ends = [n for n in known if "relu" in n or n.endswith(("_out", "_concat"))][-8:]
        raise ConfigError(f"backbone.feature_layer must name a layer of {network.name} (e.g. "
                          f"{', '.join(ends)}). Received: backbone.feature_layer={layer!r}")
    output = network.get_layer(layer).output
    if len(output.shape) != 4:
        raise ConfigError(f"backbone.feature_layer must name a feature map (a 4-D output). "
                          f"Received: backbone.feature_layer={layer!r} of shape "
                          f"{tuple(output.shape)}")
    return keras.Model(network.input, output, name=network.name)


def _looks_like_download_failure(error: BaseException) -> bool:
    """Keras' get_file wraps URL errors in a plain Exception whose text names the URL."""
    chain: BaseException | None = error
    while chain is not None:
        if isinstance(chain, (urllib.error.URLError, OSError, ConnectionError)):
            return True
        if "URL fetch failure" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def weights_provenance(name: str, weights: str | None) -> dict[str, str]:
    """Where a backbone's weights come from and their sha256 (`weights_source`,
    `weights_sha256`): what a run records so that its model can be reproduced and audited."""
    if weights is None:
        return {"weights_source": "none (random initialisation)", "weights_sha256": "none"}
    if name in external.KINDS:  # the preset folder or model file holds the weights
        return {"weights_source": f"{name}:{Path(weights).expanduser().resolve()}",
                "weights_sha256": external.fingerprint(weights)}
    if weights != "imagenet":
        path = _resolve_weights(name, weights)
        return {"weights_source": f"file:{Path(str(path)).resolve()}",
                "weights_sha256": weights_registry.sha256_of(str(path))}
    record = weights_registry.registered(name)
    if record is not None:
        weights_registry.checked_path(record)
        return {"weights_source": f"registered:{record.origin}", "weights_sha256": record.sha256}
    spec = get_spec(name)
    cached = keras_cache_dir() / str(spec.imagenet_file)
    if cached.is_file():
        return {"weights_source": f"keras-cache:{cached}",
                "weights_sha256": weights_registry.sha256_of(cached)}
    return {"weights_source": "imagenet (not in the Keras cache yet)", "weights_sha256": "unknown"}


def check_weights_fit(name: str, path: str | Path) -> None:
    """Load a weights file into `name`'s architecture (no top, default input size): a file of
    another architecture is one WeightsError naming the expected and the received shapes."""
    spec = get_spec(name)
    size = spec.default_size
    model = spec.constructor(include_top=False, weights=None, input_shape=(size, size, 3))
    try:
        with warnings.catch_warnings():  # a misfit warns once per layer before it raises
            warnings.simplefilter("ignore")
            model.load_weights(str(path))
    except Exception as error:  # Keras raises ValueError, KeyError or h5py errors here
        expected = [tuple(w.shape) for w in model.weights]
        received = _stored_shapes(path)
        raise WeightsError(
            f"{path} does not fit {name} (include_top=False): expected {len(expected)} arrays "
            f"(first {expected[:3]}), received {len(received)} (first {received[:3]}). "
            f"Keras said: {str(error).splitlines()[0][:300]}") from error


def _stored_shapes(path: str | Path) -> list[tuple[int, ...]]:
    """The shapes of the arrays in an HDF5 weights file, in file order."""
    import h5py

    shapes: list[tuple[int, ...]] = []
    try:
        with h5py.File(path, "r") as stored:
            stored.visititems(lambda _, item: shapes.append(tuple(item.shape))
                              if isinstance(item, h5py.Dataset) else None)
    except OSError:  # not an HDF5 file at all
        return []
    return shapes
