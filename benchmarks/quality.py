"""Which recipe classifies best? Cross-validation of several configurations on one folder,
and, with --outer, a held-out estimate of what the run's model does on images it never saw.

    python benchmarks/quality.py                      # the default configurations, 2 x 5 folds
    python benchmarks/quality.py --config "hed=augmentation=hed" \\
        --config "strong=augmentation=histology_strong trainer.epochs=80" --folds 5 --repeats 2
    python benchmarks/quality.py --outer 5 --config "refit=cv.refit=true"   # nested
    python benchmarks/quality.py --quick              # 2 folds, 2 epochs: checks the script

Each configuration is `name=overrides` (space-separated Hydra overrides) on top of
`experiment=histology_cpu`; each runs as `python -m experiments.run` in its own process, into one
MLflow store (default: benchmarks/.quality/mlruns, experiment "quality"), so the folds can be
inspected in the MLflow UI afterwards.

Cross-validation mode (default): a K-fold x R-repeat cross-validation per configuration; the table
gives the pooled out-of-fold metrics with bootstrap 95% intervals (mean over repeats), the spread
of accuracy over repeats, sensitivity/specificity at each fold's validation threshold, TTA
accuracy, the mean best epoch and the wall time.

Nested mode (--outer M): the images are split into M stratified outer folds; for each, the
configuration's whole cross-validation runs on the other images (symlinked into a folder of
their own) and its logged model - the fold ensemble, or the refit with cv.refit=true - predicts
the held-out outer fold through `experiments.predict`'s code path (TTA, temperature, threshold).
The table compares, on the same held-out images: that model, the mean fold model alone (what
one run gives), the average of the fold models' probabilities, and the inner cross-validation's
own estimate. Prints a Markdown table and writes it beside the store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "biopsy-seed" / "train"
DEFAULT_CONFIGS = [
    "histology_cpu=",
    "dihedral+colour=augmentation=histology",
]
QUICK = ["trainer.epochs=2", "eval.bootstrap_resamples=200", "eval.gradcam_images=0"]
EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def run_config(name: str, overrides: list[str], data: Path, root: Path,
               experiment: str) -> tuple[float, int]:
    """Run one cross-validation; returns (wall seconds, exit code)."""
    args = [sys.executable, "-m", "experiments.run", "experiment=histology_cpu",
            f"data.root={data}", f"paths.root={root}", f"mlflow.experiment_name={experiment}",
            f"mlflow.run_name='{name}'", "trainer.verbose=0", *overrides]
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
    if f"{key}_ci_low" not in metrics:
        return f"{metrics[key]:.3f}"
    return (f"{metrics[key]:.3f} [{metrics[f'{key}_ci_low']:.2f}, "
            f"{metrics[f'{key}_ci_high']:.2f}]")


def parent_run(client: MlflowClient, experiment: str, name: str):
    """The newest cross-validation parent whose run name starts with `name`."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], "tags.cv_folds != ''",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    matching = [r for r in runs if r.info.run_name.startswith(f"{name} cv")]
    return matching[0] if matching else None


def cv_table(client: MlflowClient, experiment: str,
             timings: dict[str, tuple[float, int]]) -> str:
    lines = ["| config | folds x repeats | OOF accuracy [95% CI] | OOF ROC-AUC [95% CI] | "
             "accuracy spread over repeats (std) | sensitivity at val threshold | "
             "specificity at val threshold | accuracy with TTA | mean best epoch | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (seconds, code) in timings.items():
        run = parent_run(client, experiment, name)
        if run is None or code != 0:
            lines.append(f"| {name} | failed (exit {code}, see quality.log) |||||||| "
                         f"{seconds / 60:.1f} |")
            continue
        m, tags = run.data.metrics, run.data.tags
        spread = m.get("cv_repeat_test_accuracy_std")
        lines.append(
            f"| {name} | {tags['cv_folds']} x {tags.get('cv_repeats', '1')} | "
            f"{interval(m, 'test_accuracy')} | {interval(m, 'test_roc_auc')} | "
            f"{'-' if spread is None else f'{spread:.3f}'} | "
            f"{interval(m, 'test_op_sensitivity')} | {interval(m, 'test_op_specificity')} | "
            f"{interval(m, 'test_tta_accuracy')} | {m.get('best_epoch', float('nan')):.1f} | "
            f"{seconds / 60:.1f} |")
    return "\n".join(lines)


def image_files(data: Path) -> tuple[list[str], list[Path], np.ndarray]:
    classes = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (data / name).rglob("*") if p.suffix.lower() in EXTENSIONS)
        files += found
        labels += [index] * len(found)
    return classes, files, np.array(labels)


def outer_folds(data: Path, root: Path, outer: int, seed: int
                ) -> tuple[list[str], list[tuple[Path, list[Path], np.ndarray]]]:
    """Symlinked training folders of each outer fold, with its held-out files and labels."""
    classes, files, labels = image_files(data)
    splitter = StratifiedKFold(outer, shuffle=True, random_state=seed)
    out = []
    for number, (train, test) in enumerate(splitter.split(files, labels), start=1):
        folder = root / "outer" / f"fold_{number}" / "train"
        if not folder.is_dir():
            for i in train:
                link = folder / classes[labels[i]] / files[i].name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(files[i])
        out.append((folder, [files[i] for i in test], labels[test]))
    return classes, out


def scores(labels: np.ndarray, probabilities: np.ndarray, positive: int,
           threshold: float | None = None) -> dict[str, float]:
    guess = (probabilities.argmax(axis=1) if threshold is None
             else np.where(probabilities[:, positive] >= threshold, positive, 1 - positive))
    return {"accuracy": float(np.mean(guess == labels)),
            "roc_auc": float(roc_auc_score(labels == positive, probabilities[:, positive]))}


