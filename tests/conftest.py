"""Shared fixtures: compose the real configs from conf/ and shrink them for fast tests."""

from __future__ import annotations

import csv
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from experiments.config.instantiate import components
from experiments.config.schema import CONFIG_MODULE, register_configs
from experiments.data import loading
from experiments.orchestration import single
from experiments.run import run as _registers_resolvers  # noqa: F401  (${direction:...})
from experiments.training.build import Prepared, build


def _pin_xdist_worker() -> None:
    """Give each pytest-xdist worker its own share of the CPUs (`pytest -n 2` on two cores: one
    each). Left alone, every worker's TensorFlow - and every `python -m experiments.run` it
    starts - sizes its thread pools to all the cores, and two workers' pools fight over them;
    `os.sched_getaffinity` is what TensorFlow and `launch.thread_budget` count, and children
    inherit it."""
    if not hasattr(os, "sched_setaffinity"):  # macOS, Windows: the OS places the threads
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    cpus = sorted(os.sched_getaffinity(0))
    if not worker.startswith("gw") or count < 2 or len(cpus) < count:
        return
    os.sched_setaffinity(0, cpus[int(worker[2:]) % count::count])


_pin_xdist_worker()  # at import, before any test: TensorFlow sizes its pools at its first op

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = REPO_ROOT.parent / "shared" / "data" / "biopsy-seed" / "train"

# A small, fast run: the tiny CNN from scratch at 32 px, on a small demo set unless a test
# brings its own folder.
SMALL_TRAINING = [
    "backbone=simplecnn",
    "backbone.weights=null",
    "backbone.bn_momentum=0.9",
    "data.image_size=32",
    "trainer.epochs=2",
    "trainer.batch_size=8",
    "trainer.verbose=0",
    "optimizer.learning_rate=1e-3",
    "eval.gradcam_images=0",  # the end-to-end contract test turns these back on
    "eval.bootstrap_resamples=200",
]
SMALL_DEMO = ["data=demo", "data.images_per_class=20", "data.source_size=48"]
SMALL = [*SMALL_DEMO, *SMALL_TRAINING]


def compose_config(tmp_path: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The real config, with every path under tmp_path (store, outputs, cache)."""
    register_configs()  # the schemas, as `python -m experiments.run` registers them
    paths = [f"paths.root={tmp_path}", f"paths.output_dir={tmp_path / 'out'}"]
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose(config_name="config", overrides=[*paths, *overrides])


def prepare(cfg: DictConfig) -> Prepared:
    """What one training of `cfg` starts from: data loaded and split, model built."""
    settings = OmegaConf.to_object(cfg)
    loaded = single.load_run_data(settings)
    splits = loading.split(settings.data, loaded, settings.trainer.seed)
    return build(settings, components(cfg), splits, loaded.skipped, loaded.image_size,
                 loaded.input_mpp)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        """SMALL plus overrides; `data=folder` in overrides replaces the demo set."""
        small = SMALL_TRAINING if "data=folder" in overrides else SMALL
        return compose_config(tmp_path, [*small, *overrides])
    return make


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything imported so far (TensorFlow, Keras, MLflow: millions of objects) out of
    the garbage collector's sight: each test's `clear_session` runs a full collection, which
    otherwise scans all of them, 0.25 s twice per test (a minute per 100 tests)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    keras.backend.clear_session()
    yield
    keras.backend.clear_session()


def run_cli(args: Sequence[str], cwd: Path, timeout: int = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m experiments.run ARGS` in a real subprocess, as a user runs it, to the end."""
    process = start_cli(args, cwd, env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # as subprocess.run does: never leave a job behind
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def start_cli(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
              merge_output: bool = False) -> subprocess.Popen[str]:
    """Start `python -m experiments.run ARGS` (output unbuffered, so it can be followed)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1",
                **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=cwd,
                            env=full_env, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    """Until `url` answers 200; fails with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@contextmanager
def mlflow_server(root: Path, *options: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store and an artifact folder under
    `root` (plus `options`, e.g. `--app-name basic-auth`); yields its URI, always stopped."""
    port = free_port()
    log_path = root / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *options],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})})
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health", process, log_path, seconds=120)
        yield uri
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, seconds: float = 30) -> None:
    """SIGTERM a server started with start_new_session (it and its workers); SIGKILL if it
    does not stop within `seconds`."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def write_image(path: Path, mode: str = "RGB", size: int = 40, seed: int = 0) -> Path:
    """A random image in any PIL mode and format (by extension)."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    assert image.mode == mode
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of 12 small RGB JPEGs each."""
    root = tmp_path / "images"
    for label, offset in (("benign", 0), ("malignant", 100)):
        for i in range(12):
            write_image(root / label / f"{label}_{i}.jpg", seed=offset + i)
    return root


# MLflow store helpers the tests share.
def client_for(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db")


def all_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    files: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        files |= artifact_files(client, run_id, item.path) if item.is_dir else {item.path}
    return files


def read_csv(client: MlflowClient, run_id: str, path: str, dst: Path) -> list[dict[str, str]]:
    local = client.download_artifacts(run_id, path, str(dst))
    with open(local, newline="") as handle:
        return list(csv.DictReader(handle))


def children_of(client: MlflowClient, parent_id: str, experiment_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def the_parent(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.sweep_parent = 'true'")
    assert len(parents) == 1
    return parents[0], exp.experiment_id
