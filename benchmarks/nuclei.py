"""How large are the nuclei of a folder's images, in pixels? Nuclei are a ruler every H&E image
carries (most epithelial and stromal nuclei measure 5-10 um, a lymphocyte about 7 um), so
the ratio of two folders' nucleus sizes is the ratio of their scales - a check of a stated
micrometres-per-pixel (`data.mpp`, a cohort's `mpp`) against the pixels themselves.

    cd benchmarks && python nuclei.py ../../shared/data/biopsy-seed/train \
        ../../shared/data/breakhis-100x

Each image at its native resolution, its nuclei found as `experiments.data.nuclei` finds
them (the measurement `python -m experiments.scale` makes for users). Columns per folder and
class: images, nuclei, the median over images of
each image's median diameter (and its interquartile range over images), and the 90th
percentile of all the nuclei measured (large nuclei, less affected by fragments).

The sizes do not scale in proportion (the 12-px floor and the optics' blur weigh more in small
images: the seed images at half their size measure 0.64x, not 0.5x), so a ratio of two
folders' sizes understates their difference in scale. `--reference` (the first folder)
calibrates it: the folder with the larger nuclei is shrunk by a grid of factors and measured
again until they match the other's (`experiments.data.nuclei.relative_scale`): each other
folder's mpp over the reference's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from machine import cpu_line, print_table  # benchmarks/ (run from there)

from experiments.data.folders import scan_folder
from experiments.data.nuclei import MIN_NUCLEI, nucleus_diameters, read_rgb, relative_scale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="labeled folders (class/ images)")
    parser.add_argument("--reference", action="store_true",
                        help="each other folder's scale relative to the first one's")
    args = parser.parse_args(argv)
    print(cpu_line(), flush=True)
    rows = []
    start = time.perf_counter()
    for folder in args.folders:
        classes, files, labels = scan_folder(folder)
        for index, name in enumerate(classes):
            sizes = [nucleus_diameters(read_rgb(Path(f)))
                     for f, label in zip(files, labels, strict=True) if label == index]
            medians = np.array([np.median(s) for s in sizes if len(s) >= MIN_NUCLEI])
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
            size, reference_size, ratio = relative_scale([Path(f) for f in files],
                                                         [Path(f) for f in reference])
            scales.append((folder.name, f"{size:.1f}", f"{reference_size:.1f}", f"{ratio:.2f}"))
        print_table(("folder", "median diameter, px", "the reference's", "its mpp / the "
                     "reference's"), scales)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
