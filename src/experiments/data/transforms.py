"""Batched image transforms for augmentation and test-time views, vectorised over the batch and
seeded per image: the 8 dihedral views, HED stain jitter (Tellez et al. 2019), colour jitter,
random resized crops, blur, mixup and CutMix.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

# Ruifrok & Johnston's stain vectors (rows: hematoxylin, eosin, DAB in optical density),
# the matrix scikit-image's `rgb2hed` inverts.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)


HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def dihedral_views(n: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The dihedral view (in [0, 8)) each of n images gets under the batch seed `seed`."""
    return tf.random.stateless_uniform([n], tf.cast(seed, tf.int64) + 2, 0, 8, dtype=tf.int32)


def _uniform(n: tf.Tensor, seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([n], seed, low, high)


def _beta(n: tf.Tensor, alpha: float, seed: tf.Tensor) -> tf.Tensor:
    """n draws of Beta(alpha, alpha), as X / (X + Y) of two Gamma(alpha) draws."""
    x = tf.random.stateless_gamma([n], seed, alpha)
    y = tf.random.stateless_gamma([n], seed + 1, alpha)
    return x / tf.maximum(x + y, 1e-12)


def mixup(images: tf.Tensor, labels: tf.Tensor, alpha: float,
          seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """x_i -> lam_i x_i + (1 - lam_i) x_partner (the reversed batch), labels alike."""
    lam = _beta(tf.shape(images)[0], alpha, seed)
    mixed = (lam[:, None, None, None] * images
             + (1 - lam[:, None, None, None]) * tf.reverse(images, [0]))
    return mixed, lam[:, None] * labels + (1 - lam[:, None]) * tf.reverse(labels, [0])


def cutmix(images: tf.Tensor, labels: tf.Tensor, alpha: float,
           seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A box of about 1 - lam of each image's area replaced by the same box of its partner (the
    reversed batch); labels mixed by the share of pixels actually pasted."""
    n, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    side = tf.sqrt(1.0 - _beta(n, alpha, seed))  # box side as a fraction of the image side
    h = tf.cast(tf.round(side * tf.cast(height, tf.float32)), tf.int32)
    w = tf.cast(tf.round(side * tf.cast(width, tf.float32)), tf.int32)
    top = tf.cast(_uniform(n, seed + 2, 0.0, 1.0) * tf.cast(height - h + 1, tf.float32),
                  tf.int32)
    left = tf.cast(_uniform(n, seed + 3, 0.0, 1.0) * tf.cast(width - w + 1, tf.float32),
                   tf.int32)
    rows, cols = tf.range(height)[None, :], tf.range(width)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (n, height)
    inside_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (n, width)
    box = inside_rows[:, :, None] & inside_cols[:, None, :]  # (n, height, width)
    mixed = tf.where(box[..., None], tf.reverse(images, [0]), images)
    pasted = tf.cast(h * w, tf.float32) / tf.cast(height * width, tf.float32)
    lam = 1.0 - pasted
    return mixed, lam[:, None] * labels + (1 - lam[:, None]) * tf.reverse(labels, [0])


def dihedral_view(images: tf.Tensor, view: int) -> tf.Tensor:
    """One of the 8 dihedral views of a batch: rotate by view % 4 x 90 degrees, then flip
    left-right when view >= 4 (view 0 is the identity)."""
    images = tf.image.rot90(images, view % 4)
    return images[:, :, ::-1, :] if view >= 4 else images


def dihedral_view_tensor(images: tf.Tensor, view: tf.Tensor) -> tf.Tensor:
    """`dihedral_view` for a view given as a tensor (inside tf.data)."""
    images = tf.image.rot90(images, view % 4)
    return tf.cond(view >= 4, lambda: images[:, :, ::-1, :], lambda: images)


def zoom_out(images: tf.Tensor) -> tf.Tensor:
    """The batch at half the magnification, at its own size: each image downscaled 2x (area
    average) in the centre, its surroundings mirrored out from it - a lower-power objective's
    view of the same tissue, made from the pixels the model already has."""
    height, width = int(images.shape[1]), int(images.shape[2])
    small = tf.image.resize(images, (height // 2, width // 2), method="area")
    top, left = (height - height // 2) // 2, (width - width // 2) // 2
    return tf.pad(small, [[0, 0], [top, height - height // 2 - top],
                          [left, width - width // 2 - left], [0, 0]], mode="REFLECT")


def zoom_in(images: tf.Tensor) -> tf.Tensor:
    """The batch at twice the magnification, at its own size: the centre half of each image
    upsampled 2x (bilinear) - a higher-power objective's framing of the same tissue, though
    without the detail a real one would resolve."""
    height, width = int(images.shape[1]), int(images.shape[2])
    top, left = height // 4, width // 4
    centre = images[:, top:top + height // 2, left:left + width // 2]
    return tf.image.resize(centre, (height, width), method="bilinear")


def random_scale(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Each image at one of three magnifications, a third of the batch each on average: as it
    is, at half (`zoom_out`) or at twice it (`zoom_in`) - the scales of `rot90_multiscale`'s
    test views, so a network trained end to end learns the tissue at all three."""
    scale = tf.random.stateless_uniform([tf.shape(images)[0]], seed, 0, 3, dtype=tf.int32)
    scale = tf.reshape(scale, [-1, 1, 1, 1])
    return tf.where(scale == 1, zoom_out(images),
                    tf.where(scale == 2, zoom_in(images), images))


def tta_view(images: tf.Tensor, view: int) -> tf.Tensor:
    """View `view` of eval.tta's views: dihedral view `view % 8`; at half the magnification
    for views 8-15 (`dihedral_zoom`, `rot90_zoom`), at twice it for views 16-23
    (`rot90_multiscale`)."""
    images = dihedral_view(images, view % 8)
    if view >= 16:
        return zoom_in(images)
    return zoom_out(images) if view >= 8 else images


def tta_view_tensor(images: tf.Tensor, view: tf.Tensor) -> tf.Tensor:
    """`tta_view` for a view given as a tensor (inside tf.data)."""
    images = dihedral_view_tensor(images, view % 8)
    return tf.case([(view >= 16, lambda: zoom_in(images)),
                    (view >= 8, lambda: zoom_out(images))], default=lambda: images)


def random_dihedral(images: tf.Tensor, views: tf.Tensor) -> tf.Tensor:
    """Each image in its own dihedral view (`views`: (n,) ints in [0, 8)); square images."""
    rotated = tf.stack([tf.image.rot90(images, k) for k in range(4)], axis=1)
    images = tf.gather(rotated, views % 4, batch_dims=1)
    flip = tf.reshape(views >= 4, [-1, 1, 1, 1])
    return tf.where(flip, images[:, :, ::-1, :], images)


def hed_jitter(images: tf.Tensor, sigma: float, bias: float, seed: tf.Tensor) -> tf.Tensor:
    """Tellez et al. 2019: in HED optical-density space, x -> x * U(1-sigma, 1+sigma) +
    U(-bias, bias) per image and stain channel, then back to RGB."""
    n = tf.shape(images)[0]
    scale = tf.random.stateless_uniform([n, 1, 1, 3], seed, 1 - sigma, 1 + sigma)
    shift = tf.random.stateless_uniform([n, 1, 1, 3], seed + 1, -bias, bias)
    density = -tf.math.log((images + 1.0) / 256.0)  # optical density, >= 0
    stains = tf.einsum("nhwc,cs->nhws", density, tf.constant(HED_FROM_RGB, tf.float32))
    stains = stains * scale + shift
    density = tf.einsum("nhws,sc->nhwc", stains, tf.constant(RGB_FROM_HED, tf.float32))
    return tf.clip_by_value(256.0 * tf.exp(-density) - 1.0, 0.0, 255.0)


def color_jitter(images: tf.Tensor, brightness: float, contrast: float, saturation: float,
                 hue: float, seed: tf.Tensor) -> tf.Tensor:
    """Per-image brightness shift, contrast and saturation factors, hue rotation."""
    n = tf.shape(images)[0]
    x = images / 255.0
    if brightness:
        x = x + tf.reshape(_uniform(n, seed, -brightness, brightness), [-1, 1, 1, 1])
    if contrast:
        factor = tf.reshape(_uniform(n, seed + 1, 1 - contrast, 1 + contrast), [-1, 1, 1, 1])
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * factor + mean
    if saturation or hue:
        hsv = tf.image.rgb_to_hsv(tf.clip_by_value(x, 0.0, 1.0))
        h, s, v = tf.unstack(hsv, axis=-1)
        if hue:
            h = tf.math.floormod(h + tf.reshape(_uniform(n, seed + 2, -hue, hue), [-1, 1, 1]),
                                 1.0)
        if saturation:
            s = s * tf.reshape(_uniform(n, seed + 3, 1 - saturation, 1 + saturation),
                               [-1, 1, 1])
        x = tf.image.hsv_to_rgb(tf.stack([h, tf.clip_by_value(s, 0.0, 1.0), v], axis=-1))
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def random_resized_crop(images: tf.Tensor, min_scale: float, seed: tf.Tensor) -> tf.Tensor:
    """A crop of U(min_scale, 1) of the area, aspect ratio in [3/4, 4/3] (log-uniform), at a
    random position, resized back to the input size."""
    n, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    area = _uniform(n, seed, min_scale, 1.0)
    ratio = tf.exp(_uniform(n, seed + 1, math.log(3 / 4), math.log(4 / 3)))
    h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    top = _uniform(n, seed + 2, 0.0, 1.0) * (1.0 - h)
    left = _uniform(n, seed + 3, 0.0, 1.0) * (1.0 - w)
    boxes = tf.stack([top, left, top + h, left + w], axis=1)
    return tf.image.crop_and_resize(images, boxes, tf.range(n), tf.stack([height, width]))


def random_blur(images: tf.Tensor, max_sigma: float, probability: float,
                seed: tf.Tensor) -> tf.Tensor:
    """Gaussian blur with sigma ~ U(0.1, max_sigma) on a `probability` share of the images
    (the others pass unchanged), as one depthwise convolution over the whole batch."""
    n = tf.shape(images)[0]
    radius = max(1, math.ceil(3 * max_sigma))
    sigma = _uniform(n, seed, 0.1, max_sigma)
    blurred = _uniform(n, seed + 1, 0.0, 1.0) < probability
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(offsets[None, :] / sigma[:, None]))
    identity = tf.cast(tf.equal(offsets, 0.0), tf.float32)[None, :]
    kernel = tf.where(blurred[:, None], kernel / tf.reduce_sum(kernel, 1, keepdims=True),
                      identity)  # (n, k)
    # Images as channels of one image: (1, h, w, n*3), one 1-D kernel per channel.
    shape = tf.shape(images)
    stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, shape[1], shape[2], -1])
    per_channel = tf.repeat(kernel, 3, axis=0)  # (n*3, k)
    size = 2 * radius + 1
    padded = tf.pad(stacked, [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
    x = tf.nn.depthwise_conv2d(padded, tf.reshape(tf.transpose(per_channel), [size, 1, -1, 1]),
                               [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, tf.reshape(tf.transpose(per_channel), [1, size, -1, 1]),
                               [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(x, [shape[1], shape[2], shape[0], 3]), [2, 0, 1, 3])
