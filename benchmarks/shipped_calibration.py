"""Does a cross-validation's per-source calibration error describe the model it ships? Reads
the finished cross-validations (not cascades) of a tracking store's experiment and, per run and
source, prints the ECE as the run logs it (each fold's predictions at that fold's own
temperature) beside the ECE of the shipped operating point: one temperature fitted on the
pooled raw out-of-fold predictions (val_predictions.csv, what the refit's temperature is
fitted on), nested - each fold's images scaled by what the other folds' give. No training;
needs runs whose tables carry a `source` column (2026-12-02 on).

    cd benchmarks && python shipped_calibration.py --tracking-uri sqlite:////abs/mlruns/mlflow.db \
        --experiment transfer_multisource
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
from experiments.evaluation.tables import read_predictions


def folds_of(path: Path) -> dict[str, int]:
    """file -> the fold that held it out, from a parent's test_predictions.csv (one repeat)."""
    with path.open(newline="") as handle:
        return {r["file"]: int(r["fold"]) for r in csv.DictReader(handle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="transfer_multisource")
    parser.add_argument("--classes", default="benign,malignant")
    args = parser.parse_args()
    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"No experiment {args.experiment!r} in {args.tracking_uri}")
    runs = [r for r in client.search_runs([experiment.experiment_id], "attributes.status = "
                                          "'FINISHED'")
            if "cv_folds" in r.data.tags and r.data.params.get("cv.cascade") != "True"]
    classes = tuple(args.classes.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for run in sorted(runs, key=lambda r: r.info.start_time):
            target = str(Path(folder) / run.info.run_id)
            raw = read_predictions(Path(client.download_artifacts(
                run.info.run_id, "val_predictions.csv", target)), classes)
            fold_of = folds_of(Path(client.download_artifacts(
                run.info.run_id, "test_predictions.csv", target)))
            if raw.sources is None:
                raise SystemExit(f"Run {run.info.run_id}'s tables have no source column")
            folds = np.array([fold_of[f] for f in raw.files])
            scaled, temperatures = nested_temperature(raw.labels, raw.probabilities, folds)
            for source in sorted(set(raw.sources)):
                part = np.asarray(raw.sources) == source
                rows.append([run.data.params.get("trainer.seed", "?"), source,
                             f"{run.data.metrics[f'test_source_{source}_ece']:.3f}",
                             f"{reliability_bins(raw.labels[part], scaled[part]).ece:.3f}",
                             f"{run.data.metrics['model_temperature']:.2f}",
                             " ".join(f"{t:.2f}" for t in temperatures)])
    print(cpu_line())
    print_table(["seed", "source", "ECE as logged (fold temperatures)",
                 "ECE, shipped temperature (nested)", "shipped temperature",
                 "nested temperatures"], rows)


if __name__ == "__main__":
    main()
