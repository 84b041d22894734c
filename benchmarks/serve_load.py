"""A served model under load: `mlflow models serve` on a free 127.0.0.1 port, N concurrent
clients posting base64 images for a bounded number of requests, and what a deployment needs to
know - throughput, latency percentiles, failed requests and the server's memory before and
after.

    python benchmarks/serve_load.py                 # 1,000 requests per row, 1 and 2 workers
    python benchmarks/serve_load.py --short         # a tiny model, 40 requests (CI runs this)
    python benchmarks/serve_load.py --model mine=models:/biopsy/1 \\
        --tracking-uri sqlite:///$PWD/mlruns/mlflow.db --workers 1 --clients 4

Without --model it trains the shipped models first, in a temporary store, on the synthetic demo
set (serving cost depends on the architecture, not on how well it was trained): `single`, the
quickstart's model (one network, dihedral test-time augmentation), and `ensemble`,
`experiment=histology_cpu`'s 5-fold ensemble (Macenko normalisation, 8 TTA views per member).
Requests carry real biopsy images (`../shared/data/biopsy-seed/unlabeled`, 500 x 500 JPEG) when
they are there, else the demo images. Only loopback: the server binds 127.0.0.1.

A request fails when the HTTP status is not 200 or any of its rows has an error; the script
exits 1 if any request failed. RSS is the server's whole process tree (uvicorn and its
workers), read from /proc after a warm-up and after each quarter of the requests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from machine import cpu_line  # benchmarks/machine.py (scripts run from this folder)

SHARED_IMAGES = (Path(__file__).resolve().parents[2] / "shared" / "data" / "biopsy-seed"
                 / "unlabeled")

TRAININGS = {  # name -> overrides of `python -m experiments.run`
    "single": ["experiment=quickstart", "trainer.epochs=1"],
    "ensemble": ["experiment=histology_cpu", "data=demo", "trainer.epochs=1"],
}
SHORT_TRAINING = ["experiment=quickstart", "trainer.epochs=1", "data.images_per_class=10",
                  "data.image_size=32", "data.source_size=48"]


def train(name: str, overrides: Sequence[str], root: Path) -> str:
    """Train one model with the real entry point into `root`'s store; its model URI."""
    print(f"training {name}: python -m experiments.run {' '.join(overrides)}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", *overrides, f"paths.root={root}",
         f"mlflow.experiment_name=serve_load_{name}"], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{result.stderr[-3000:]}")
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name(f"serve_load_{name}")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents[0].data.tags["model_uri"]


def request_bodies(folder: Path, per_request: int, count: int = 16) -> list[bytes]:
    """`count` JSON bodies of `per_request` base64 images each, cycling through the images."""
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images under {folder}")
    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
    return [json.dumps({"dataframe_records": [
        {"image": encoded[(i * per_request + j) % len(encoded)]} for j in range(per_request)]
    }).encode() for i in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_uri: str, tracking_uri: str, workers: int, log: Path,
                 ) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` on 127.0.0.1 (loopback only); returns once /ping answers."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    with log.open("w") as handle:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)],
            env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return server, url
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def post(url: str, body: bytes) -> tuple[float, str]:
    """One request: (seconds, "" or what went wrong)."""
    start = time.perf_counter()
    request = urllib.request.Request(f"{url}/invocations", body,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            rows = json.loads(answer.read())["predictions"]
        problem = next((r["error"] for r in rows if r["error"]), "")
    except (OSError, ValueError, KeyError) as error:  # HTTP errors are OSErrors
        problem = f"{type(error).__name__}: {error}"
    return time.perf_counter() - start, problem


@dataclass
class Load:
    seconds: float
    latencies: list[float]
    failures: list[str]


def run_load(url: str, bodies: Sequence[bytes], requests: int, clients: int) -> Load:
    """`requests` requests from `clients` concurrent clients."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: post(url, bodies[i % len(bodies)]), range(requests)))
    return Load(time.perf_counter() - start, [s for s, _ in results],
                [p for _, p in results if p])


def measure(name: str, model_uri: str, tracking_uri: str, workers: int, clients: int,
            requests: int, bodies: Sequence[bytes], per_request: int, folder: Path) -> dict:
    server, url = start_server(model_uri, tracking_uri, workers, folder / f"{name}_{workers}.log")
    try:
        run_load(url, bodies, 4 * workers * clients, clients)  # warm-up: every worker traced
        rss = [tree_rss_mb(server.pid)]
        loads = []
        for quarter in range(4):  # RSS after each quarter: growth shows as a trend
            loads.append(run_load(url, bodies, requests * (quarter + 1) // 4
                                  - requests * quarter // 4, clients))
            rss.append(tree_rss_mb(server.pid))
    finally:
        stop_server(server)
    latencies = np.array([s for load in loads for s in load.latencies]) * 1000
    seconds = sum(load.seconds for load in loads)
    failures = [f for load in loads for f in load.failures]
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"model": name, "workers": workers, "clients": clients, "requests": requests,
            "images/request": per_request, "req/s": requests / seconds,
            "img/s": requests * per_request / seconds, "p50 ms": p50, "p95 ms": p95,
            "p99 ms": p99, "failed": len(failures),
            "RSS MB after warm-up, each quarter": " / ".join(f"{r:.0f}" for r in rss),
            "RSS growth in 2nd half MB": rss[-1] - rss[2],
            "first failure": failures[0][:200] if failures else ""}


def table(rows: Sequence[dict]) -> str:
    keys = [k for k in rows[0] if k != "first failure"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(
            f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true",
                        help="a tiny quickstart model, 1 worker, 2 clients, 40 requests")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=URI",
                        help="serve this model instead of training the shipped ones")
    parser.add_argument("--tracking-uri", help="the store of --model URIs")
    parser.add_argument("--shipped", nargs="+", choices=sorted(TRAININGS),
                        default=sorted(TRAININGS), help="which shipped models to train and serve")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--images", type=Path, help="folder of request images "
                        f"(default: {SHARED_IMAGES} if present, else the demo images)")
    args = parser.parse_args(argv)
    if args.short:
        args.workers, args.clients, args.requests = [1], 2, 40
    if args.model and not args.tracking_uri:
        parser.error("--model needs --tracking-uri (the store that holds it)")
    if args.requests < 2 or args.clients < 1 or min(args.workers) < 1:
        parser.error("--requests must be >= 2, --clients and --workers >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve_load_") as scratch:
        folder = Path(scratch)
        if args.model:
            models = dict(m.split("=", 1) for m in args.model)
            tracking_uri = args.tracking_uri
        else:
            trainings = ({"single": SHORT_TRAINING} if args.short
                         else {name: TRAININGS[name] for name in args.shipped})
            models = {name: train(name, overrides, folder)
                      for name, overrides in trainings.items()}
            tracking_uri = f"sqlite:///{folder}/mlruns/mlflow.db"
        images = args.images or (SHARED_IMAGES if SHARED_IMAGES.is_dir() and not args.short
                                 else folder / ".cache" / "demo")
        bodies = request_bodies(images, args.images_per_request)
        rows = []
        for name, uri in models.items():
            for workers in args.workers:
                print(f"serving {name} with {workers} worker(s) ...", flush=True)
                rows.append(measure(name, uri, tracking_uri, workers, args.clients,
                                    args.requests, bodies, args.images_per_request, folder))
    print(f"\n{cpu_line()}\nrequest images: {images}\n")
    print(table(rows))
    failed = [r for r in rows if r["failed"]]
    for row in failed:
        print(f"\n{row['model']} x{row['workers']}: {row['failed']} failed; first: "
              f"{row['first failure']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
