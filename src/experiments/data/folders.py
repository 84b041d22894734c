"""Image folders: scan class subfolders, decode and check every file, and report the invalid
ones (a summary per reason, the full list as CSV).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.config.choices import ON_INVALID
from experiments.config.locations import require_folder
from experiments.data import image_store
from experiments.data.decode import load_image  # noqa: F401  (data.load_image, for callers)
from experiments.data.image_store import LazyImages
from experiments.data.splits import Split
from experiments.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")




@dataclass(frozen=True)
class Invalid:
    """A file left out of (or stopping) a run, and why."""

    file: str
    reason: str


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def scan_folder(root: str | Path, include_pattern: str | None = None, min_classes: int = 2,
                key: str = "data", root_key: str | None = None
                ) -> tuple[tuple[str, ...], list[str], list[int]]:
    """Class names (sorted subfolder names), files and labels of an image folder.

    The class is the first folder level; images may sit any number of levels below it (e.g.
    BreakHis' `malignant/SOB/ductal_carcinoma/<patient>/200X/<image>.png`). Files are listed by
    extension; hidden files (`.DS_Store`, `._x`) are ignored silently; with `include_pattern`,
    only files whose path relative to `root` matches it (a regex, searched) are kept. Errors
    name the config keys under `key` (`data`, or an external cohort's `eval.external.<name>`);
    the folder itself is `root_key` (default `<key>.root`; data.test_root's is its own).
    """
    root_key = root_key or f"{key}.root"
    try:
        include = None if include_pattern is None else re.compile(include_pattern)
    except re.error as error:
        raise ConfigError(f"`{key}.include_pattern` is not a valid regular expression ({error})."
                          f" Received: {key}.include_pattern={include_pattern!r}") from error
    root = require_folder(root, root_key)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p))
    if len(class_dirs) < min_classes:
        raise DataError(f"{root} ({root_key}) must hold one subfolder per class, at least "
                        f"{min_classes}; found {[p.name for p in class_dirs]}")
    files: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(
            str(p) for p in class_dir.rglob("*")
            if not _is_hidden(p) and p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
            and (include is None or include.search(p.relative_to(root).as_posix()))
        )
        if not found:
            which = "" if include is None else \
                f" matching {key}.include_pattern={include_pattern!r}"
            raise DataError(f"Class folder {class_dir} holds no images{which} "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(found)
        labels.extend([label] * len(found))
    return tuple(p.name for p in class_dirs), files, labels


def load_images(files: Sequence[str], image_size: int, allow_upscale: bool = True,
                cache: str = "memory", cache_folder: Path | None = None,
                resize: str = "squash", scales: Sequence[float | None] | None = None
                ) -> tuple[np.ndarray | LazyImages, list[Invalid]]:
    """Check every file (decoding it, rescaled by its `scales` entry when given), keeping the
    decoded images as `cache` says (see `experiments.image_store`: memory, disk, none; auto
    picks by size). Returns the images of the readable files, in order, and every unreadable
    file with why."""
    mode = image_store.choose_mode(cache, len(files), image_size)
    stored: np.ndarray | None
    if mode == "disk":
        if cache_folder is None:
            raise ConfigError("data.cache=disk needs a cache folder (paths.cache_dir)")
        stored, problems = image_store.disk_images(files, image_size, allow_upscale,
                                                   cache_folder, resize, scales)
    else:
        stored = (np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
                  if mode == "memory" else None)
        problems = image_store.decode_all(files, image_size, allow_upscale, stored,
                                          resize=resize, scales=scales)
    keep = [i for i in range(len(files)) if i not in problems]
    invalid = [Invalid(files[i], problems[i]) for i in sorted(problems)]
    if mode == "memory" and stored is not None:
        return stored[keep], invalid
    source = stored if mode == "disk" and stored is not None else list(files)
    return LazyImages(source, image_size, np.asarray(keep, int), allow_upscale, resize,
                      scales), invalid


def read_folder(root: str | Path, image_size: int, on_invalid: str = "error",
                allow_upscale: bool = True, report_dir: Path | None = None,
                include_pattern: str | None = None, cache: str = "memory",
                cache_folder: Path | None = None, resize: str = "squash",
                root_key: str = "data.root") -> tuple[tuple[str, ...], Split, list[Invalid]]:
    """Scan and decode a class folder; every file is checked before any training starts.
    Errors about the folder name `root_key`, the config key that set it.

    on_invalid="error" raises one error that summarises the bad files (how many per reason, a
    few of each) and, with `report_dir`, writes every one with its reason to
    `<report_dir>/invalid_files.csv`; "skip" leaves them out and returns them. A class left
    without valid images is an error either way.
    """
    class_names, files, labels = scan_folder(root, include_pattern, root_key=root_key)
    split, invalid = decode_checked(files, labels, class_names, str(root), image_size,
                                    on_invalid, allow_upscale, report_dir, cache, cache_folder,
                                    resize)
    return class_names, split, invalid


def decode_checked(files: Sequence[str], labels: Sequence[int], class_names: Sequence[str],
                   where: str, image_size: int, on_invalid: str = "error",
                   allow_upscale: bool = True, report_dir: Path | None = None,
                   cache: str = "memory", cache_folder: Path | None = None,
                   resize: str = "squash", scales: Sequence[float | None] | None = None
                   ) -> tuple[Split, list[Invalid]]:
    """Decode and check `files` (of the folder(s) `where`, for messages; each rescaled by its
    `scales` entry when given): on_invalid as in `read_folder`; a class left without valid
    images is an error."""
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"data.on_invalid must be one of {ON_INVALID}. "
                          f"Received: data.on_invalid={on_invalid!r}")
    images, invalid = load_images(files, image_size, allow_upscale, cache, cache_folder, resize,
                                  scales)
    if invalid and on_invalid == "error":
        listing = None
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            listing = write_invalid_table(invalid, report_dir / INVALID_TABLE)
        where_listed = f"; every one with its reason is listed in {listing}" if listing else ""
        raise DataError(f"{len(invalid)} invalid image file(s) under {where} (fix or remove "
                        f"them, or set data.on_invalid=skip{where_listed}):\n"
                        f"{summarize_invalid(invalid)}")
    bad = {item.file for item in invalid}
    kept = [i for i, file in enumerate(files) if file not in bad]
    split = Split(tuple(files[i] for i in kept), tuple(labels[i] for i in kept), images,
                  scales=None if scales is None else tuple(scales[i] for i in kept))
    counts = split.class_counts(class_names)
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"No valid images left in class folder(s) {empty} under {where}")
    return split, invalid


INVALID_TABLE = "invalid_files.csv"


_LISTED = 10  # up to this many bad files, each is listed


_EXAMPLES = 3  # files named per reason in a summary


_REASONS = 8  # reasons shown in a summary


def summarize_invalid(invalid: Sequence[Invalid]) -> str:
    """A screenful about bad files: each file with its reason when there are few, else per
    kind of reason how many and a few of them."""
    if len(invalid) <= _LISTED:
        return "\n".join(f"  {item.file}: {item.reason}" for item in invalid)
    by_reason: dict[str, list[Invalid]] = {}
    for item in invalid:
        kind = re.sub(r"\b\d+x\d+ px\b", "WxH px", item.reason)  # sizes differ, reason same
        by_reason.setdefault(kind, []).append(item)
    lines = []
    for kind, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))[:_REASONS]:
        if len(items) == 1:
            lines.append(f"  {items[0].file}: {items[0].reason}")
            continue
        shown = ", ".join(Path(i.file).name for i in items[:_EXAMPLES])
        more = f" and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else ""
        reason = items[0].reason if len({i.reason for i in items}) == 1 else kind
        lines.append(f"  {len(items)} x {reason}\n      e.g. {shown}{more}")
    if len(by_reason) > _REASONS:
        lines.append(f"  ... and {len(by_reason) - _REASONS} other reasons")
    return "\n".join(lines)


def write_invalid_table(invalid: Sequence[Invalid], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows((item.file, item.reason) for item in invalid)
    return path
