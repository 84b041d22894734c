"""`python -m experiments.compare`: the study report of groups of finished runs.

Reads finished runs from the tracking store with the MLflow API, groups them by config keys
(e.g. `backbone.name`), and writes the study report: `report.html` (one self-contained file:
the paired verdict, the table, ROC curves with bands, calibration, a Grad-CAM gallery of the
images the groups disagree on), `comparison.md`/`.csv`, `verdict.md`/`.csv` and the figures.
Groups report mean +- std over their runs (e.g. over seeds), and every two groups tested on the
same images are compared image by image (DeLong, McNemar, paired bootstrap).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from experiments.console import configure_logging
from experiments.errors import report_user_errors
from experiments.tracking import store as store_lib
from experiments.tracking.comparison import FILES, find_runs, write_report
from experiments.tracking.study_report import GALLERY_IMAGES
from experiments.tracking.sweep import group_by_keys, swept_keys


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="biopsy", help="MLflow experiment name")
    parser.add_argument("--parent", help="only the jobs of this sweep (parent run id)")
    parser.add_argument("--filter", default="", help="MLflow filter string, e.g. "
                        "\"params.`data.image_size` = '64'\"")
    parser.add_argument("--group-by", nargs="*", default=None,
                        help="param keys to group by (default: with --parent, the keys the "
                        "sweep swept, as its own report; else backbone.name)")
    parser.add_argument("--output", default="comparison", help="folder for the report")
    parser.add_argument("--gallery", type=int, default=GALLERY_IMAGES, metavar="N",
                        help="images the groups disagree on, with Grad-CAM, in report.html "
                        f"(default {GALLERY_IMAGES}; 0: none)")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: the SQLite store under ./mlruns")
    return parser.parse_args(argv)


def default_group_by(client: MlflowClient, parent: str | None, runs: Sequence[Run]
                     ) -> list[str]:
    """What a sweep's own report grouped by (the keys its overrides swept, seeds pooled), so
    `--parent` gives the same report; backbone.name for anything else."""
    tags = client.get_run(parent).data.tags if parent and runs else {}
    if "sweep_group_by" in tags:
        return group_by_keys(json.loads(tags["sweep_group_by"]), runs[0].data.params)
    if "sweep_overrides" in tags:  # a sweep logged before 2026-12-03: its command line's keys
        return group_by_keys(swept_keys(tags["sweep_overrides"].split(" ")),
                             runs[0].data.params)
    return ["backbone.name"]


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    args = parse_args(argv)
    client = MlflowClient(args.tracking_uri or store_lib.default_store_uri())
    runs = find_runs(client, args.experiment, args.parent, args.filter)
    group_by = args.group_by if args.group_by is not None else default_group_by(
        client, args.parent, runs)
    title = f"Comparison of {args.experiment}" + (f", sweep {args.parent}" if args.parent
                                                  else "")
    text, _ = write_report(client, runs, group_by, Path(args.output), title, args.gallery)
    print(text)
    print(f"Report written to {Path(args.output).resolve()}: {', '.join(FILES)}")


if __name__ == "__main__":
    main()
