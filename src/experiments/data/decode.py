"""Decoding one image file (path, bytes or file object) to RGB at the model's input size: the
one decoder shared by training, evaluation, predict and serving.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from experiments.config.choices import RESIZE_MODES

ImageSource = str | Path | bytes | BinaryIO


def load_image(source: ImageSource, image_size: int, allow_upscale: bool = True,
               name: str | None = None, max_pixels: int | None = None,
               resize: str = "squash") -> np.ndarray:
    """Decode an image file, its bytes or a file object to RGB uint8 (grayscale, palette and
    RGBA converted) of (image_size, image_size): `resize="crop"` scales the shorter side to
    image_size and keeps the centre square (nuclei keep their shape), "squash" scales each
    side to image_size (a non-square image is distorted). Raises ValueError naming the file
    (`name`, else the path) and the reason; with `max_pixels`, before decoding an image with
    more pixels (its header is read, not its pixels)."""
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
            image.draft("RGB", (image_size, image_size))  # fast JPEG downscale while decoding
            rgb = image.convert("RGB")
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


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square of the image."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))
