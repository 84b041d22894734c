"""Grad-CAM (Selvaraju et al. 2017): where in the image the evidence for a class lies.

Works on any classifier this framework builds (and any Keras model that is a chain of layers):
the feature map is the output of the last layer whose output is 4-D (n, h, w, c), i.e. the
backbone's last convolutional stage, found by walking the model, not by a layer name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from experiments.data import patches
from experiments.data.image_store import ImageArray

log = logging.getLogger(__name__)


def _chain(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers after its input, in order (a chain for every classifier here;
    `gradcam` checks that running them in turn reproduces the model's output)."""
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def last_feature_layer(model: keras.Model, image_size: int) -> keras.layers.Layer:
    """The last layer of the chain whose output is a spatial (4-D) feature map."""
    found = None
    shape: tuple = (None, image_size, image_size, 3)
    for layer in _chain(model):
        shape = layer.compute_output_shape(shape)
        if len(shape) == 4 and layer.name != "preprocess":
            found = layer
    if found is None:
        raise ValueError(f"Model {model.name!r} has no layer with a 4-D output for Grad-CAM")
    return found


def has_feature_map(model: keras.Model) -> bool:
    """Whether Grad-CAM applies: the network (or a network inside a wrapper, an ensemble or a
    patch grid) pools a spatial feature map. A ViT's tokens (`backbone.pooling`) have none."""
    if "gap" in {layer.name for layer in model.layers}:
        pooled = model.get_layer("gap").input
        return not isinstance(pooled, (list, tuple)) and len(pooled.shape) == 4
    return any(isinstance(layer, keras.Model) and has_feature_map(layer)
               for layer in model.layers)


def gradcam(model: keras.Model, images: np.ndarray,
            class_indices: np.ndarray | None = None) -> np.ndarray:
    """(n, h, w) heatmaps in [0, 1] at the images' size, for `class_indices` (default: the
    predicted class of each image). `images` are raw RGB in [0, 255], as the model takes them.
    A native-patch model (`data.patch_size`) gets the maps of its grid crops stitched together.
    """
    if not has_feature_map(model):
        raise ValueError(f"Grad-CAM needs a spatial feature map; {model.name!r} pools tokens")
    images = np.asarray(images, np.float32)
    if class_indices is None:
        class_indices = np.argmax(np.asarray(model(images, training=False)), axis=1)
    model, images = unwrap(model, images)
    network = patches.patch_network(model)
    if network is None:
        cam = _raw_cam(model, images, np.asarray(class_indices))
    else:
        cam = _stitched_cam(network, images, np.asarray(class_indices))
    peak = np.max(cam, axis=(1, 2), keepdims=True)
    return cam / np.maximum(peak, 1e-12)


def unwrap(model: keras.Model, images: np.ndarray) -> tuple[keras.Model, np.ndarray]:
    """A delivered model is the network behind input transforms (stain normalisation:
    `serving.export.deliverable`): run those on the images and return the network, so the map
    comes from the network's own last feature map - not from the transform, whose output is
    the last 4-D one of the outer chain."""
    chain = _chain(model)
    while len(chain) > 1 and isinstance(chain[-1], keras.Model):
        x = images
        for layer in chain[:-1]:
            x = layer(x, training=False)
        model, images = chain[-1], np.asarray(x, np.float32)
        chain = _chain(model)
    return model, images


def _stitched_cam(network: keras.Model, images: np.ndarray,
                  class_indices: np.ndarray) -> np.ndarray:
    """The crops' maps placed where the crops lie, averaged where they overlap."""
    size, patch = images.shape[1], int(network.input_shape[1])
    total = np.zeros(images.shape[:3], np.float32)
    count = np.zeros(images.shape[1:3], np.float32)
    for top, left in patches.grid_positions(size, patch):
        crops = images[:, top:top + patch, left:left + patch]
        total[:, top:top + patch, left:left + patch] += _raw_cam(network, crops, class_indices)
        count[top:top + patch, left:left + patch] += 1
    return total / np.maximum(count, 1)


