"""A synthetic two-class "H&E-like" image set, so the framework runs with no download.

benign: small, regular, evenly stained nuclei lining round gland-like rings around pale lumens,
in pink stroma. malignant: crowded, enlarged, irregular, dark (hyperchromatic) nuclei scattered
without gland structure. Generated deterministically from a seed into a cache folder; a marker
file records the generator's parameters, so a finished set is reused and a changed one rebuilt.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.errors import NotOursError

CLASSES = ("benign", "malignant")
_VERSION = 2
_MARKER = "demo.json"

_STROMA = np.array([236.0, 170.0, 200.0])  # eosin pink
_LUMEN = np.array([248.0, 236.0, 242.0])
_NUCLEUS = np.array([92.0, 60.0, 150.0])  # hematoxylin purple
_DARK_NUCLEUS = np.array([58.0, 30.0, 110.0])


def _blob(canvas: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float,
          colour: np.ndarray, rng: np.random.Generator, jagged: float) -> None:
    """Paint a soft, optionally irregular ellipse into `canvas` (float RGB), in place."""
    size = canvas.shape[0]
    reach = 1.6 * max(rx, ry)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * cos + dy * sin) / rx
    v = (-dx * sin + dy * cos) / ry
    r = np.sqrt(u * u + v * v)
    if jagged:
        theta = np.arctan2(v, u)
        phases = rng.uniform(0, 2 * np.pi, 3)
        wobble = sum(np.sin((k + 2) * theta + p) for k, p in enumerate(phases)) / 3
        r = r / (1 + jagged * wobble)
    alpha = np.clip(1.5 - r * 1.2, 0, 1)[..., None] * 0.9
    patch = canvas[y0:y1, x0:x1]
    patch[:] = patch * (1 - alpha) + colour * alpha


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1)).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    noise = noise[..., None]
    shade = _STROMA * rng.uniform(0.95, 1.03)
    return np.clip(shade + noise * 6 + rng.normal(0, 4, (size, size, 3)), 0, 255)


def _gland(canvas: np.ndarray, rng: np.random.Generator, nucleus_scale: float) -> None:
    """A pale lumen ringed by regular nuclei."""
    size = canvas.shape[0]
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    radius = rng.uniform(0.14, 0.22) * size
    _blob(canvas, cy, cx, radius * 0.8, radius * 0.8, 0.0, _LUMEN, rng, 0.0)
    n = int(2 * np.pi * radius / (size * 0.045))
    for k in range(n):
        angle = 2 * np.pi * k / n + rng.normal(0, 0.05)
        ny, nx = cy + radius * np.sin(angle), cx + radius * np.cos(angle)
        nr = size * rng.uniform(0.014, 0.018) * nucleus_scale
        _blob(canvas, ny, nx, nr, nr * 1.3, angle, _NUCLEUS, rng, 0.0)


def _scattered_nuclei(canvas: np.ndarray, rng: np.random.Generator, count: int,
                      radius: tuple[float, float], colour: np.ndarray, jagged: float) -> None:
    size = canvas.shape[0]
    for _ in range(count):
        ny, nx = rng.uniform(0, size, 2)
        nr = size * rng.uniform(*radius)
        _blob(canvas, ny, nx, nr, nr * rng.uniform(0.7, 1.8), rng.uniform(0, np.pi),
              colour * rng.uniform(0.85, 1.15), rng, jagged)


def _benign(size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = _background(size, rng)
    for _ in range(rng.integers(1, 4)):
        _gland(canvas, rng, 1.0)
    _scattered_nuclei(canvas, rng, int(rng.integers(4, 9)), (0.010, 0.014), _NUCLEUS, 0.0)
    if rng.random() < 0.35:  # reactive stroma: a crowd of larger nuclei, the hard cases
        _scattered_nuclei(canvas, rng, int(rng.integers(8, 20)), (0.016, 0.03), _NUCLEUS, 0.1)
    return canvas


def _malignant(size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = _background(size, rng)
    if rng.random() < 0.35:  # a residual gland among the tumour cells
        _gland(canvas, rng, 1.3)
    _scattered_nuclei(canvas, rng, int(rng.integers(16, 42)), (0.02, 0.045), _DARK_NUCLEUS,
                      0.25)
    return canvas


def make_image(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic RGB uint8 tile of `label` ("benign" or "malignant"), with a per-slide
    stain variation (a random per-channel gain) shared by both classes."""
    painter = {"benign": _benign, "malignant": _malignant}[label]
    stain = rng.uniform(0.88, 1.08, 3)
    return np.clip(painter(size, rng) * stain, 0, 255).astype(np.uint8)


def ensure_demo_dataset(root: str | Path, images_per_class: int, size: int, seed: int = 0) -> Path:
    """Generate the demo set into `root` unless the same set is already there; return root.
    Jobs that start together (a parallel sweep, multi_worker workers on one machine) take
    turns: the first writes the set, the others find it."""
    root = Path(root)
    spec = {"version": _VERSION, "images_per_class": images_per_class, "size": size,
            "seed": seed}
    if _holds(root, spec):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _holds(root, spec):
                _generate(root, spec)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def _holds(root: Path, spec: dict[str, int]) -> bool:
    marker = root / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == spec


def _generate(root: Path, spec: dict[str, int]) -> None:
    """Write the set into a private folder, then put it in place of `root` (an outdated set
    of ours is replaced; a folder that is not ours is refused)."""
    marker = root / _MARKER
    if root.exists() and not marker.is_file():
        raise NotOursError(f"{root} exists and is not a demo set (no {_MARKER}); "
                           "point data.root of data=demo at a new folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    rng = np.random.default_rng(spec["seed"])
    for label in CLASSES:
        (staging / label).mkdir()
        for index in range(spec["images_per_class"]):
            image = make_image(label, spec["size"], rng)
            Image.fromarray(image).save(staging / label / f"{label}_{index:04d}.jpg", quality=92)
    (staging / _MARKER).write_text(json.dumps(spec))
    if marker.is_file():
        shutil.rmtree(root)
    staging.rename(root)
