"""Where decoded images live (`data.cache`): in memory, in a file on disk, or nowhere.

memory: every image decoded once into one uint8 array (fastest; 200 images at 224 px are 30 MB,
but 50,000 are 7.5 GB). disk: decoded once into `<paths.cache_dir>/images/<key>.npy`, keyed by
the file list (paths, sizes, modification times), the size and the upscale rule, and read back
through a memory map: later runs and parallel jobs reuse it, and the operating system keeps in
memory what fits. none: only the file list is kept; images are decoded again whenever they are
needed (every epoch). Every file is still checked once before training in every mode.

`LazyImages` stands in for the uint8 array in the latter two: indexing it (an int, a slice, a
list of indices) returns an ordinary array of just those images, `subset` makes a view, and
`np.asarray` of a small split (validation, test) decodes it whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from experiments.data.decode import load_image

AUTO_MEMORY_LIMIT_GB = 4.0  # `auto` keeps decoded images in memory up to this size


class LazyImages:
    """An (n, size, size, 3) uint8 image collection read on demand (see module docstring)."""

    def __init__(self, source: np.ndarray | Sequence[str], size: int,
                 indices: np.ndarray | None = None, allow_upscale: bool = True,
                 resize: str = "squash", scales: Sequence[float | None] | None = None) -> None:
        self.source = source  # a memory-mapped array, or the files to decode
        self.size = size
        self.allow_upscale = allow_upscale
        self.resize = resize
        self.scales = scales  # per file of `source`: rescaled by it (decode.load_image), or not
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, int)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size, self.size, 3)

    dtype = np.dtype(np.uint8)

    def subset(self, positions: Sequence[int] | np.ndarray) -> LazyImages:
        return LazyImages(self.source, self.size, self.indices[np.asarray(positions, int)],
                          self.allow_upscale, self.resize, self.scales)

    def __getitem__(self, item) -> np.ndarray:
        chosen = self.indices[item]
        if np.ndim(chosen) == 0:
            return self._read(np.asarray([chosen]))[0]
        return self._read(np.asarray(chosen))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self._read(self.indices)
        return images if dtype is None else images.astype(dtype)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        if isinstance(self.source, np.ndarray):  # the disk cache's memory map
            return np.asarray(self.source[rows])
        out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        for i, row in enumerate(rows):
            out[i] = load_image(self.source[row], self.size, self.allow_upscale,
                                resize=self.resize, scale=scale_of(self.scales, row))
        return out


# Decoded images: in memory, or read by index from the disk cache or the files.
ImageArray = np.ndarray | LazyImages


def choose_mode(mode: str, n_images: int, size: int) -> str:
    """`auto` -> memory when the decoded images fit under AUTO_MEMORY_LIMIT_GB, else disk."""
    if mode != "auto":
        return mode
    gigabytes = n_images * size * size * 3 / 1e9
    return "memory" if gigabytes <= AUTO_MEMORY_LIMIT_GB else "disk"


def scale_of(scales: Sequence[float | None] | None, index: int) -> float | None:
    """File `index`'s rescaling factor (its mpp over the model input's), None: none."""
    return None if scales is None else scales[index]


def file_key(file: str, scale: float | None = None) -> str:
    """A decoded image's identity in a cache (this one's and the frozen features'): its
    path, size and modification time, and the factor it was rescaled by (a source's mpp)
    when it was - an unscaled file keeps the key it always had."""
    stat = os.stat(file)
    key = f"{os.path.realpath(file)}|{stat.st_size}|{stat.st_mtime_ns}"
    return key if scale is None else f"{key}|x{scale:.6g}"


def cache_key(files: Sequence[str], size: int, allow_upscale: bool,
              resize: str = "squash", scales: Sequence[float | None] | None = None) -> str:
    # squash: the key of caches written before crop existed
    fit = [size, allow_upscale] if resize == "squash" else [size, allow_upscale, resize]
    digest = hashlib.sha256(json.dumps(fit).encode())
    for index, file in enumerate(files):
        digest.update(f"{file_key(file, scale_of(scales, index))}\n".encode())
    return digest.hexdigest()[:24]


def decode_all(files: Sequence[str], size: int, allow_upscale: bool, out: np.ndarray | None,
               workers: int | None = None, resize: str = "squash",
               scales: Sequence[float | None] | None = None) -> dict[int, str]:
    """Decode every file (in threads: Pillow releases the GIL), into `out` when given, else
    only to check it, each rescaled by its `scales` entry when given; returns {index: reason}
    for the files that cannot be used."""
    problems: dict[int, str] = {}

    def load(index: int) -> None:
        try:
            image = load_image(files[index], size, allow_upscale, resize=resize,
                               scale=scale_of(scales, index))
        except ValueError as error:
            problems[index] = str(error).removeprefix(f"{files[index]}: ")
            return
        if out is not None:
            out[index] = image

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2)) as pool:
        list(pool.map(load, range(len(files))))
    return problems


def disk_images(files: Sequence[str], size: int, allow_upscale: bool, folder: Path,
                resize: str = "squash", scales: Sequence[float | None] | None = None
                ) -> tuple[np.ndarray, dict[int, str]]:
    """The memory-mapped decoded images of `files` and the unusable ones, decoding them into
    the cache first unless a finished cache of the same files is there."""
    key = cache_key(files, size, allow_upscale, resize, scales)
    path, problems_path = folder / f"{key}.npy", folder / f"{key}.invalid.json"
    if not (path.is_file() and problems_path.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{key}.{os.getpid()}.partial.npy"
        out = np.lib.format.open_memmap(staging, mode="w+", dtype=np.uint8,
                                        shape=(len(files), size, size, 3))
        problems = decode_all(files, size, allow_upscale, out, resize=resize, scales=scales)
        out.flush()
        del out
        os.replace(staging, path)  # a reader never sees a half-written cache
        problems_path.write_text(json.dumps({str(k): v for k, v in problems.items()}))
    problems = {int(k): v for k, v in json.loads(problems_path.read_text()).items()}
    return np.load(path, mmap_mode="r"), problems
