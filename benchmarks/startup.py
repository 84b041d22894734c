"""How long a command takes to answer when it has nothing to train: Hydra's `--help` and
`--cfg job`, a typo in an override, a required key left unset, a missing data folder, and the
argparse commands' `--help` - each in a fresh process from an empty folder, as a user types
them, with the modules each one loaded (TensorFlow, Keras, MLflow).

    cd benchmarks && python startup.py [--repeats 3]

The fastest of the repeats (interleaved: these machines switch speeds for minutes at a time),
and for scale the bare imports of TensorFlow, MLflow and Hydra.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_line  # benchmarks/machine.py (scripts run from this folder)

RUN = ["-m", "experiments.run"]
COMMANDS: dict[str, list[str]] = {
    "run --help": [*RUN, "--help"],
    "run --cfg job (a preset's composed config)": [*RUN, "experiment=transfer_cpu", "--cfg",
                                                   "job"],
    "run: an override that is not a key (typo)": [*RUN, "data.roott=/x"],
    "run: data.root left unset": [*RUN],
    "run: data.root does not exist": [*RUN, "data.root=/no/such/folder"],
    "predict --help": ["-m", "experiments.predict", "--help"],
    "compare --help": ["-m", "experiments.compare", "--help"],
}
# What the commands above load, each alone in a fresh process, for scale.
IMPORTS = {"import tensorflow": "tensorflow", "import mlflow": "mlflow",
           "import hydra, omegaconf": "hydra, omegaconf"}
PROBE = ("import atexit, sys; atexit.register(lambda: print('LOADED', *[m for m in "
         "('tensorflow', 'keras', 'mlflow') if m in sys.modules], file=sys.stderr))")


def timed(args: list[str], cwd: Path) -> tuple[float, int, str]:
    """Seconds, exit code and the heavy modules loaded, of `python ARGS` in `cwd`."""
    command = [sys.executable, "-c", f"{PROBE}; import runpy, sys; sys.argv = {args!r}[1:]; "
               f"runpy.run_module({args[1]!r}, run_name='__main__', alter_sys=True)"] \
        if args[0] == "-m" else [sys.executable, *args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    loaded = [line.split(" ", 1)[1] if " " in line else "-"
              for line in result.stderr.splitlines() if line.startswith("LOADED")]
    return seconds, result.returncode, (loaded[-1] if loaded else "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {**COMMANDS, **{name: ["-c", f"import {modules}"] for name, modules in IMPORTS.items()}}
    best: dict[str, tuple[float, int, str]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for name, command in rows.items():
                result = timed(command, Path(folder))
                if name not in best or result[0] < best[name][0]:
                    best[name] = result
    print(f"{cpu_line()}\n")
    print(f"Fastest of {args.repeats}, a fresh process each, from an empty folder:\n")
    print("| command | seconds | exit code | loaded |")
    print("|---|---|---|---|")
    for name, (seconds, code, loaded) in best.items():
        print(f"| {name} | {seconds:.2f} | {code} | {loaded} |")


if __name__ == "__main__":
    main()
