"""Decoding one image file (path, bytes or file object) to RGB at the model's input size: the
one decoder shared by training, evaluation, predict and serving.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from experiments.config.choices import RESIZE_MODES

ImageSource = str | Path | bytes | BinaryIO


def load_image(source: ImageSource, image_size: int, allow_upscale: bool = True,
               name: str | None = None, max_pixels: int | None = None,
               resize: str = "squash", scale: float | None = None) -> np.ndarray:
    """Decode an image file, its bytes or a file object to RGB uint8 (grayscale, palette,
    RGBA, CMYK and 16-bit images converted: `as_rgb`) of (image_size, image_size):
    `resize="crop"` scales the shorter side to image_size and keeps the centre square (nuclei
    keep their shape), "squash" scales each side to image_size (a non-square image is
    distorted). With `scale` (the image's micrometres per pixel over the model's input's),
    the image is first rescaled to the model's pixel size and its centre image_size square
    kept: the model sees the same tissue area at the same magnification as in training (an
    image too small for that square is scaled up to fill it). Raises ValueError naming the
    file (`name`, else the path) and the reason; with `max_pixels`, before decoding an image
    with more pixels (its header is read, not its pixels)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"`data.resize` must be one of {RESIZE_MODES}. Received: {resize!r}")
    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    opened = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(opened) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(f"{width}x{height} px is over the limit of {max_pixels} "
                                 "pixels per image")
            if not allow_upscale and min(width, height) < image_size:
                raise ValueError(f"{width}x{height} px is smaller than data.image_size="
                                 f"{image_size} (lower data.image_size, or set "
                                 "data.allow_upscale=true)")
            if scale is None:  # fast JPEG downscale while decoding
                image.draft("RGB", (image_size, image_size))
            if scale is not None:
                return rescaled(as_rgb(image), image_size, scale)
            rgb = as_rgb(image)
            if resize == "crop" and rgb.size[0] != rgb.size[1]:
                rgb = centre_square(rgb)
            if rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{label}: larger than Pillow's decompression-bomb limit "
                         f"(Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {error}") from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{label}: not a readable image file") from error
    except OSError as error:  # truncated data, unreadable path, zero bytes
        raise ValueError(f"{label}: cannot read image ({error})") from error
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from error


def as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own conversion clips pixels of more than 8 bits at 255, which turns
    a 16-bit grayscale image white: those keep their high byte instead, as Pillow reads 16-bit
    RGB TIFFs. 32-bit integer or float pixels (modes I, F) have no range to map from and are
    refused (ValueError)."""
    if image.mode.startswith("I;16"):
        high_byte = np.asarray(image, dtype=np.uint16) >> 8
        return Image.fromarray(high_byte.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        kind = "integer" if image.mode == "I" else "floating-point"
        raise ValueError(f"32-bit {kind} pixels (mode {image.mode}) have no defined intensity "
                         "range; save the image with 8 or 16 bits per channel")
    return image.convert("RGB")


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square of the image."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def rescaled(image: Image.Image, image_size: int, scale: float) -> np.ndarray:
    """The centre image_size square of `image` resized by `scale`."""
    if not scale > 0:
        raise ValueError(f"mpp must be positive. Received: scale={scale!r}")
    width, height = image.size
    side = max(image_size, round(min(width, height) * scale))  # at least the input square
    factor = side / min(width, height)
    resized = image.resize((max(side, round(width * factor)), max(side, round(height * factor))),
                           Image.Resampling.BILINEAR)
    left = (resized.size[0] - image_size) // 2
    top = (resized.size[1] - image_size) // 2
    return np.asarray(resized.crop((left, top, left + image_size, top + image_size)),
                      dtype=np.uint8)


def input_mpp(mpp: float | None, files: Sequence[str], image_size: int) -> float | None:
    """The micrometres per pixel of the model's input: training images at `mpp` whose shorter
    side (the median over `files`, from their headers) became image_size. None when unknown.
    A file whose header does not read is left out of the median: the decoding that follows
    reports it (or skips it, data.on_invalid=skip) by name."""
    if mpp is None:
        return None
    sides = []
    for file in files:
        try:
            with Image.open(file) as image:
                sides.append(min(image.size))
        except (OSError, Image.DecompressionBombError):  # unreadable: decoding names it
            continue
    return float(mpp * np.median(sides) / image_size) if sides else None
