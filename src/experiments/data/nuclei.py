"""Nuclei as a ruler: the scale of a folder of H&E images measured from its pixels.

A magnification label or a stated micrometres-per-pixel can be wrong (this project quoted
BreakHis at 0.20 um/px at 100X, where its nuclei say about 0.65), and many folders have none.
Most nuclei measure 5-10 um in any laboratory, so the size of a folder's nuclei in pixels,
against a reference folder's, gives the ratio of their scales - the `mpp` a cohort or a
prediction needs (`eval.external.<name>.mpp`, predict's `mpp=`) once the reference's is known.

Nuclei: haematoxylin optical density by colour deconvolution (Ruifrok & Johnston 2001's H&E
vectors), thresholded at each image's Otsu level, opened (3x3) and filled; a connected
component of at least 12 px that fills half of its bounding box or more (round enough for a
nucleus, not a cluster) counts, its size the diameter of a disc of the same area.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

# Haematoxylin and eosin optical density vectors (Ruifrok & Johnston 2001)
STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
MIN_AREA = 12  # px: smaller components are fragments or noise
MIN_FILL = 0.5  # of the bounding box: rounder than this is a nucleus, not a cluster
MIN_NUCLEI = 5  # per image, for its median to count
# Shrinkings searched: enlarging adds no detail (the measure levels off above 1), so the folder
# with the larger nuclei is the one shrunk; 0.3 is where the 12-px floor flattens the measure.
FACTORS = np.round(np.arange(0.3, 1.001, 0.05), 2)


def haematoxylin_matrix() -> np.ndarray:
    """Optical density (RGB) -> stain amounts; column 0 is haematoxylin."""
    h, e = (v / np.linalg.norm(v) for v in STAINS)
    residual = np.cross(h, e)
    return np.linalg.inv(np.stack([h, e, residual / np.linalg.norm(residual)]))


def otsu(values: np.ndarray) -> float:
    """The threshold that best separates `values` into two classes (Otsu 1979)."""
    counts, edges = np.histogram(values, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    mass = np.cumsum(counts * centres)
    mean_below = mass / np.maximum(below, 1)
    mean_above = (mass[-1] - mass) / np.maximum(above, 1)
    return float(centres[np.argmax(below * above * (mean_below - mean_above) ** 2)])


def read_rgb(path: Path, factor: float = 1.0) -> np.ndarray:
    """An image's RGB pixels at its native size times `factor`; ValueError naming the file."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error
    if factor != 1.0:
        rgb = rgb.resize((max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor))),
                         Image.Resampling.LANCZOS)
    return np.asarray(rgb, np.float64)


def nucleus_diameters(rgb: np.ndarray) -> np.ndarray:
    """The equivalent diameters (px) of an RGB image's nucleus-like haematoxylin components."""
    density = -np.log((rgb + 1.0) / 256.0)
    stain = (density.reshape(-1, 3) @ haematoxylin_matrix())[:, 0].reshape(rgb.shape[:2])
    stained = stain[stain > 0.05]
    mask = stain > otsu(stained) if stained.size > 100 else stain > 0.3
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(mask, np.ones((3, 3))))
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(0)
    area = np.asarray(ndimage.sum(mask, labels, np.arange(1, count + 1)))
    boxes = ndimage.find_objects(labels)
    fill = np.array([a / ((box[0].stop - box[0].start) * (box[1].stop - box[1].start))
                     for a, box in zip(area, boxes, strict=True)])
    keep = (area >= MIN_AREA) & (fill >= MIN_FILL) & (area <= 0.01 * mask.size)
    return 2 * np.sqrt(area[keep] / np.pi)


def median_diameter(files: Sequence[Path], factor: float = 1.0) -> float:
    """The median over images of each image's median nucleus diameter (px), the images
    resized by `factor`; ValueError when no image shows nuclei."""
    medians = []
    for path in files:
        sizes = nucleus_diameters(read_rgb(path, factor))
        if len(sizes) >= MIN_NUCLEI:
            medians.append(np.median(sizes))
    if not medians:
        raise ValueError(f"none of the {len(files)} images shows {MIN_NUCLEI} or more nuclei "
                         "(haematoxylin-stained round objects of 12 px or more); is it H&E?")
    return float(np.median(medians))


def matching_factor(files: Sequence[Path], diameter: float) -> float:
    """The factor (FACTORS' range) by which `files` must be shrunk for their median nucleus to
    measure `diameter` px, interpolated at the first crossing below 1 (the measure is not
    proportional to scale - the 12-px floor and the optics' blur weigh more in smaller images -
    so it is found by shrinking, not by a ratio of sizes)."""
    measured = [median_diameter(files, float(f)) for f in FACTORS]
    for k in range(len(FACTORS) - 1, 0, -1):
        low, high = measured[k - 1], measured[k]
        if low <= diameter <= high and high > low:
            return float(FACTORS[k - 1] + (diameter - low) / (high - low)
                         * (FACTORS[k] - FACTORS[k - 1]))
    raise ValueError(f"nuclei of {diameter:.1f} px are beyond the other folder shrunk by "
                     f"{FACTORS.min()}-1 ({min(measured):.1f}-{measured[-1]:.1f} px): the two "
                     f"folders' scales differ by more than {1 / FACTORS.min():.1f}x")


def relative_scale(images: Sequence[Path], reference: Sequence[Path]
                   ) -> tuple[float, float, float]:
    """`images`' and `reference`'s median nucleus diameters (px), and how many times what a
    reference pixel spans an `images` pixel spans (its mpp / the reference's mpp): the folder
    with the larger nuclei (the finer pixels) is shrunk until they match the other's."""
    size, reference_size = median_diameter(images), median_diameter(reference)
    if size <= reference_size:
        return size, reference_size, 1.0 / matching_factor(reference, size)
    return size, reference_size, matching_factor(images, reference_size)
