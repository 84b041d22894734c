"""Which of a cascade's models should fit a temperature? Two sets of finished
`experiment=transfer_multisource` cross-validations (e.g. before and after a change of
`eval.temperature_scaling` / `cv.home_temperature`), paired by seed - the same partition of the
patients - from their tracking stores; no training.

    cd benchmarks && python cascade_calibration.py \
        --before sqlite:////tmp/a/mlruns/mlflow.db --after sqlite:////tmp/b/mlruns/mlflow.db

Table 1: per parent metric, each set's mean (min-max) over the seeds both hold and the paired
difference (after - before: mean, seeds ahead / level / behind). `fallback_*shipped_ece` is
the all-source model's calibration as shipped (one temperature, nested over folds), which is
what answers images unlike the home ones; `test_source_*_ece` takes each fold's models at their
own temperatures.
Table 2: the home model on the home images as shipped: its folds' out-of-fold test
predictions (`fold k home` runs) at each fold's own temperature, at one temperature fitted on
the other folds' (nested: what the home refit ships) and with none. The runs log final
probabilities (after TTA and temperature, 6 decimals); the raw ones are recovered by undoing
the fold's temperature (p ** T, renormalised; clipped at 1e-7).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
from machine import cpu_line, paired, print_table, spread  # benchmarks/ (run from there)
from mlflow.tracking import MlflowClient

from experiments.evaluation.stats import nested_temperature, reliability_bins
from experiments.serving.inference import apply_temperature

METRICS = ("test_source_second_accuracy", "test_source_second_roc_auc",
           "test_source_second_patient_accuracy", "test_source_second_patient_roc_auc",
           "test_source_second_ece", "fallback_test_source_second_shipped_ece",
           "test_source_main_accuracy", "test_source_main_roc_auc", "test_source_main_ece",
           "fallback_test_source_main_shipped_ece", "model_temperature",
           "fallback_model_temperature")


def parents(uris: str) -> dict[int, tuple[MlflowClient, object]]:
    """seed -> (client, run) of every finished cascade cross-validation parent in the stores
    (comma-separated tracking URIs; a later store's seed replaces an earlier one's)."""
    found: dict[int, tuple[MlflowClient, object]] = {}
    for uri in uris.split(","):
        client = MlflowClient(uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        for run in client.search_runs(ids, "attributes.status = 'FINISHED' and "
                                      "tags.model_kind = 'cv_cascade'", max_results=10000):
            found[int(run.data.params["trainer.seed"])] = (client, run)
    return found


def home_eces(client: MlflowClient, parent_id: str, folder: Path) -> tuple[float, float, float]:
    """The home model's ECE on the home images out of fold: at the folds' own temperatures,
    at one nested temperature (as shipped) and at none."""
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              f"tags.cv_parent = '{parent_id}' and tags.cv_model = 'home'")
    labels, raw, scaled, fold_of = [], [], [], []
    for run in runs:
        path = client.download_artifacts(run.info.run_id, "test_predictions.csv",
                                         str(folder / run.info.run_id))
        with open(path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["source"] == "main"]
        final = np.clip([[float(r["final_p_benign"]), float(r["final_p_malignant"])]
                         for r in rows], 1e-7, 1.0)
        scaled.append(final / final.sum(axis=1, keepdims=True))
        raw.append(apply_temperature(final, 1 / run.data.metrics.get("temperature", 1.0)))
        labels += [int(r["label"] == "malignant") for r in rows]
        fold_of += [int(run.data.tags["cv_fold"])] * len(rows)
    y, p = np.array(labels), np.concatenate(raw)
    nested, _ = nested_temperature(y, p, np.array(fold_of))
    return tuple(reliability_bins(y, q).ece for q in (np.concatenate(scaled), nested, p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="tracking URI(s), comma-separated")
    parser.add_argument("--after", required=True, help="tracking URI(s), comma-separated")
    args = parser.parse_args()
    before, after = parents(args.before), parents(args.after)
    seeds = sorted(set(before) & set(after))
    if not seeds:
        raise SystemExit("No seed has a finished cascade cross-validation in both sets")
    print(cpu_line())
    print(f"seeds {seeds}")
    rows = []
    for name in METRICS:
        if not all(name in runs[s][1].data.metrics for runs in (before, after) for s in seeds):
            continue
        a, b = (np.array([runs[s][1].data.metrics[name] for s in seeds])
                for runs in (before, after))
        rows.append((name, spread(a), spread(b), paired(b - a)))
    print_table(("metric", "before", "after", "after - before (ahead/level/behind)"), rows)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, runs in (("before", before), ("after", after)):
            values = np.array([home_eces(runs[s][0], runs[s][1].info.run_id, Path(folder))
                               for s in seeds])
            rows.append((label, *(spread(values[:, k]) for k in range(3))))
    print_table(("home model on the home images", "ECE, fold temperatures",
                 "ECE, one temperature (nested)", "ECE, none"), rows)


if __name__ == "__main__":
    main()
