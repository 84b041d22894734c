"""Pretrained weights as managed inputs: files a user imported, kept with their sha256 and origin.

Hospital networks are often offline, so "cannot download the weights" must have an answer: a
weights file imported once (`python -m experiments.weights import FILE --backbone NAME`) is
copied into the weights home and recorded in its `registry.json`; from then on
`backbone.weights=imagenet` resolves to it without a network. Every run records where its
weights came from and their sha256 (`provenance`), so a model can be reproduced and audited.

The home is `$EXPERIMENTS_WEIGHTS_HOME`, else `experiments_weights/` beside Keras' own cache
(`$KERAS_HOME`, default `~/.keras`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.errors import MissingFileError, WeightsError

HOME_ENV = "EXPERIMENTS_WEIGHTS_HOME"
REGISTRY_FILE = "registry.json"


def weights_home() -> Path:
    """Where imported weights and the registry live."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser()
    from keras.src.backend.config import keras_home  # no public accessor in Keras 3

    return Path(keras_home()).expanduser() / "experiments_weights"


@dataclass(frozen=True)
class WeightsRecord:
    """One imported weights file: which backbone it fits, where it is, what it is."""

    backbone: str
    path: str  # the copy in the weights home
    sha256: str
    origin: str  # where the user had it from: the file imported, and what they said of it
    imported: str  # ISO time of the import
    size: int


_HASHES: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime) -> sha256


def sha256_of(path: str | Path) -> str:
    """The file's sha256 (remembered per path, size and modification time)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(real, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def read_registry(home: Path | None = None) -> dict[str, WeightsRecord]:
    """backbone name -> its imported ImageNet-role weights (empty when nothing was imported)."""
    path = (home or weights_home()) / REGISTRY_FILE
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
        return {name: WeightsRecord(**entry) for name, entry in entries.items()}
    except (ValueError, TypeError) as error:
        raise WeightsError(f"The weights registry {path} is not readable ({error}); fix or "
                           "delete it and import the weights again") from error


def registered(backbone: str) -> WeightsRecord | None:
    return read_registry().get(backbone)


def register(file: str | Path, backbone: str, note: str | None = None) -> WeightsRecord:
    """Copy `file` into the weights home and record it as `backbone`'s pretrained weights
    (replacing an earlier import; the registry is rewritten atomically)."""
    source = Path(file).expanduser().resolve()
    if not source.is_file():
        raise MissingFileError(f"Weights file not found: {source}")
    home = weights_home()
    digest = sha256_of(source)
    suffix = ".weights.h5" if source.name.endswith(".weights.h5") else source.suffix
    target = home / backbone / f"{digest[:16]}{suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file() or sha256_of(target) != digest:
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    origin = str(source) + (f" ({note})" if note else "")
    record = WeightsRecord(backbone, str(target), digest, origin,
                           datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           target.stat().st_size)
    entries = {name: asdict(r) for name, r in read_registry(home).items()}
    entries[backbone] = asdict(record)
    path = home / REGISTRY_FILE
    staging = path.with_name(REGISTRY_FILE + ".partial")
    staging.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    os.replace(staging, path)
    return record


def checked_path(record: WeightsRecord) -> str:
    """The registered file, refused when it is gone or no longer the file that was imported."""
    if not Path(record.path).is_file():
        raise WeightsError(f"The registered {record.backbone} weights are gone: {record.path} "
                           f"(imported from {record.origin}); import them again")
    if sha256_of(record.path) != record.sha256:
        raise WeightsError(f"The registered {record.backbone} weights changed since their import "
                           f"(sha256 {sha256_of(record.path)}, recorded {record.sha256}): "
                           f"{record.path}; import them again (python -m experiments.weights "
                           "verify lists every registered file)")
    return record.path