def nested(name: str, overrides: list[str], data: Path, root: Path, experiment: str,
           outer: int, seed: int) -> tuple[str, float]:
    """Run the configuration once per outer fold; score every held-out image."""
    from experiments.predict import load_predictor

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    classes, folds = outer_folds(data, root, outer, seed)
    positive = len(classes) - 1
    collected: dict[str, list] = {"labels": [], "model": [], "members_mean": [], "single": [],
                                  "threshold": [], "cv_accuracy": [], "cv_roc_auc": []}
    seconds = 0.0
    for number, (train, test_files, test_labels) in enumerate(folds, start=1):
        run_name = f"{name} outer{number}"
        elapsed, code = run_config(run_name, overrides, train, root, experiment)
        seconds += elapsed
        parent = parent_run(client, experiment, run_name)
        if code != 0 or parent is None:
            return f"| {name} | failed in outer fold {number} (exit {code}) |||||||", seconds
        uri = client.tracking_uri
        model = load_predictor(parent.info.run_id, uri)
        images = np.stack([_load(model, f) for f in test_files])
        collected["labels"].append(test_labels)
        collected["model"].append(model.probabilities(images))
        collected["threshold"].append(np.full(len(test_files), model.info.threshold))
        members = [load_predictor(r.info.run_id, uri) for r in client.search_runs(
            [parent.info.experiment_id],
            f"tags.cv_parent = '{parent.info.run_id}' and tags.cv_fold != ''")]
        member_probs = [m.probabilities(images) for m in members]
        collected["members_mean"].append(np.mean(member_probs, axis=0))
        collected["single"].append(member_probs)
        collected["cv_accuracy"].append(parent.data.metrics["test_tta_accuracy"])
        collected["cv_roc_auc"].append(parent.data.metrics["test_tta_roc_auc"])
    labels = np.concatenate(collected["labels"])
    model_probs = np.concatenate(collected["model"])
    at_threshold = np.where(model_probs[:, positive] >= np.concatenate(collected["threshold"]),
                            positive, 1 - positive)
    model = scores(labels, model_probs, positive)
    members = scores(labels, np.concatenate(collected["members_mean"]), positive)
    singles = [scores(fold_labels, p, positive) for fold_labels, probs in
               zip(collected["labels"], collected["single"], strict=True) for p in probs]
    single = {k: float(np.mean([s[k] for s in singles])) for k in ("accuracy", "roc_auc")}
    single_std = float(np.std([s["accuracy"] for s in singles], ddof=1))
    low, high = bootstrap_accuracy(labels, model_probs.argmax(axis=1), seed)
    row = (f"| {name} | {outer} x {len(collected['single'][0])} | {model['accuracy']:.3f} "
           f"[{low:.2f}, {high:.2f}] | {model['roc_auc']:.3f} | "
           f"{np.mean(at_threshold == labels):.3f} | {members['accuracy']:.3f} / "
           f"{members['roc_auc']:.3f} | {single['accuracy']:.3f} (+-{single_std:.3f}) / "
           f"{single['roc_auc']:.3f} | {np.mean(collected['cv_accuracy']):.3f} / "
           f"{np.mean(collected['cv_roc_auc']):.3f} | {seconds / 60 / outer:.1f} |")
    return row, seconds


def _load(predictor, file: Path) -> np.ndarray:
    from experiments.data.decode import load_image

    return load_image(str(file), predictor.info.image_size)


def bootstrap_accuracy(labels: np.ndarray, guess: np.ndarray, seed: int,
                       resamples: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(labels), (resamples, len(labels)))
    values = (guess[index] == labels[index]).mean(axis=1)
    return tuple(float(v) for v in np.percentile(values, [2.5, 97.5]))


NESTED_HEADER = (
    "| config | outer folds x models | held-out accuracy of the run's model [95% CI] | "
    "held-out ROC-AUC | held-out accuracy at its threshold | mean of fold models: accuracy / "
    "AUC | one fold model alone: accuracy (+-std) / AUC | inner CV estimate (TTA): accuracy / "
    "AUC | minutes per model |\n|---|---|---|---|---|---|---|---|---|")


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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--outer", type=int, default=0,
                        help="nested mode: this many outer folds held out in turn")
    parser.add_argument("--seed", type=int, default=1, help="trainer.seed (and outer folds)")
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
    repeats = 1 if (args.quick or args.outer) else args.repeats
    common = [f"cv.folds={folds}", f"cv.repeats={repeats}", f"trainer.seed={args.seed}",
              *(QUICK if args.quick else [])]
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.outer:
        rows = []
        for name, overrides in configs:
            print(f"{name}: nested, {args.outer} outer folds ...", flush=True)
            row, seconds = nested(name, [*common, *overrides], args.data.resolve(), root,
                                  args.experiment, args.outer, args.seed)
            rows.append(row)
            print(f"  {seconds / 60:.1f} min", flush=True)
        text = "\n".join([NESTED_HEADER, *rows])
    else:
        timings = {}
        for name, overrides in configs:
            print(f"{name}: {folds}-fold x {repeats} cross-validation ...", flush=True)
            timings[name] = run_config(name, [*common, *overrides], args.data.resolve(), root,
                                       args.experiment)
            print(f"  {timings[name][0] / 60:.1f} min, exit {timings[name][1]}", flush=True)
        client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
        text = cv_table(client, args.experiment, timings)
    (root / "quality.md").write_text(text + "\n")
    print(f"\n{text}")


if __name__ == "__main__":
    main()
