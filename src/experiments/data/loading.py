"""A run's images: every file of data.root (and data.test_root) decoded and checked once, then
split by the split seed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.config.cohorts import MAIN_SOURCE, ExternalCohort
from experiments.config.schema import DataConfig, DemoDataConfig
from experiments.data import folders
from experiments.data import splits as splits_lib
from experiments.data.cohorts import CohortFiles, scan_cohort
from experiments.data.decode import input_mpp
from experiments.data.demo import ensure_demo_dataset
from experiments.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedData:
    """Every image of data.root (and data.test_root), decoded and checked, not yet split."""

    class_names: tuple[str, ...]
    pool: splits_lib.Split
    test: splits_lib.Split | None  # data.test_root
    skipped: list[folders.Invalid]
    image_size: int
    # Micrometres per pixel of the model's input (data.mpp at data.root's median image side
    # resized to image_size; None without data.mpp): what the model records and what a
    # source's mpp is rescaled to - one value for the run, its folds and its refit.
    input_mpp: float | None = None


def load_data(data_cfg: DataConfig, image_size: int, report_dir: Path, cache_dir: Path
              ) -> LoadedData:
    """Check and decode every image of data.root (and data.test_root) at `image_size` (the
    model's, resolved by the caller); groups when asked. Invalid-file reports go to
    `report_dir`, decoded images may be cached under `cache_dir`/images."""
    if isinstance(data_cfg, DemoDataConfig):
        ensure_demo_dataset(data_cfg.root, data_cfg.images_per_class, data_cfg.source_size)
    read = functools.partial(folders.read_folder, image_size=image_size,
                             on_invalid=data_cfg.on_invalid, allow_upscale=data_cfg.allow_upscale,
                             report_dir=report_dir, include_pattern=data_cfg.include_pattern,
                             cache=data_cfg.cache, cache_folder=cache_dir / "images",
                             resize=data_cfg.resize)
    if data_cfg.sources:
        class_names, pool, skipped, model_mpp = read_sources(data_cfg, image_size, report_dir,
                                                             cache_dir)
    else:
        class_names, pool, skipped = read(data_cfg.root)
        model_mpp = input_mpp(data_cfg.mpp, pool.files, image_size)
    test = None
    if data_cfg.test_root is not None:
        test_classes, test, test_skipped = read(data_cfg.test_root, root_key="data.test_root")
        if test_classes != class_names:
            raise DataError(f"data.test_root classes {list(test_classes)} differ from "
                            f"data.root classes {list(class_names)}")
        skipped += test_skipped
    if skipped:
        log.warning("Skipping %d invalid image file(s) (data.on_invalid=skip; all of them in "
                    "the run's skipped_files.csv):\n%s", len(skipped),
                    folders.summarize_invalid(skipped))
    if data_cfg.group_pattern is not None:
        if not data_cfg.sources:  # with sources, read_sources gives the groups
            pool = pool.with_groups(data_cfg.group_pattern)
        test = test.with_groups(data_cfg.group_pattern) if test is not None else None
    return LoadedData(class_names, pool, test, skipped, image_size, model_mpp)


def read_sources(data_cfg: DataConfig, image_size: int, report_dir: Path, cache_dir: Path
                 ) -> tuple[tuple[str, ...], splits_lib.Split, list[folders.Invalid],
                            float | None]:
    """data.root and every data.sources folder as one pool, each image with its source; with
    any group pattern, every image gets a group named after its source (`breakhis:14-2523`;
    an image of a source without a pattern is its own group), so patients of different
    sources never merge and splits keep each patient on one side. A source with an mpp is
    rescaled to data.root's scale (`source_scales`). Also returns the model input's mpp
    (`LoadedData.input_mpp`)."""
    class_names, files, labels = folders.scan_folder(data_cfg.root, data_cfg.include_pattern)
    main = ExternalCohort(MAIN_SOURCE, data_cfg.root, data_cfg.group_pattern)
    scanned = [CohortFiles(main, tuple(files), np.asarray(labels, dtype=int),
                           None if main.group_pattern is None
                           else splits_lib.group_ids(files, main.group_pattern))]
    scanned += [scan_cohort(folder, class_names, "data.sources")
                for folder in data_cfg.source_folders]
    source_of, group_of = {}, {}
    for part in scanned:
        name = part.cohort.name
        for index, file in enumerate(part.files):
            source_of[file] = name
            group_of[file] = f"{name}:{file if part.groups is None else part.groups[index]}"
    model_mpp = input_mpp(data_cfg.mpp, files, image_size)
    scale = source_scales(model_mpp, [part.cohort for part in scanned])
    pool, skipped = folders.decode_checked(
        [f for part in scanned for f in part.files],
        [int(y) for part in scanned for y in part.labels], class_names,
        ", ".join(part.cohort.root for part in scanned), image_size, data_cfg.on_invalid,
        data_cfg.allow_upscale, report_dir, data_cfg.cache, cache_dir / "images",
        data_cfg.resize, None if not scale else
        [scale.get(part.cohort.name) for part in scanned for _ in part.files])
    grouped = any(part.groups is not None for part in scanned)
    counts = {part.cohort.name: sum(source_of[f] == part.cohort.name for f in pool.files)
              for part in scanned}
    log.info("Training sources: " + ", ".join(f"{k} {n} images" for k, n in counts.items()))
    return class_names, dataclasses.replace(
        pool, sources=tuple(source_of[f] for f in pool.files),
        groups=tuple(group_of[f] for f in pool.files) if grouped else None), skipped, model_mpp


def source_scales(model_mpp: float | None, sources: Sequence[ExternalCohort]
                  ) -> dict[str, float]:
    """By how much each of `sources` with an mpp is resized so that its pixels span what the
    model's input pixels do (`decode.load_image`'s scale): its mpp over the input's
    (`model_mpp`, `LoadedData.input_mpp`). Empty when no source has an mpp."""
    mpps = {s.name: s.mpp for s in sources if s.mpp is not None}
    if model_mpp is None or not mpps:
        return {}
    scales = {name: mpp / model_mpp for name, mpp in mpps.items()}
    log.info("Sources rescaled to data.root's scale (%.3g um/px at the model's input): %s",
             model_mpp, ", ".join(f"{k} resized x{v:.3g}" for k, v in scales.items()))
    return scales


def split(data_cfg: DataConfig, loaded: LoadedData, trainer_seed: int) -> splits_lib.Splits:
    """Train/validation/test splits of the loaded images, seeded by `split_seed`."""
    return splits_lib.make_splits(loaded.class_names, loaded.pool, loaded.test,
                                  data_cfg.val_fraction, data_cfg.test_fraction,
                                  split_seed(data_cfg, trainer_seed))


def split_seed(data_cfg: DataConfig, trainer_seed: int) -> int:
    """The seed that splits the images: data.split_seed, else trainer.seed."""
    return trainer_seed if data_cfg.split_seed is None else data_cfg.split_seed
