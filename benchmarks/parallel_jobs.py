"""Two jobs on one machine: a 2-job joblib sweep against the same two jobs one after the other.

    python benchmarks/parallel_jobs.py                 # simplecnn, 96 px, the study's images

Rows: the jobs one after the other (each with every core); a joblib sweep with n_jobs=2 and the
default thread budget (each job gets half the cores); the same sweep with every job taking every
core (trainer.threads=<cores>: what happened before the budget). Wall times of the whole
command; the ratio is against the sequential row.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "biopsy-seed" / "train"


def timed(args: list[str], work: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=work,
                            capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import cpu_line

    from experiments.training.runtime import usable_cores  # what thread_budget divides

    cores = usable_cores()
    job = ["backbone=simplecnn", "backbone.weights=null", "augmentation=dihedral",
           f"data.root={args.data.resolve()}", "data.image_size=96",
           f"trainer.epochs={args.epochs}", "trainer.verbose=0", "eval.gradcam_images=0"]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        root = [f"paths.root={work}"]
        sequential = sum(timed([*job, *root, f"trainer.seed={seed}"], work) for seed in (1, 2))
        budget = timed(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *job, *root,
                        "trainer.seed=1,2"], work)
        oversubscribed = timed(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *job,
                                *root, "trainer.seed=1,2", f"trainer.threads={cores}"], work)
    print(cpu_line())
    print(f"2 jobs: simplecnn, 96 px, {args.epochs} epochs each, {cores} cores\n")
    print("| how | wall (s) | x sequential |\n|---|---|---|")
    for name, seconds in (("one after the other (each all cores)", sequential),
                          ("joblib n_jobs=2, thread budget (default)", budget),
                          (f"joblib n_jobs=2, every job {cores} threads", oversubscribed)):
        print(f"| {name} | {seconds:.1f} | {sequential / seconds:.2f}x |")


if __name__ == "__main__":
    main()
