"""Where a bf16 training step's time goes on this CPU, and which knobs move it.

    python benchmarks/bf16_step.py                      # ResNet50 and DenseNet201, 224 px
    python benchmarks/bf16_step.py --backbones resnet50 --steps 4 --quick

Part 1, profile: one process per backbone runs training steps (the framework's model, Adam,
binary cross-entropy) with ONEDNN_VERBOSE=1; oneDNN prints every primitive it executes with its
time, which is summed by kind (convolution, batch normalisation, element-wise, reorders,
matmul, pooling, binary ops) over the measured steps. The rest of the step time is TensorFlow's
own kernels (casts, the optimizer update, loss, data movement) and framework overhead.
Part 2, options: img/s of the same step under each setting, each in a fresh process (thread
counts and oneDNN modes are read at start-up): the dtype policy (float32, Keras
mixed_bfloat16, float32 with oneDNN's implicit bf16 math), batch size, thread settings.
Prints the CPU (model, bf16/AMX flags) above the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from collections import defaultdict

from machine import cpu_line  # benchmarks/machine.py (scripts run from this folder)

STEP = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    import keras, tensorflow as tf
    from experiments.models.classifier import build_classifier, compile_classifier
    from experiments.training.runtime import set_precision

    backbone, size, batch, steps, policy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5]
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        intra, inter = (int(t) for t in threads.split(","))
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    set_precision(policy)
    model = build_classifier(backbone, None, True, size, 2, 0.9)
    if os.environ.get("BENCH_FUSED_BN") == "1":
        from experiments.models.fused_bn import fuse_batchnorm
        fuse_batchnorm(model)
    compile_classifier(model, keras.optimizers.Adam(1e-4), 2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[rng.integers(0, 2, batch)]
    for _ in range(2):  # tracing and warm-up
        model.train_on_batch(x, y)
    times = []
    print("@@BEGIN", flush=True)
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    print("@@END", flush=True)
    print("@@RESULT " + json.dumps({"times": times}), flush=True)
""")

KINDS = {"convolution": "convolution", "deconvolution": "convolution", "gemm_api": "matmul",
         "batch_normalization": "batch norm", "eltwise": "element-wise",
         "reorder": "reorder (layout, dtype)", "inner_product": "matmul", "matmul": "matmul",
         "pooling": "pooling", "binary": "binary (add, mul)", "sum": "binary (add, mul)",
         "concat": "concat", "softmax": "softmax", "shuffle": "other", "layer_normalization":
         "other", "resampling": "other", "prelu": "element-wise", "reduction": "other"}


