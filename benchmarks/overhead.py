"""Framework overhead: the same 2-epoch training through `python -m experiments.run` and as a
bare Keras script, each in a fresh process, wall time of each and the ratio.

    python benchmarks/overhead.py                  # resnet50, 96 px, the shared biopsy images
    python benchmarks/overhead.py --backbone simplecnn --image-size 64 --repeats 3

The framework run also composes the config, checks every image, logs params, per-epoch
metrics, figures, tables, the checkpoint and an MLflow model; the bare script decodes the
images, splits them the same way, fits with a best-only ModelCheckpoint and evaluates the best
checkpoint once. Both use float32, the same model, batch size and augmentation-free pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "biopsy-seed" / "train"

BARE = textwrap.dedent("""
    import sys
    import keras, numpy as np
    from PIL import Image
    from pathlib import Path
    from sklearn.model_selection import train_test_split
    from experiments.model import build_classifier

    root, size, epochs, batch, backbone, out = sys.argv[1:7]
    size, epochs, batch = int(size), int(epochs), int(batch)
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((Path(root) / c).iterdir())]
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size)), np.float32)
                  for f, _ in files])
    y = np.eye(len(classes), dtype=np.float32)[[i for _, i in files]]
    labels = y.argmax(1)
    rest, test = train_test_split(np.arange(len(x)), test_size=0.2, stratify=labels,
                                  random_state=42)
    train, val = train_test_split(rest, test_size=0.25, stratify=labels[rest], random_state=42)
    keras.utils.set_random_seed(42)
    model = build_classifier(backbone, None, True, size, len(classes), 0.9)
    model.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy", metrics=["accuracy"])
    best = out + "/best.keras"
    model.fit(x[train], y[train], batch_size=batch, epochs=epochs, verbose=0,
              validation_data=(x[val], y[val]),
              callbacks=[keras.callbacks.ModelCheckpoint(best, monitor="val_accuracy",
                                                         mode="max", save_best_only=True)])
    print(keras.saving.load_model(best).evaluate(x[test], y[test], verbose=0))
""")


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"{data} not found: pass --data with a class-folder image set")
    framework, bare = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            framework.append(timed([
                sys.executable, "-m", "experiments.run", f"backbone={args.backbone}",
                "backbone.weights=null", "backbone.bn_momentum=0.9", "augmentation=none",
                f"data.root={data}", f"data.image_size={args.image_size}",
                f"trainer.epochs={args.epochs}", f"trainer.batch_size={args.batch_size}",
                "trainer.precision=float32", "trainer.verbose=0", f"paths.root={work}"], work))
            bare.append(timed([sys.executable, "-c", BARE, str(data), str(args.image_size),
                               str(args.epochs), str(args.batch_size), args.backbone,
                               str(work)], work))
    f, b = statistics.median(framework), statistics.median(bare)
    print("| run | wall time (s) |\n|---|---|")
    print(f"| python -m experiments.run | {f:.1f} |\n| bare Keras script | {b:.1f} |")
    print(f"| ratio | {f / b:.2f}x |")


if __name__ == "__main__":
    main()
