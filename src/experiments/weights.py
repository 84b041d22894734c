"""`python -m experiments.weights`: pretrained weights for machines without internet.

    python -m experiments.weights list
    python -m experiments.weights import FILE --backbone NAME [--note "where it came from"]
    python -m experiments.weights verify [--load]

`import` loads the file into the backbone's architecture first (a file of another architecture
is refused, naming the expected and received shapes), then copies it into the weights home with
its sha256 and origin; from then on `backbone=NAME backbone.weights=imagenet` uses it offline.
`list` shows, per backbone, the imported file and Keras' own cached ImageNet file, with their
sha256. `verify` checks every imported file against its recorded sha256 (`--load`: and that it
still loads into its architecture); it exits 2 when one does not.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from experiments.console import configure_logging
from experiments.errors import WeightsError, report_user_errors
from experiments.models import weights_registry
from experiments.models.backbones import (
    BACKBONES,
    check_weights_fit,
    get_spec,
    keras_cache_dir,
)

log = logging.getLogger(__name__)


def list_weights() -> list[str]:
    """One block per backbone: its imported weights and Keras' cached ImageNet file."""
    registry = weights_registry.read_registry()
    lines = [f"Weights home: {weights_registry.weights_home()} "
             f"(${weights_registry.HOME_ENV}); Keras cache: {keras_cache_dir()}"]
    for name in sorted(BACKBONES):
        record = registry.get(name)
        spec = get_spec(name)
        cached = keras_cache_dir() / spec.imagenet_file if spec.imagenet_file else None
        lines.append(f"{name}:")
        if record is not None:
            lines.append(f"  imported  {record.path}\n            sha256 {record.sha256}\n"
                         f"            from {record.origin}, {record.imported}")
        if cached is not None and cached.is_file():
            lines.append(f"  keras     {cached}\n            sha256 "
                         f"{weights_registry.sha256_of(cached)}")
        if record is None and (cached is None or not cached.is_file()):
            lines.append("  (none here: backbone.weights=imagenet would download"
                         + (")" if spec.imagenet_file else "; no ImageNet weights exist)"))
    return lines


def import_file(file: str, backbone: str, note: str | None) -> weights_registry.WeightsRecord:
    get_spec(backbone)  # an unknown name lists the known ones
    log.info("Checking that %s fits %s ...", file, backbone)
    check_weights_fit(backbone, file)
    return weights_registry.register(file, backbone, note)


def verify(load: bool) -> list[str]:
    """Problems with the imported files (empty: all good); each file's status is logged."""
    problems = []
    for name, record in sorted(weights_registry.read_registry().items()):
        try:
            weights_registry.checked_path(record)
            if load:
                check_weights_fit(name, record.path)
        except WeightsError as error:
            problems.append(str(error))
            log.info("%-18s FAILED  %s", name, error)
        else:
            log.info("%-18s ok      sha256 %s  %s", name, record.sha256, record.path)
    return problems


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the weights available here, per backbone")
    imported = commands.add_parser("import", help="check a weights file and register it")
    imported.add_argument("file")
    imported.add_argument("--backbone", required=True, help=f"one of {sorted(BACKBONES)}")
    imported.add_argument("--note", help="where the file came from (recorded with it)")
    checked = commands.add_parser("verify", help="check the imported files' sha256")
    checked.add_argument("--load", action="store_true",
                         help="also load each into its architecture")
    return parser.parse_args(argv)


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    args = parse_args(argv)
    if args.command == "list":
        print("\n".join(list_weights()))
    elif args.command == "import":
        record = import_file(args.file, args.backbone, args.note)
        print(f"Imported {args.file} for {record.backbone}: {record.path}\n"
              f"sha256 {record.sha256}\nbackbone={record.backbone} backbone.weights=imagenet "
              "now uses it.")
    else:
        problems = verify(args.load)
        if problems:
            raise WeightsError(f"{len(problems)} imported weights file(s) failed verification: "
                               + "; ".join(problems))
        print("Every imported weights file matches its sha256"
              + (" and loads into its architecture." if args.load else "."))


if __name__ == "__main__":
    main()
