"""Frozen-feature extraction throughput per backbone, against the CPU's matmul peak.

    python benchmarks/extraction.py                       # DenseNet121/201, ResNet50, a ViT-S/14
    python benchmarks/extraction.py --backbones densenet121 --batch-sizes 32 --repeats 3

What `finetune=frozen|linear_probe` spends its time on: the pooled features of every image
(and dihedral view), `experiments.models.features.compute_features` on the classifier's
feature model (preprocessing layer -> backbone -> pooling), fused BatchNorm as runs use it.
Rows: backbone x precision (float32; Keras mixed_bfloat16; float32 with oneDNN's implicit bf16
math, ONEDNN_DEFAULT_FPMATH_MODE=BF16, in a fresh process) x batch size. Columns: images/s
(median of `--repeats` passes over `--images` images after a warm-up pass), achieved GFLOP/s
(forward FLOPs per image counted by TF's profiler), that as a share of the measured bfloat16
and float32 4096x4096 matmul peaks, and peak resident memory. Weights are random (the speed
does not depend on their values); the ViT is KerasHub's DINOv2 ViT-S/14 architecture at 224
px (keras-hub needed; skipped without it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_line, print_row, print_table  # benchmarks/ (run from there)

PRECISIONS = ("float32", "mixed_bfloat16", "fpmath_bf16")


def vit_small_preset(folder: Path) -> Path:
    """A randomly initialised DINOv2 ViT-S/14 (KerasHub) saved as a preset folder."""
    import keras_hub

    if not (folder / "config.json").is_file():
        keras_hub.models.DINOV2Backbone(
            patch_size=14, num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536,
            num_register_tokens=0, image_shape=(224, 224, 3),
            position_embedding_shape=(518, 518, 3)).save_to_preset(str(folder))
        keras_hub.layers.DINOV2ImageConverter(
            image_size=(224, 224), scale=1 / 255, offset=0.0).save_to_preset(str(folder))
    return folder


def measure(backbone: str, precision: str, batch: int, images: int, repeats: int,
            size: int, preset: str | None) -> dict[str, float]:
    """One row, in this process (the caller starts a fresh one per precision)."""
    import keras
    import numpy as np
    from throughput import forward_gflops, peak_rss_gb

    from experiments.models import features
    from experiments.models.classifier import build_classifier
    from experiments.models.fused_bn import fuse_batchnorm

    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if precision == "mixed_bfloat16" else "float32")
    name, weights = (("keras_hub", preset) if backbone == "vit_s14" else (backbone, None))
    classifier = build_classifier(name, weights, False, size, 2)
    fuse_batchnorm(classifier)
    extractor = features.feature_model(classifier)
    pixels = np.random.default_rng(0).integers(0, 256, (images, size, size, 3), np.uint8)
    features.compute_features(extractor, pixels[:batch], 1, batch)  # trace, warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        features.compute_features(extractor, pixels, 1, batch)
        times.append(time.perf_counter() - start)
    return {"images_per_s": images / statistics.median(times),
            "gflop_per_image": forward_gflops(extractor, size), "rss_gb": peak_rss_gb()}


def peaks() -> dict[str, float]:
    import tensorflow as tf
    from throughput import matmul_gflops

    return {"bf16": matmul_gflops(tf.bfloat16), "fp32": matmul_gflops(tf.float32)}


def in_fresh_process(call: str, precision: str = "float32") -> dict[str, float]:
    """Run `call` (a Python expression over this module) in a new interpreter: thread pools
    and oneDNN's math mode are read at start-up."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if precision == "fpmath_bf16":
        env["ONEDNN_DEFAULT_FPMATH_MODE"] = "BF16"
    code = f"import json, extraction; print('RESULT', json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+",
                        default=["densenet121", "densenet201", "resnet50", "vit_s14"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--preset-dir", type=Path, default=Path("/tmp/extraction_vit_s14"))
    args = parser.parse_args(argv)
    print(cpu_line(), flush=True)
    peak = in_fresh_process("extraction.peaks()")
    print(f"matmul peak (4096^2): bfloat16 {peak['bf16']:.0f} GFLOP/s, float32 "
          f"{peak['fp32']:.0f} GFLOP/s", flush=True)
    header = ("backbone", "precision", "batch", "img/s", "GFLOP/img", "GFLOP/s",
              "% bf16 peak", "% fp32 peak", "peak RSS GB")
    rows = []
    for backbone in args.backbones:
        preset = None
        if backbone == "vit_s14":
            try:
                preset = str(vit_small_preset(args.preset_dir))
            except ImportError:
                print("vit_s14 skipped: keras-hub is not installed", flush=True)
                continue
        for precision in args.precisions:
            for batch in args.batch_sizes:
                r = in_fresh_process(
                    f"extraction.measure({backbone!r}, {precision!r}, {batch}, {args.images}, "
                    f"{args.repeats}, {args.size}, {preset!r})", precision)
                gflops = r["images_per_s"] * r["gflop_per_image"]
                row = (backbone, precision, str(batch), f"{r['images_per_s']:.1f}",
                       f"{r['gflop_per_image']:.2f}", f"{gflops:.0f}",
                       f"{100 * gflops / peak['bf16']:.0f}%",
                       f"{100 * gflops / peak['fp32']:.0f}%", f"{r['rss_gb']:.1f}")
                rows.append(row)
                print_row(row)
    print_table(header, rows)


if __name__ == "__main__":
    main()
