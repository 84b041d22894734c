"""What a seed of `experiment=transfer_multisource` costs, with and without its cascade
(`cv.cascade`), and where the time goes: one multirun over `cv.cascade=true,false,true` on the
two shared sources - the first job fills the feature cache (cold), the other two read it, so
their times compare the cascade's cost on cached features in one run.

    cd benchmarks && python multisource_time.py \
        --weights ../../shared/data/weights/densenet121_imagenet_notop.weights.h5

Columns: the parent's wall time (MLflow start to end), the sum of its fold runs' and of its
home-fold runs' phases (`seconds_<phase>`: training, evaluation, referral, model logging), its
refits, and the cascade's share of same-source images answered by the home model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from machine import cpu_line, print_table
from mlflow.tracking import MlflowClient

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PATIENT = "SOB_[BM]_([^-]+-\\d+-[^-]+)-"
PHASES = ("train", "evaluate", "ood", "log_model")


def run_jobs(root: Path, weights: Path, seed: int, cache: Path) -> None:
    subprocess.run([sys.executable, "-m", "experiments.run", "-m",
                    "experiment=transfer_multisource",
                    f"data.root={SHARED / 'biopsy-seed' / 'train'}",
                    f"data.sources.second.root={SHARED / 'breakhis-100x'}",
                    f'data.sources.second.group_pattern="{PATIENT}"',
                    f"backbone.weights={weights}", f"paths.root={root}",
                    f"paths.cache_dir={cache}", f"trainer.seed={seed}",
                    "cv.cascade=true,false,true"], check=True, capture_output=True)


def rows_of(root: Path) -> list[list[str]]:
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer_multisource")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"],
                              max_results=1000)
    parents = [r for r in runs if r.data.tags.get("cv_folds")]
    rows = []
    for label, parent in zip(("cascade, cold cache", "no cascade", "cascade"), parents,
                             strict=True):
        children = [r for r in runs if r.data.tags.get("cv_parent") == parent.info.run_id]
        phases: dict[str, float] = defaultdict(float)
        for child in children:
            kind = "refit" if "cv_refit" in child.data.tags else child.data.tags.get(
                "cv_model", "fold")
            if kind == "refit":
                phases["refit"] += (child.info.end_time - child.info.start_time) / 1000
                continue
            for phase in PHASES:
                phases[f"{kind} {phase}"] += child.data.metrics.get(f"seconds_{phase}", 0.0)
        wall = (parent.info.end_time - parent.info.start_time) / 1000
        home = parent.data.metrics.get("test_source_main_answered_by_first")
        rows.append([label, f"{wall:.0f}",
                     *(f"{phases[f'fold {p}']:.1f}" for p in PHASES),
                     *(f"{phases[f'home {p}']:.1f}" for p in PHASES),
                     f"{phases['refit']:.1f}", "-" if home is None else f"{home:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True,
                        help="DenseNet121 ImageNet weights (no top), e.g. the shared file")
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="multisource-time-") as folder:
        root = Path(folder)
        run_jobs(root, args.weights.resolve(), args.seed, root / "cache")
        rows = rows_of(root)
    print(cpu_line())
    print(f"experiment=transfer_multisource, seed {args.seed}: seconds")
    print_table(["job", "parent wall", *(f"folds: {p}" for p in PHASES),
                 *(f"home folds: {p}" for p in PHASES), "refits", "seed images answered "
                 "by the home model"], rows)


if __name__ == "__main__":
    main()
