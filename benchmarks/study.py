"""The one-command backbone study, timed: `experiment=compare_backbones` to its verdict and
report.html, first with an empty feature cache (cold: every backbone extracts its features),
then again in the same folder (warm: features read from the cache), and the report drawn by
headless Chromium when it is installed.

    python benchmarks/study.py                                  # densenet121,resnet50
    python benchmarks/study.py --backbones densenet201,resnet50 --screenshot report.png
    python benchmarks/study.py augmentation=none eval.tta=none    # 1 view per image
    python benchmarks/study.py --backbones densenet121,densenet201,resnet50 \
        --weights densenet121=../shared/data/weights/densenet121_imagenet_notop.weights.h5

Each backbone needs ImageNet weights offline (`python -m experiments.weights import ...`; the
weights home is $EXPERIMENTS_WEIGHTS_HOME, else beside Keras' cache). For timing alone, any
file of the right architecture does: the time does not depend on the weights' values. With
`--weights NAME=FILE` the benchmark imports into a weights home of its own; every other backbone
gets a stand-in file of random values (its verdict row then means nothing, its time does).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_line

from experiments.models.weights_registry import HOME_ENV

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "biopsy-seed" / "train"


def weights_home(work: Path, backbones: str, files: dict[str, Path]) -> Path:
    """A weights home holding `files` and a random stand-in for every other backbone."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from experiments.models.backbones import get_spec

    home = work / "weights_home"
    for name in backbones.split(","):
        file = files.get(name)
        if file is None:
            file = work / f"{name}_stand_in.weights.h5"
            spec = get_spec(name)
            size = spec.default_size
            spec.constructor(include_top=False, weights=None,
                             input_shape=(size, size, 3)).save_weights(file)
            keras.backend.clear_session()
        subprocess.run([sys.executable, "-m", "experiments.weights", "import", str(file),
                        "--backbone", name, "--note", "benchmarks/study.py"], check=True,
                       capture_output=True, env={**os.environ, HOME_ENV: str(home)})
    return home


def run_study(work: Path, data: Path, backbones: str, home: Path | None,
              overrides: list[str]) -> tuple[float, str]:
    """Seconds of one study, and its verdict line."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", "experiment=compare_backbones",
         f"backbone={backbones}", f"data.root={data}", "trainer.verbose=0", *overrides],
        cwd=work, capture_output=True, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
             **({HOME_ENV: str(home)} if home is not None else {})})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("- ")
                and " - " in line and "distinguishable" in line]
    return seconds, verdicts[-1].removeprefix("- ") if verdicts else "(no verdict: one backbone)"


def fold_phases(work: Path, since_ms: int) -> list[tuple[str, str]]:
    """Mean seconds per phase of the fold runs started after `since_ms` (the warm study), per
    backbone: where a fold's time goes."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("compare_backbones")
    runs = client.search_runs([experiment.experiment_id],
                              f"attributes.start_time > {since_ms} and tags.cv_fold != ''")
    by_backbone: dict[str, list] = {}
    for found in runs:
        by_backbone.setdefault(found.data.params["backbone.name"], []).append(found)
    rows = []
    for name, folds in sorted(by_backbone.items()):
        phases: dict[str, list[float]] = {}
        for fold in folds:
            for key, value in fold.data.metrics.items():
                if key.startswith("seconds_"):
                    phases.setdefault(key.removeprefix("seconds_"), []).append(value)
            phases.setdefault("run (wall)", []).append(
                (fold.info.end_time - fold.info.start_time) / 1000)
        rows.append((f"{name} ({len(folds)} folds)", ", ".join(
            f"{key} {sum(values) / len(values):.1f}" for key, values in sorted(phases.items()))))
    return rows


def screenshot(report: Path, output: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("Chromium not installed (Debian: apt-get install chromium): no screenshot")
        return
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-quic", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--window-size=1280,2600",
                        f"--screenshot={output.resolve()}", report.as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(f"Screenshot of {report.name}: {output.resolve()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbones", default="densenet121,resnet50")
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=None,
                        help="cv.repeats (the preset's 2 unless given)")
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=FILE",
                        help="import FILE for backbone NAME into a weights home of the "
                             "benchmark's own, with random stand-ins for the other backbones")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="more Hydra overrides, e.g. augmentation=none eval.tta=none")
    args = parser.parse_args()
    files = {name: Path(file).resolve() for name, file in
             (item.split("=", 1) for item in args.weights)}
    overrides = [*([] if args.repeats is None else [f"cv.repeats={args.repeats}"]),
                 *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        home = weights_home(work, args.backbones, files) if files else None
        for cache in ("cold", "warm"):
            started_ms = int(time.time() * 1000)  # the last study is the warm one
            seconds, verdict = run_study(work, args.data.resolve(), args.backbones, home,
                                         overrides)
            rows.append((cache, seconds, verdict))
        phases = fold_phases(work, started_ms)
        reports = sorted(work.glob("outputs/multirun/*/*/comparison/report.html"))
        size = reports[-1].stat().st_size / 1024
        if args.screenshot is not None:
            screenshot(reports[-1], args.screenshot)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
    print(f"\n{cpu_line()}")
    repeats = args.repeats or 2
    print(f"experiment=compare_backbones backbone={args.backbones} {' '.join(args.overrides)}: "
          f"5 folds x {repeats} repeats, {args.data}; report.html {size:.0f} KB; "
          f"peak RSS {peak:.1f} GB\n")
    print("| feature cache | wall time | verdict |")
    print("|---|---|---|")
    for cache, seconds, verdict in rows:
        print(f"| {cache} | {seconds / 60:.1f} min ({seconds:.0f} s) | {verdict} |")
    print("\nWhere a warm fold's time goes (mean seconds per fold run):\n")
    print("| backbone | phases |")
    print("|---|---|")
    for name, text in phases:
        print(f"| {name} | {text} |")


if __name__ == "__main__":
    main()
