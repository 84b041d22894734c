"""Would a temperature fitted on the second source's own predictions calibrate it better? Reads
the finished cross-validations of a tracking store's experiment (e.g. the multiruns of
`experiment=transfer_multisource`, benchmarks/README session 23) and, per run, refits one more
temperature on the second source's out-of-fold final predictions - nested: each fold's images
scaled by the temperature the other folds' images give - and prints that source's calibration
error and accuracy before and after. No training: the runs' own test_predictions.csv.

    cd benchmarks && python source_temperature.py --tracking-uri sqlite:////abs/mlruns/mlflow.db \
        --experiment transfer_multisource --source-path breakhis
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
from machine import cpu_line, print_table  # benchmarks/ (run from there)
from mlflow.tracking import MlflowClient

from experiments.evaluation.stats import nested_temperature, reliability_bins


def second_source(path: Path, marker: str, positive: str) -> tuple[np.ndarray, ...]:
    """(probabilities (n, 2), labels, folds) of the rows whose file path contains `marker`."""
    with path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if marker in r["file"]]
    if not rows:
        raise SystemExit(f"No file with {marker!r} in its path in {path}")
    p = np.array([float(r[f"final_p_{positive}"]) for r in rows])
    labels = np.array([r["label"] == positive for r in rows], dtype=int)
    return np.stack([1 - p, p], axis=1), labels, np.array([int(r["fold"]) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="transfer_multisource")
    parser.add_argument("--source-path", default="breakhis",
                        help="a part of the second source's file paths")
    parser.add_argument("--positive", default="malignant")
    args = parser.parse_args()
    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"No experiment {args.experiment!r} in {args.tracking_uri}")
    runs = [r for r in client.search_runs([experiment.experiment_id], "attributes.status = "
                                          "'FINISHED'") if "cv_folds" in r.data.tags]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for run in sorted(runs, key=lambda r: r.info.start_time):
            path = Path(client.download_artifacts(run.info.run_id, "test_predictions.csv",
                                                  str(Path(folder) / run.info.run_id)))
            probabilities, labels, folds = second_source(path, args.source_path, args.positive)
            scaled, temperatures = nested_temperature(labels, probabilities, folds)
            params = run.data.params
            rows.append([params.get("data.sources.second.group_pattern", "?"),
                         params.get("trainer.seed", "?"),
                         f"{reliability_bins(labels, probabilities).ece:.3f}",
                         f"{reliability_bins(labels, scaled).ece:.3f}",
                         f"{np.mean(probabilities.argmax(1) == labels):.3f}",
                         f"{np.mean(scaled.argmax(1) == labels):.3f}",
                         " ".join(f"{t:.2f}" for t in temperatures)])
    print(cpu_line())
    print_table(["group pattern", "seed", "ECE as run", "ECE, own temperature",
                 "accuracy as run", "accuracy, own temperature", "fold temperatures"], rows)


if __name__ == "__main__":
    main()
