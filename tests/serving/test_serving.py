"""The logged model outside the framework: `mlflow models serve`, the pyfunc in a Python that
never imported `experiments`, and `experiments.predict` in fresh processes."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.serving.limits import PATH_OUTSIDE_ROOT, PATHS_REFUSED
from tests.conftest import (
    SMALL,
    SMALL_TRAINING,
    all_runs,
    client_for,
    free_port,
    run_cli,
    stop_process_group,
    wait_for,
    write_image,
)


def predict_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "experiments.predict", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {Path(row["file"]).name: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run, logged to a local store: (root, run id, model URI, some image files).
    Its features are pooled by the generalised mean: the project's own layer must load and
    serve where the project is not installed."""
    root = tmp_path_factory.mktemp("served")
    result = run_cli([*SMALL, "trainer.epochs=1", "backbone.global_pool=gem",
                      f"paths.root={root}", "mlflow.experiment_name=served"], root)
    assert result.returncode == 0, result.stderr[-3000:]
    (finished,) = all_runs(client_for(root), "served")
    images = sorted((root / ".cache" / "demo").rglob("*.jpg"))
    return root, finished.info.run_id, finished.data.tags["model_uri"], [images[0], images[-1]]


def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return strict_json(response.read())


def strict_json(text: bytes | str) -> dict:
    """JSON as any client parses it: a bare NaN or Infinity is refused."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


SERVE_LIMITS = {"EXPERIMENTS_SERVE_MAX_ROWS": "8", "EXPERIMENTS_SERVE_MAX_IMAGE_BYTES": "100000",
                "EXPERIMENTS_SERVE_MAX_IMAGE_PIXELS": "1000000"}


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """`mlflow models serve --env-manager local` on the logged model, deployed as the README
    says: paths allowed under one folder (holding one of the images and a symlink that
    escapes it), rows, bytes and pixels limited. Yields (URL, allowed folder)."""
    root, _, model_uri, images = trained
    folder = tmp_path_factory.mktemp("serve")
    allowed = folder / "allowed"
    allowed.mkdir()
    (allowed / images[0].name).write_bytes(images[0].read_bytes())
    (allowed / "escape.jpg").symlink_to(images[1])
    port, log = free_port(), folder / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns/mlflow.db",
           "EXPERIMENTS_SERVE_PATH_ROOT": str(allowed), **SERVE_LIMITS}
    with log.open("w") as handle:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=folder, env=env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, log)
        yield f"http://127.0.0.1:{port}", allowed
    finally:
        stop_process_group(server)


def test_mlflow_models_serve_answers_as_predict_does(trained, served, tmp_path):
    """`mlflow models serve --env-manager local` on the logged model: two base64 images in,
    the same probabilities, class and decision as `experiments.predict` out (1e-5)."""
    root, run_id, model_uri, images = trained
    expected_csv = tmp_path / "expected.csv"
    folder = tmp_path / "inputs"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    cli = predict_cli([f"model={run_id}", f"input={folder}", f"output={expected_csv}"], root)
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = read_rows(expected_csv)

    url, _ = served
    records = [{"image": base64.b64encode(image.read_bytes()).decode()} for image in images]
    answer = post_json(f"{url}/invocations", {"dataframe_records": records})["predictions"]
    assert len(answer) == 2
    for image, row in zip(images, answer, strict=True):
        want = expected[image.name]
        for column in ("p_benign", "p_malignant"):
            assert abs(row[column] - float(want[column])) < 1e-5, (column, row, want)
        assert row["predicted"] == want["predicted"] and row["decision"] == want["decision"]
        assert row["error"] == ""


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_served_model_refuses_paths_outside_its_folder_and_images_over_the_limits(
        trained, served):
    """Each refused row gets its reason, the same for a file that exists and one that does
    not; the allowed image in the same request is answered."""
    _, _, _, images = trained
    url, allowed = served
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    records = [{"path": "/etc/passwd"}, {"path": "/no/such/file.png"},
               {"path": str(images[1])},                    # exists, outside the folder
               {"path": str(allowed / "escape.jpg")},       # a symlink out of the folder
               {"path": str(allowed / ".." / "x.jpg")},
               {"path": images[0].name},                     # inside: answered
               {"image": png(Image.fromarray(noise))},      # ~120 KB > 100000 bytes
               {"image": png(Image.new("RGB", (1200, 1000), (200, 120, 180)))}]  # 1.2 MP
    rows = post_json(f"{url}/invocations", {"dataframe_records": records})["predictions"]
    outside = "`path` must name a file inside the folder this server allows"
    assert [r["error"] for r in rows[:5]] == [outside] * 5
    assert rows[5]["error"] == "" and rows[5]["predicted"] in ("benign", "malignant")
    assert "this server accepts at most 100000 per image" in rows[6]["error"]
    assert rows[7]["error"] == "1200x1000 px is over the limit of 1000000 pixels per image"
    assert all(r["predicted"] == "" for r in rows[:5] + rows[6:])
    assert all(r["p_malignant"] is None for r in rows[:5] + rows[6:])  # null, not NaN


def post_expecting_error(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    return refused.value.code, json.loads(refused.value.read())


@pytest.mark.parametrize(("records", "reason"), [
    ([{"foo": 1}], "The input needs a column `image` (base64-encoded image file) or `path`"),
    ([{"image": "aGVsbG8="}] * 9,
     "The request has 9 rows; this server answers at most 8 per request: split it into "
     "smaller requests"),
])
def test_a_malformed_or_oversized_request_is_a_400_with_one_line(served, records, reason):
    url, _ = served
    status, body = post_expecting_error(f"{url}/invocations", {"dataframe_records": records})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"].startswith(reason) and "\n" not in body["message"]
    assert "stack_trace" not in body and "Traceback" not in json.dumps(body)


CLEAN_PYTHON = textwrap.dedent("""
    import json, sys, importlib.util
    sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
    # an editable install finds the package through a finder of its own
    sys.meta_path = [f for f in sys.meta_path
                     if not getattr(f, "__module__", "").startswith("__editable__")]
    assert "experiments" not in sys.modules
    assert importlib.util.find_spec("experiments") is None, "the project is importable"
    import mlflow
    import pandas as pd
    mlflow.set_tracking_uri(sys.argv[1])
    model = mlflow.pyfunc.load_model(sys.argv[2])
    folder, files = sys.argv[3], sys.argv[4:]
    by_bytes = model.predict(pd.DataFrame({"image": [open(f, "rb").read() for f in files]}))
    refused = model.predict(pd.DataFrame({"path": files}))
    model = mlflow.pyfunc.load_model(sys.argv[2], model_config={"path_root": folder})
    by_path = model.predict(pd.DataFrame({"path": files + [folder + "/no_such_file.png",
                                                           "/etc/passwd"]}))
    import experiments
    print(json.dumps({"bytes": by_bytes.to_dict("records"), "paths": by_path.to_dict("records"),
                      "refused": refused["error"].tolist(), "code": experiments.__file__}))
