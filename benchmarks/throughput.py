"""Training throughput on this machine, every row measured in one process, side by side.

    python benchmarks/throughput.py                 # ResNet50 + DenseNet201 at 224 px
    python benchmarks/throughput.py --quick         # small sizes, few steps (~2-3 minutes)
    python benchmarks/throughput.py --backbones resnet50 --batch-sizes 8 32 --steps 8

Rows:
- peak: a 4096x4096 matmul in float32 and bfloat16 (the roofline the other rows are read against);
- input pipeline: the framework's tf.data pipeline with the study augmentation, alone;
- seed-style: the notebook's way (all images in one numpy array, random zoom / rotation / flips
  per batch in Python with scipy on the host, float32, `train_on_batch`), at batch 2 and 32;
- framework: `experiments`' model and tf.data pipeline at each precision and batch size.
Columns: images/s, seconds per 200-image epoch, achieved GFLOP/s (3x the forward FLOPs per
training image, counted by TF's profiler), that as a fraction of the measured bf16 matmul peak,
peak resident memory so far, and the speed-up over the seed-style batch-2 row of the backbone.
Timings skip the first (tracing) step and take the median step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from machine import cpu_line  # benchmarks/machine.py (scripts run from this folder)
from scipy import ndimage

from experiments.data import folders
from experiments.data import pipeline as pipeline_lib
from experiments.data.augment import StudyAugmentation
from experiments.data.demo import ensure_demo_dataset
from experiments.models.classifier import build_classifier, compile_classifier
from experiments.models.fused_bn import fuse_batchnorm
from experiments.training.runtime import set_precision

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "biopsy-seed" / "train"


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def matmul_gflops(dtype: tf.DType, n: int = 4096, repeats: int = 5) -> float:
    a = tf.random.uniform((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    matmul = tf.function(lambda x: tf.linalg.matmul(x, x))
    matmul(a).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).numpy()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def forward_gflops(model: keras.Model, size: int) -> float:
    """Forward-pass GFLOP per image, counted by TF's profiler on the frozen graph."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )
    from tensorflow.python.profiler.model_analyzer import profile
    from tensorflow.python.profiler.option_builder import ProfileOptionBuilder

    spec = tf.TensorSpec([1, size, size, 3], tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(concrete)
    options = ProfileOptionBuilder(ProfileOptionBuilder.float_operation()).with_empty_output()
    return profile(frozen.graph, options=options.build()).total_float_ops / 1e9


def median_step_seconds(step: Callable[[], None], steps: int) -> float:
    step()  # tracing / warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seed_style_augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The notebook's augmentation, per image on the host: zoom 0.2, rotation 90, flips."""
    out = np.empty_like(batch)
    for i, image in enumerate(batch):
        angle = rng.uniform(-90, 90)
        image = ndimage.rotate(image, angle, reshape=False, mode="nearest", order=1)
        zoom = rng.uniform(0.8, 1.2)
        zoomed = ndimage.zoom(image, (zoom, zoom, 1), order=1, mode="nearest")
        size = batch.shape[1]
        if zoomed.shape[0] >= size:
            top = (zoomed.shape[0] - size) // 2
            image = zoomed[top:top + size, top:top + size]
        else:
            pad = size - zoomed.shape[0]
            image = np.pad(zoomed, ((pad // 2, pad - pad // 2),) * 2 + ((0, 0),), mode="edge")
        if rng.random() < 0.5:
            image = image[:, ::-1]
        if rng.random() < 0.5:
            image = image[::-1]
        out[i] = image
    return out


def load_images(folder: Path, size: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    class_names, split, _ = folders.read_folder(folder, size, allow_upscale=True)
    order = np.random.default_rng(0).permutation(len(split))[:limit]
    return split.images[order], np.asarray(split.labels)[order]


class BatchTimer(keras.callbacks.Callback):
    """Wall time of every training batch inside `fit` (the framework's real loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


class Table:
    HEADER = ("row", "img/s", "s/200-img epoch", "GFLOP/s", "% bf16 peak", "peak RSS GB",
              "x seed b2")

    def __init__(self, bf16_peak: float) -> None:
        self.bf16_peak = bf16_peak
        self.rows: list[tuple[str, ...]] = []
        self.baseline: dict[str, float] = {}

    def add(self, name: str, images_per_s: float, gflop_per_image: float | None = None,
            backbone: str | None = None) -> None:
        gflops = images_per_s * 3 * gflop_per_image if gflop_per_image else float("nan")
        ratio = images_per_s / self.baseline[backbone] if backbone in self.baseline else 1.0
        row = (name, f"{images_per_s:.1f}", f"{200 / images_per_s:.1f}",
               "-" if gflop_per_image is None else f"{gflops:.0f}",
               "-" if gflop_per_image is None else f"{100 * gflops / self.bf16_peak:.0f}%",
               f"{peak_rss_gb():.1f}", "-" if backbone is None else f"{ratio:.2f}x")
        self.rows.append(row)
        print("  " + " | ".join(row), flush=True)

    def render(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def bench_seed_style(table: Table, backbone: str, images: np.ndarray, labels: np.ndarray,
                     batch: int, steps: int, gflop: float) -> None:
    set_precision("float32")
    size = images.shape[1]
    model = build_classifier(backbone, None, True, size, 2)
    compile_classifier(model, keras.optimizers.Adam(1e-4), 2)
    rng = np.random.default_rng(0)
    y = np.eye(2, dtype=np.float32)[labels]

    def step() -> None:
        index = rng.integers(0, len(images), batch)
        x = seed_style_augment(images[index].astype(np.float32), rng)
        model.train_on_batch(x, y[index])

    seconds = median_step_seconds(step, steps)
    rate = batch / seconds
    if batch == 2:
        table.baseline[backbone] = rate
    table.add(f"{backbone} seed-style fp32 batch {batch}", rate, gflop, backbone)


def bench_framework(table: Table, backbone: str, images: np.ndarray, labels: np.ndarray,
                    batch: int, steps: int, precision: str, gflop: float) -> None:
    set_precision(precision)
    size = images.shape[1]
    model = build_classifier(backbone, None, True, size, 2)
    fuse_batchnorm(model)  # trainer.fused_batchnorm=true, the framework's default
    compile_classifier(model, keras.optimizers.Adam(1e-4), 2)
    augment = StudyAugmentation(0.2, 90.0, True, True, "nearest", seed=0)
    ds = pipeline_lib.training_dataset(images, labels, 2, batch, augment, seed=0).repeat()
    timer = BatchTimer()
    model.fit(ds, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[timer])
    seconds = statistics.median(timer.seconds[1:])  # the first step traces the graph
    short = {"float32": "fp32", "mixed_bfloat16": "bf16", "mixed_float16": "fp16"}[precision]
    table.add(f"{backbone} framework {short} batch {batch}", batch / seconds, gflop, backbone)


def bench_pipeline(table: Table, images: np.ndarray, labels: np.ndarray, batch: int) -> None:
    augment = StudyAugmentation(0.2, 90.0, True, True, "nearest", seed=0)
    ds = pipeline_lib.training_dataset(images, labels, 2, batch, augment, seed=0).repeat()
    iterator = iter(ds)
    next(iterator)
    n_batches = max(8, 256 // batch)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    table.add(f"input pipeline alone (study augmentation, batch {batch})",
              n_batches * batch / (time.perf_counter() - start))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "densenet201"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row")
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="image folder (default: the shared biopsy set, else the demo)")
    parser.add_argument("--quick", action="store_true",
                        help="resnet50 only, 96 px, batch 8, 3 steps: a ~2-3 minute check")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbones, args.image_size, args.batch_sizes, args.steps = (
            ["resnet50"], 96, [8], 3)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    folder = Path(args.data)
    if not folder.is_dir():
        folder = ensure_demo_dataset(Path("/tmp/experiments-bench-demo"), 100, 256)
    images, labels = load_images(folder, args.image_size, 256)
    print(cpu_line())
    print(f"{len(images)} images from {folder} at {args.image_size} px; "
          f"TF {tf.__version__}, Keras {keras.__version__}", flush=True)
    table = Table(matmul_gflops(tf.bfloat16))
    print(f"  peak matmul: fp32 {matmul_gflops(tf.float32):.0f} GFLOP/s, "
          f"bf16 {table.bf16_peak:.0f} GFLOP/s", flush=True)
    bench_pipeline(table, images, labels, max(args.batch_sizes))
    for backbone in args.backbones:
        set_precision("float32")
        gflop = forward_gflops(build_classifier(backbone, None, True, args.image_size, 2),
                               args.image_size)
        print(f"  {backbone}: {gflop:.2f} GFLOP per forward pass", flush=True)
        for batch in sorted({2, max(args.batch_sizes)}):
            bench_seed_style(table, backbone, images, labels, batch, args.steps, gflop)
        for precision in args.precisions:
            for batch in args.batch_sizes:
                bench_framework(table, backbone, images, labels, batch, args.steps, precision,
                                gflop)
        keras.backend.clear_session()
    print("\n" + table.render())


if __name__ == "__main__":
    main()