def run_step(backbone: str, size: int, batch: int, steps: int, policy: str,
             env: dict[str, str]) -> tuple[list[float], str]:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    result = subprocess.run([sys.executable, "-c", STEP, backbone, str(size), str(batch),
                             str(steps), policy], capture_output=True, text=True, env=full_env,
                            timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    line = next(x for x in result.stdout.splitlines() if x.startswith("@@RESULT "))
    return json.loads(line.removeprefix("@@RESULT "))["times"], result.stdout


def onednn_breakdown(stdout: str, steps: int) -> dict[str, float]:
    """Seconds per step by primitive kind, from ONEDNN_VERBOSE lines between the markers."""
    inside, totals = False, defaultdict(float)
    for line in stdout.splitlines():
        if line.startswith("@@BEGIN"):
            inside = True
        elif line.startswith("@@END"):
            inside = False
        elif inside and line.startswith("onednn_verbose") and ",exec," in line:
            fields = line.split(",")
            kind = next((KINDS[f] for f in fields if f in KINDS), "other")
            match = re.search(r",([0-9.]+)$", line.strip())
            if match:
                totals[kind] += float(match.group(1)) / 1000
    return {k: v / steps for k, v in totals.items()}


def profile(backbones: list[str], size: int, batch: int, steps: int, policy: str) -> None:
    print(f"\n### Where a {policy} training step goes ({size} px, batch {batch}, "
          f"median of {steps} steps; oneDNN's own timing)\n")
    rows = []
    for backbone in backbones:
        for name, env in (("Keras BatchNorm", {}), ("fused BatchNorm", FUSED)):
            times, stdout = run_step(backbone, size, batch, steps, policy,
                                     {"ONEDNN_VERBOSE": "1", **env})
            step = sorted(times)[len(times) // 2]
            parts = onednn_breakdown(stdout, steps)
            rows.append((f"{backbone}, {name}", step, parts))
    kinds = sorted({k for _, _, parts in rows for k in parts},
                   key=lambda k: -sum(p.get(k, 0) for _, _, p in rows))
    print("| backbone | step (s) | " + " | ".join(kinds) + " | outside oneDNN |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for backbone, step, parts in rows:
        inside = sum(parts.values())
        cells = [f"{parts.get(k, 0):.3f} ({100 * parts.get(k, 0) / step:.0f}%)" for k in kinds]
        print(f"| {backbone} | {step:.3f} | " + " | ".join(cells)
              + f" | {max(step - inside, 0):.3f} ({100 * max(step - inside, 0) / step:.0f}%) |")
    print("\n(ONEDNN_VERBOSE itself slows each primitive a little; shares are what matter.)")


FUSED = {"BENCH_FUSED_BN": "1"}
OPTIONS = [
    ("float32, batch 2 (the notebook's step)", "float32", 2, {}),
    ("float32", "float32", 8, {}),
    ("Keras mixed_bfloat16", "mixed_bfloat16", 8, {}),
    ("float32 + oneDNN implicit bf16 math", "float32", 8, {"TF_SET_ONEDNN_FPMATH_MODE": "BF16"}),
    ("float32 + fused BatchNorm", "float32", 8, FUSED),
    ("mixed_bfloat16 + fused BatchNorm (the framework here)", "mixed_bfloat16", 8, FUSED),
    ("mixed_bfloat16 + fused BatchNorm, batch 16", "mixed_bfloat16", 16, FUSED),
    ("mixed_bfloat16 + fused BatchNorm, batch 32", "mixed_bfloat16", 32, FUSED),
    ("mixed_bfloat16 + fused BatchNorm, intra 2 / inter 1 threads", "mixed_bfloat16", 8,
     {**FUSED, "BENCH_THREADS": "2,1"}),
    ("mixed_bfloat16 + fused BatchNorm, oneDNN off (Eigen kernels)", "mixed_bfloat16", 8,
     {**FUSED, "TF_ENABLE_ONEDNN_OPTS": "0"}),
]


def options(backbones: list[str], size: int, steps: int, quick: bool) -> None:
    print(f"\n### Settings ({size} px; img/s of the median step, and x the notebook's step: "
          "float32, batch 2, Keras BatchNorm; each setting in a fresh process)\n")
    print("| setting | " + " | ".join(backbones) + " |\n|---|" + "---|" * len(backbones))
    chosen = [OPTIONS[0], OPTIONS[2], OPTIONS[5]] if quick else OPTIONS
    reference: dict[str, float] = {}
    for name, policy, batch, env in chosen:
        cells = []
        for backbone in backbones:
            try:
                times, _ = run_step(backbone, size, batch, steps, policy, env)
            except RuntimeError as error:
                cells.append(f"failed ({str(error).splitlines()[-1][:60]})")
                continue
            rate = batch / sorted(times)[len(times) // 2]
            reference.setdefault(backbone, rate)
            cells.append(f"{rate:.1f} ({rate / reference[backbone]:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "densenet201"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="three settings only")
    parser.add_argument("--skip-profile", action="store_true")
    args = parser.parse_args()
    print(cpu_line())
    if not args.skip_profile:
        profile(args.backbones, args.image_size, args.batch_size, args.steps, "mixed_bfloat16")
    options(args.backbones, args.image_size, args.steps, args.quick)


if __name__ == "__main__":
    main()