""")


def test_pyfunc_loads_and_predicts_where_the_project_is_not_installed(trained, tmp_path):
    root, run_id, model_uri, images = trained
    script = tmp_path / "clean.py"
    script.write_text(CLEAN_PYTHON)
    result = subprocess.run([sys.executable, str(script), f"sqlite:///{root}/mlruns/mlflow.db",
                             model_uri, str(root / ".cache" / "demo"), *map(str, images)],
                            cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "/artifacts/code/experiments/" in out["code"]  # the model brought its own code
    assert out["refused"] == [PATHS_REFUSED] * len(images)  # paths need an allowed folder
    assert out["paths"][-2]["error"].startswith("cannot read image")  # inside, missing
    assert out["paths"][-1]["error"] == PATH_OUTSIDE_ROOT
    for by_bytes, by_path in zip(out["bytes"], out["paths"], strict=False):
        assert by_bytes == by_path and by_bytes["error"] == ""
        assert abs(by_bytes["p_benign"] + by_bytes["p_malignant"] - 1) < 1e-6


def test_logged_model_has_a_valid_signature_and_input_example(trained, tmp_path):
    import mlflow
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model
    from mlflow.models.utils import load_serving_example

    root, _, model_uri, _ = trained
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path)))
    meta = Model.load(local / "MLmodel")
    assert [c.name for c in meta.signature.inputs.inputs] == ["image", "path", "mpp"]
    assert [c.name for c in meta.signature.outputs.inputs] == [
        "p_benign", "p_malignant", "predicted", "decision", "ood_score", "error"]
    served = mlflow.pyfunc.load_model(str(local))
    example = json.loads(load_serving_example(str(local)))  # what a client would post
    answer = served.predict(pd.DataFrame(example["dataframe_split"]["data"],
                                         columns=example["dataframe_split"]["columns"]))
    assert answer["error"].tolist() == [""] and answer["predicted"].iloc[0] in (
        "benign", "malignant")


@pytest.mark.slow  # ~25 s: three trainings
def test_predict_in_a_fresh_process_for_every_layer_a_model_can_hold(tmp_path):
    """Stain normalisation and native patches put layers in front of the network: a fresh
    `experiments.predict` loads such a run's model and matches the run's own test numbers."""
    result = run_cli([*SMALL, "trainer.epochs=1", "data.image_size=48", "data.patch_size=32",
                      "data.stain_normalization=macenko", "trainer.ema=0.9",
                      "eval.tta=none", f"paths.root={tmp_path}",
                      "mlflow.experiment_name=layers"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_for(tmp_path)
    (finished,) = all_runs(client, "layers")
    run_id = finished.info.run_id
    local = Path(client.download_artifacts(run_id, "test_predictions.csv", str(tmp_path)))
    logged = {Path(r["file"]).name: r for r in csv.DictReader(local.open())}
    folder = tmp_path / "test_images"
    folder.mkdir()
    for row in logged.values():
        (folder / Path(row["file"]).name).write_bytes(Path(row["file"]).read_bytes())
    output = tmp_path / "p.csv"
    cli = predict_cli([f"model={run_id}", f"input={folder}", f"output={output}"], tmp_path)
    assert cli.returncode == 0, cli.stderr[-3000:]
    predicted = read_rows(output)
    assert predicted.keys() == logged.keys()
    for name, row in predicted.items():
        # The run normalised stains once into uint8 images; the model does it in float32.
        assert abs(float(row["p_malignant"]) - float(logged[name]["final_p_malignant"])) < 0.02


def write_small_images(root: Path, count: int) -> None:
    for i in range(count):
        write_image(root / ("benign" if i % 2 else "malignant") / f"tiny_{i:03d}.png", size=16,
                    seed=i)


def test_many_too_small_images_give_one_screenful_naming_the_full_list(tmp_path):
    root = tmp_path / "images"
    write_small_images(root, 50)
    result = run_cli([*SMALL_TRAINING, f"data.root={root}", f"paths.root={tmp_path}"],
                     tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    message = result.stderr.strip().splitlines()
    assert len(message) <= 15, result.stderr
    assert "50 invalid image file(s)" in result.stderr
    assert "50 x 16x16 px is smaller than data.image_size=32" in result.stderr
    (listing,) = (tmp_path / "outputs" / "runs").glob("*/*/invalid_files.csv")
    assert str(listing) in result.stderr
    with listing.open() as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == 50 and all("16x16 px is smaller" in r["reason"] for r in rows)
