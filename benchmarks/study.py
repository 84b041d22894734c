"""The one-command backbone study, timed: `experiment=compare_backbones` to its verdict and
report.html, first with an empty feature cache (cold: every backbone extracts its features),
then again in the same folder (warm: features read from the cache), and the report drawn by
headless Chromium when it is installed.

    python benchmarks/study.py                                  # densenet121,resnet50
    python benchmarks/study.py --backbones densenet201,resnet50 --screenshot report.png

Each backbone needs ImageNet weights offline (`python -m experiments.weights import ...`; the
weights home is $EXPERIMENTS_WEIGHTS_HOME, else beside Keras' cache). For timing alone, any
file of the right architecture does: the time does not depend on the weights' values.
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

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "biopsy-seed" / "train"


def run_study(work: Path, data: Path, backbones: str) -> tuple[float, str]:
    """Seconds of one study, and its verdict line."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", "experiment=compare_backbones",
         f"backbone={backbones}", f"data.root={data}", "trainer.verbose=0"],
        cwd=work, capture_output=True, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("- ")
                and " - " in line and "distinguishable" in line]
    return seconds, verdicts[-1] if verdicts else "(no verdict)"


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
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for cache in ("cold", "warm"):
            seconds, verdict = run_study(work, args.data.resolve(), args.backbones)
            rows.append((cache, seconds, verdict))
        reports = sorted(work.glob("outputs/multirun/*/*/comparison/report.html"))
        size = reports[-1].stat().st_size / 1024
        if args.screenshot is not None:
            screenshot(reports[-1], args.screenshot)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
    print(f"\n{cpu_line()}")
    print(f"experiment=compare_backbones backbone={args.backbones}: 5 folds x 2 repeats, "
          f"{args.data}; report.html {size:.0f} KB; peak RSS {peak:.1f} GB\n")
    print("| feature cache | wall time | verdict |")
    print("|---|---|---|")
    for cache, seconds, verdict in rows:
        print(f"| {cache} | {seconds / 60:.1f} min ({seconds:.0f} s) | {verdict[2:]} |")


if __name__ == "__main__":
    main()
