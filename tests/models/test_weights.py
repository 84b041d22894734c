"""Pretrained weights as managed inputs: import (checked against the architecture), list,
verify, `backbone.weights=imagenet` resolving to the imported file offline, and the weights'
source and sha256 on every run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
import pytest

from experiments import weights as weights_cli
from experiments.errors import WeightsError
from experiments.models import weights_registry
from experiments.models.backbones import build_backbone, weights_provenance
from experiments.run import run
from tests.conftest import all_runs, client_for


@pytest.fixture
def weights_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "weights_home"
    monkeypatch.setenv(weights_registry.HOME_ENV, str(home))
    return home


def simplecnn_weights(path: Path, seed: int = 0) -> Path:
    """A weights file of the right architecture (simplecnn, no top)."""
    keras.utils.set_random_seed(seed)
    build_backbone("simplecnn", None, 32).save_weights(path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_import_list_verify_and_imagenet_resolves_to_the_import(weights_home, tmp_path,
                                                                capsys):
    file = simplecnn_weights(tmp_path / "cnn.weights.h5")
    weights_cli.main(["import", str(file), "--backbone", "simplecnn", "--note", "made here"])
    record = weights_registry.registered("simplecnn")
    assert record is not None and record.sha256 == sha256(file)
    assert Path(record.path).parent.parent == weights_home and "made here" in record.origin

    weights_cli.main(["list"])
    listed = capsys.readouterr().out
    assert f"sha256 {sha256(file)}" in listed and str(record.path) in listed
    weights_cli.main(["verify", "--load"])
    assert "matches its sha256 and loads" in capsys.readouterr().out

    reference = build_backbone("simplecnn", str(file), 32)
    resolved = build_backbone("simplecnn", "imagenet", 32)  # offline: the imported file
    for a, b in zip(reference.weights, resolved.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert weights_provenance("simplecnn", "imagenet") == {
        "weights_source": f"registered:{record.origin}", "weights_sha256": sha256(file)}


def test_a_changed_import_is_refused_by_verify_and_by_runs(weights_home, tmp_path, capsys):
    file = simplecnn_weights(tmp_path / "cnn.weights.h5")
    weights_cli.main(["import", str(file), "--backbone", "simplecnn"])
    record = weights_registry.registered("simplecnn")
    assert record is not None
    with open(record.path, "ab") as handle:  # the registered copy is altered
        handle.write(b"tampered")
    with pytest.raises(SystemExit) as exit_info:
        weights_cli.main(["verify"])
    assert exit_info.value.code == 2
    assert "changed since their import" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="changed since their import"):
        build_backbone("simplecnn", "imagenet", 32)


def test_weights_of_another_architecture_are_refused_naming_shapes(weights_home, tmp_path,
                                                                   capsys):
    inputs = keras.Input((32, 32, 3))
    other = keras.Model(inputs, keras.layers.Conv2D(5, 3, name="only_conv")(inputs))
    file = tmp_path / "other.weights.h5"
    other.save_weights(file)
    with pytest.raises(SystemExit) as exit_info:
        weights_cli.main(["import", str(file), "--backbone", "simplecnn"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "does not fit simplecnn" in error
    assert "expected 40 arrays" in error and "(3, 3, 3, 32)" in error  # simplecnn's first conv
    assert "received 2" in error and "(3, 3, 3, 5)" in error
    assert weights_registry.read_registry() == {}  # nothing registered


def test_every_run_records_its_weights_source_and_sha256(weights_home, tmp_path, make_config):
    file = simplecnn_weights(tmp_path / "cnn.weights.h5", seed=3)
    run(make_config(f"backbone.weights={file}", "trainer.epochs=1",
                    "mlflow.experiment_name=provenance"))
    (logged,) = all_runs(client_for(tmp_path), "provenance")
    for where in (logged.data.params, logged.data.tags):
        assert where["weights_sha256"] == sha256(file)
        assert where["weights_source"] == f"file:{file.resolve()}"