def _raw_cam(model: keras.Model, images: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    """Unnormalised Grad-CAM maps (n, h, w) of a chain model, upsampled to the images' size."""
    images = tf.convert_to_tensor(images, tf.float32)
    height, width = int(images.shape[1]), int(images.shape[2])
    target = last_feature_layer(model, height)
    x = images
    with tf.GradientTape() as tape:
        features = None
        for layer in _chain(model):
            x = layer(x, training=False)
            if layer is target:
                features = x
                tape.watch(features)
        probabilities = tf.cast(x, tf.float32)
        picked = tf.gather(probabilities, tf.constant(class_indices), batch_dims=1)
    expected = model(images, training=False)
    if not np.allclose(probabilities.numpy(), tf.cast(expected, tf.float32).numpy(), atol=1e-4):
        raise ValueError(f"Grad-CAM needs a model whose layers form a chain; {model.name!r} "
                         "does not")
    grads = tf.cast(tape.gradient(picked, features), tf.float32)
    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)  # (n, 1, 1, c)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
    return tf.image.resize(cam, (height, width), method="bilinear")[..., 0].numpy()


def pick_examples(labels: np.ndarray, predicted: np.ndarray, count: int,
                  seed: int = 0) -> list[int]:
    """Up to `count` indices spread over (true class, correct/wrong) cells, so both classes
    and the model's mistakes are shown; cells are filled in turn."""
    rng = np.random.default_rng(seed)
    cells = []
    for label in np.unique(labels):
        for correct in (False, True):
            members = np.flatnonzero((labels == label) & ((predicted == labels) == correct))
            cells.append(list(rng.permutation(members)))
    chosen: list[int] = []
    while len(chosen) < count and any(cells):
        for cell in cells:
            if cell and len(chosen) < count:
                chosen.append(int(cell.pop(0)))
    return sorted(chosen)


PANEL = 256  # each half of an overlay image, in pixels (small inputs are enlarged)


def save_overlays(model: keras.Model, images: ImageArray, files: list[str], labels: np.ndarray,
                  probabilities: np.ndarray, class_names: list[str], count: int,
                  folder: Path) -> list[Path]:
    """One PNG per chosen image: the image beside its Grad-CAM for the predicted class, under
    a caption (file, true and predicted class, probability). Drawn with Pillow: a figure
    library would cost more than the maps themselves."""
    predicted = probabilities.argmax(axis=1)
    chosen = pick_examples(labels, predicted, count)
    if not chosen:
        return []
    if not has_feature_map(model):
        log.info("No Grad-CAM overlays: %s pools a transformer's tokens, not a spatial "
                 "feature map", model.name)
        return []
    heatmaps = gradcam(model, images[chosen], predicted[chosen])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for heatmap, i in zip(heatmaps, chosen, strict=True):
        verdict = "correct" if predicted[i] == labels[i] else "wrong"
        caption = (f"{Path(files[i]).name}: true {class_names[labels[i]]}, predicted "
                   f"{class_names[predicted[i]]} (p={probabilities[i, predicted[i]]:.2f}, "
                   f"{verdict})")
        path = folder / f"{i:04d}_{class_names[labels[i]]}_{verdict}.png"
        overlay_image(images[i], heatmap, caption).save(path)
        paths.append(path)
    return paths


def overlay_image(image: np.ndarray, heatmap: np.ndarray, caption: str,
                  alpha: float = 0.45) -> Image.Image:
    """[image | image blended with the heatmap in the jet colour map] under a caption."""
    rgb = np.clip(image, 0, 255).astype(np.float32)
    heat = _JET[np.clip((heatmap * 255).astype(int), 0, 255)]
    blended = ((1 - alpha) * rgb + alpha * heat).astype(np.uint8)
    scale = max(1, PANEL // image.shape[0])
    panels = [Image.fromarray(p).resize((image.shape[1] * scale, image.shape[0] * scale),
                                        Image.Resampling.NEAREST)
              for p in (rgb.astype(np.uint8), blended)]
    width, height = panels[0].size
    canvas = Image.new("RGB", (2 * width + 8, height + 22), "white")
    canvas.paste(panels[0], (0, 22))
    canvas.paste(panels[1], (width + 8, 22))
    ImageDraw.Draw(canvas).text((4, 5), caption, fill="black")
    return canvas


# The jet colour map as a 256-entry RGB table (red where the evidence is).
_JET = np.clip(np.stack([1.5 - np.abs(4 * np.linspace(0, 1, 256) - c) for c in (3, 2, 1)],
                        axis=1), 0, 1) * 255
