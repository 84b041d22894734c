"""data.cache=memory | disk | none on the same training: first epoch, later epochs, peak memory.

    python benchmarks/data_cache.py                     # the study's 200 images, 224 px
    python benchmarks/data_cache.py --image-size 96 --epochs 4

Each mode runs `python -m experiments.run` in a fresh process (simplecnn from scratch, so the
input side weighs as much as it can; dihedral augmentation), in one folder whose cache the disk
mode fills on its first run and reads on the second. Columns: wall time, the first and later
epochs' seconds (from the run's `epoch_seconds`), and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from mlflow.tracking import MlflowClient

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "biopsy-seed" / "train"

MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    code = subprocess.call(sys.argv[1:])
    print(json.dumps({"code": code, "wall": time.perf_counter() - start,
                      "rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6}))
""")


def run(mode: str, data: Path, work: Path, size: int, epochs: int, name: str) -> dict:
    command = [sys.executable, "-m", "experiments.run", "backbone=simplecnn",
               "backbone.weights=null", "augmentation=dihedral", f"data.root={data}",
               f"data.image_size={size}", f"data.cache={mode}", f"trainer.epochs={epochs}",
               "trainer.verbose=0", "eval.gradcam_images=0", f"paths.root={work}",
               f"mlflow.run_name={name}"]
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], cwd=work,
                            capture_output=True, text=True,
                            env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"})
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["code"] != 0:
        raise RuntimeError(f"{mode} failed:\n{result.stderr[-2000:]}")
    client = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("biopsy").experiment_id],
                                  f"attributes.run_name = '{name}'")
    epochs_s = [m.value for m in sorted(client.get_metric_history(found.info.run_id,
                                                                  "epoch_seconds"),
                                        key=lambda m: m.step)]
    return {**measured, "first": epochs_s[0],
            "later": sum(epochs_s[1:]) / max(1, len(epochs_s) - 1),
            "load": found.data.metrics.get("seconds_load_data", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from overhead import cpu_line

    print(cpu_line())
    print(f"simplecnn, {args.image_size} px, {args.epochs} epochs, {args.data}\n")
    print("| data.cache | wall (s) | loading and checking images (s) | first epoch (s) | "
          "later epochs (s) | peak RSS (GB) |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for label, mode in (("memory", "memory"), ("disk (first run: writes the cache)", "disk"),
                            ("disk (next run: reads it)", "disk"), ("none", "none")):
            r = run(mode, args.data.resolve(), work, args.image_size, args.epochs,
                    label.split()[0] + str(len(label)))
            print(f"| {label} | {r['wall']:.1f} | {r['load']:.2f} | {r['first']:.2f} | "
                  f"{r['later']:.2f} | {r['rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
