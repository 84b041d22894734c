"""How large are the nuclei of a folder's images, in pixels? Nuclei are a ruler every H&E image
carries (most epithelial and stromal nuclei measure 5-10 um, a lymphocyte about 7 um), so
the ratio of two folders' nucleus sizes is the ratio of their scales - a check of a stated
micrometres-per-pixel (`data.mpp`, a cohort's `mpp`) against the pixels themselves.

    cd benchmarks && python nuclei.py ../../shared/data/biopsy-seed/train \
        ../../shared/data/breakhis-100x

Each image at its native resolution: haematoxylin optical density by colour deconvolution
(Ruifrok & Johnston 2001's H&E vectors), thresholded at its Otsu level, opened (3x3) and
filled; every connected component of 12 px or more that fills at least half of its bounding
box (round enough for a nucleus, not a cluster) is a nucleus, its size the diameter of a disc
of the same area. Columns per folder and class: images, nuclei, the median over images of
each image's median diameter (and its interquartile range over images), and the 90th
percentile of all the nuclei measured (large nuclei, less affected by fragments).

The sizes do not scale in proportion (the 12-px floor and the optics' blur weigh more in small
images: the seed images at half their size measure 0.64x, not 0.5x), so a ratio of two
folders' sizes understates their difference in scale. `--reference` (the first folder)
calibrates it: its images resized by a grid of factors and measured again, the factor at
which they match each other folder's median diameter is that folder's scale relative to the
reference's (its mpp = the reference's mpp / the factor).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from machine import cpu_line, print_table  # benchmarks/ (run from there)
from PIL import Image
from scipy import ndimage

from experiments.data.folders import scan_folder

STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # H, E (Ruifrok & Johnston)


def haematoxylin_matrix() -> np.ndarray:
    """Optical density (RGB) -> stain amounts; the column 0 is haematoxylin."""
    h, e = (v / np.linalg.norm(v) for v in STAINS)
    residual = np.cross(h, e)
    return np.linalg.inv(np.stack([h, e, residual / np.linalg.norm(residual)]))


def otsu(values: np.ndarray) -> float:
    counts, edges = np.histogram(values, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    mass = np.cumsum(counts * centres)
    mean_below = mass / np.maximum(below, 1)
    mean_above = (mass[-1] - mass) / np.maximum(above, 1)
    return float(centres[np.argmax(below * above * (mean_below - mean_above) ** 2)])


def nucleus_diameters(path: Path, matrix: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """The equivalent diameters (px) of an image's nucleus-like haematoxylin components, the
    image first resized by `factor`."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if factor != 1.0:
            rgb = rgb.resize((round(rgb.width * factor), round(rgb.height * factor)),
                             Image.Resampling.LANCZOS)
        rgb = np.asarray(rgb, np.float64)
    density = -np.log((rgb + 1.0) / 256.0)
    stain = (density.reshape(-1, 3) @ matrix)[:, 0].reshape(rgb.shape[:2])
    mask = stain > otsu(stain[stain > 0.05]) if np.sum(stain > 0.05) > 100 else stain > 0.3
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(mask, np.ones((3, 3))))
    labels, count = ndimage.label(mask)
    index = np.arange(1, count + 1)
    area = ndimage.sum(mask, labels, index)
    boxes = ndimage.find_objects(labels)
    fill = np.array([a / ((b[0].stop - b[0].start) * (b[1].stop - b[1].start))
                     for a, b in zip(area, boxes, strict=True)]) if count else np.zeros(0)
    keep = (area >= 12) & (fill >= 0.5) & (area <= 0.01 * mask.size)
    return 2 * np.sqrt(area[keep] / np.pi)


def median_diameter(files: list[str], matrix: np.ndarray, factor: float = 1.0) -> float:
    """The median over images of each image's median nucleus diameter (px)."""
    sizes = (nucleus_diameters(Path(f), matrix, factor) for f in files)
    return float(np.median([np.median(s) for s in sizes if len(s) >= 5]))


def relative_scale(reference: list[str], target: float, matrix: np.ndarray) -> float:
    """The factor by which the reference images must be resized for their median nucleus
    diameter to be `target` (interpolated on a grid of factors from 0.3 to 1.5)."""
    factors = np.round(np.arange(0.3, 1.51, 0.1), 2)
    measured = np.array([median_diameter(reference, matrix, float(f)) for f in factors])
    if not np.all(np.diff(measured) > 0):
        raise ValueError(f"nucleus sizes do not grow with the factor: {measured.round(2)}")
    if not measured[0] <= target <= measured[-1]:
        raise ValueError(f"a median diameter of {target:.1f} px is outside what the reference "
                         f"gives resized by 0.3-1.5 ({measured[0]:.1f}-{measured[-1]:.1f} px)")
    return float(np.interp(target, measured, factors))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="labeled folders (class/ images)")
    parser.add_argument("--reference", action="store_true",
                        help="each other folder's scale relative to the first one's")
    args = parser.parse_args(argv)
    print(cpu_line(), flush=True)
    matrix = haematoxylin_matrix()
    rows = []
    start = time.perf_counter()
    for folder in args.folders:
        classes, files, labels = scan_folder(folder)
        for index, name in enumerate(classes):
            sizes = [nucleus_diameters(Path(f), matrix)
                     for f, label in zip(files, labels, strict=True) if label == index]
            medians = np.array([np.median(s) for s in sizes if len(s) >= 5])
            pooled = np.concatenate(sizes)
            low, mid, high = np.percentile(medians, [25, 50, 75])
            rows.append((folder.name if folder.name != "train" else folder.parent.name, name,
                         str(len(sizes)), str(len(pooled)), f"{mid:.1f} ({low:.1f}-{high:.1f})",
                         f"{np.percentile(pooled, 90):.1f}"))
    print_table(("folder", "class", "images", "nuclei", "median diameter, px (IQR)",
                 "90th percentile, px"), rows)
    if args.reference:
        _, reference, _ = scan_folder(args.folders[0])
        scales = []
        for folder in args.folders[1:]:
            _, files, _ = scan_folder(folder)
            target = median_diameter(files, matrix)
            factor = relative_scale(reference, target, matrix)
            scales.append((folder.name, f"{target:.1f}", f"{factor:.2f}", f"{1 / factor:.2f}"))
        print_table(("folder", "median diameter, px", f"{args.folders[0].parent.name}/"
                     f"{args.folders[0].name} resized by", "its mpp / the reference's"), scales)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
