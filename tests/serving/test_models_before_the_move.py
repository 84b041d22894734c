"""MLflow models logged before the package had rooms (2026-11-29) still load and predict: in a
fresh Python they bring their own copy of the code; in one that imported this package, the
names they import (`experiments.serving.ImageClassifier`) still resolve."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

FIXTURE = Path(__file__).parents[1] / "fixtures" / "model_logged_before_rooms.tar.gz"

FRESH_PYTHON = textwrap.dedent("""
    import base64, json, sys
    import mlflow.pyfunc, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    image = base64.b64encode(open(sys.argv[2], "rb").read()).decode()
    out = model.predict(pd.DataFrame({"image": [image]}))
    import experiments
    print(json.dumps({"rows": out.to_dict("records"), "code": experiments.__file__}))
""")


@pytest.fixture(scope="module")
def old_model(tmp_path_factory) -> Path:
    """The MLflow model folder as `tracking.log_model` wrote it on main before the move: a
    tiny Macenko-normalised CNN, its flat `experiments` package as code, a probe image and
    the probabilities it gave then."""
    folder = tmp_path_factory.mktemp("old_model")
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(folder, filter="data")
    return folder / "model"


def expected(old_model: Path) -> dict:
    return json.loads((old_model / "expected.json").read_text())[0]


def assert_same(row: dict, want: dict) -> None:
    for name in ("p_benign", "p_malignant"):
        assert row[name] == pytest.approx(want[name], abs=1e-5)
    assert (row["predicted"], row["decision"]) == (want["predicted"], want["decision"])


def test_loads_in_a_fresh_python_with_its_own_code(old_model, tmp_path):
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PYTHON)
    result = subprocess.run([sys.executable, str(script), str(old_model),
                             str(old_model / "probe.png")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert str(old_model / "code" / "experiments") in out["code"]  # the model's own copy
    assert_same(out["rows"][0], expected(old_model))


def test_loads_where_the_new_package_is_imported(old_model):
    import mlflow.pyfunc

    import experiments.serving  # noqa: F401  (the new package first, as experiments.predict)

    model = mlflow.pyfunc.load_model(str(old_model))
    image = base64.b64encode((old_model / "probe.png").read_bytes()).decode()
    out = model.predict(pd.DataFrame({"image": [image]}))
    assert_same(out.to_dict("records")[0], expected(old_model))
    assert np.isfinite(out["p_benign"]).all()
