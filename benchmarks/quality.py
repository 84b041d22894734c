"""Which recipe classifies best? K-fold cross-validation of several configurations on one
folder, pooled out-of-fold metrics with bootstrap 95% intervals, and the time each took.

    python benchmarks/quality.py                      # the default configurations, 5 folds
    python benchmarks/quality.py --config "hed=augmentation=hed" \\
        --config "strong=augmentation=histology_strong trainer.epochs=80" --folds 5
    python benchmarks/quality.py --quick              # 2 folds, 2 epochs: checks the script

Each configuration is `name=overrides` (space-separated Hydra overrides) on top of
`experiment=histology_cpu`; each runs as `python -m experiments.run` in its own process, into one
MLflow store (default: benchmarks/.quality/mlruns, experiment "quality"), so the folds can be
inspected in the MLflow UI afterwards. Prints a Markdown table and writes it beside the store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "biopsy-seed" / "train"
DEFAULT_CONFIGS = [
    "dihedral+colour=augmentation=histology",
    "dihedral+HED=augmentation=hed",
    "strong (crop, HED, colour, blur)=augmentation=histology_strong",
]
QUICK = ["trainer.epochs=2", "eval.bootstrap_resamples=200", "eval.gradcam_images=0"]


def run_config(name: str, overrides: list[str], data: Path, folds: int, root: Path,
               experiment: str) -> tuple[float, int]:
    """Run one cross-validation; returns (wall seconds, exit code)."""
    args = [sys.executable, "-m", "experiments.run", "experiment=histology_cpu",
            f"data.root={data}", f"cv.folds={folds}", f"paths.root={root}",
            f"mlflow.experiment_name={experiment}", f"mlflow.run_name='{name}'",
            "trainer.verbose=0", *overrides]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(root / "quality.log", "a") as log:
        log.write(f"\n### {name}: {' '.join(args[3:])}\n")
        log.flush()
        code = subprocess.call(args, cwd=HERE.parent, env=env, stdout=log, stderr=log)
    return time.perf_counter() - start, code


def interval(metrics: dict[str, float], key: str) -> str:
    if key not in metrics:
        return "-"
    return (f"{metrics[key]:.3f} [{metrics[f'{key}_ci_low']:.2f}, "
            f"{metrics[f'{key}_ci_high']:.2f}]")


def table(client: MlflowClient, experiment: str, timings: dict[str, tuple[float, int]],
          folds: int) -> str:
    exp = client.get_experiment_by_name(experiment)
    parents = {} if exp is None else {
        run.info.run_name: run for run in client.search_runs(
            [exp.experiment_id], "tags.cv_folds != ''", max_results=1000)}
    lines = ["| config | folds | OOF accuracy [95% CI] | OOF ROC-AUC [95% CI] | "
             "sensitivity at val threshold [95% CI] | specificity at val threshold | "
             "accuracy with TTA | mean best epoch | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (seconds, code) in timings.items():
        run = parents.get(f"{name} cv{folds}")  # the parent run's name
        if run is None or code != 0:
            lines.append(f"| {name} | failed (exit {code}, see quality.log) |||||||"
                         f" {seconds / 60:.1f} |")
            continue
        m = run.data.metrics
        lines.append(
            f"| {name} | {run.data.tags['cv_folds']} | {interval(m, 'test_accuracy')} | "
            f"{interval(m, 'test_roc_auc')} | {interval(m, 'test_op_sensitivity')} | "
            f"{interval(m, 'test_op_specificity')} | {interval(m, 'test_tta_accuracy')} | "
            f"{m.get('best_epoch', float('nan')):.1f} | {seconds / 60:.1f} |")
    return "\n".join(lines)


def parse_config(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--config must be name=overrides. Received: {text!r}")
    return name.strip(), overrides.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--config", action="append", default=None,
                        help="name=overrides (repeatable); default: " + "; ".join(DEFAULT_CONFIGS))
    parser.add_argument("--root", type=Path, default=HERE / ".quality",
                        help="where the MLflow store, outputs and log go")
    parser.add_argument("--experiment", default="quality")
    parser.add_argument("--quick", action="store_true", help="2 folds, 2 epochs (a smoke run)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"--data folder not found: {args.data}")
    configs = [parse_config(c) for c in (args.config or DEFAULT_CONFIGS)]
    folds = 2 if args.quick else args.folds
    args.root.mkdir(parents=True, exist_ok=True)
    timings = {}
    for name, overrides in configs:
        print(f"{name}: {folds}-fold cross-validation ...", flush=True)
        timings[name] = run_config(name, [*overrides, *(QUICK if args.quick else [])],
                                   args.data.resolve(), folds, args.root.resolve(),
                                   args.experiment)
        print(f"  {timings[name][0] / 60:.1f} min, exit {timings[name][1]}", flush=True)
    client = MlflowClient(f"sqlite:///{args.root.resolve()}/mlruns/mlflow.db")
    text = table(client, args.experiment, timings, folds)
    (args.root / "quality.md").write_text(text + "\n")
    print(f"\n{folds}-fold cross-validation on {args.data}\n\n{text}")


if __name__ == "__main__":
    main()
