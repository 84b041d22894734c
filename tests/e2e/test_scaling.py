"""Many runs on existing engines: Hydra's Ray and submitit launchers, the Optuna sweeper, and the
thread budget that lets parallel jobs share a machine's cores. Loopback only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from experiments.config.schema import CONFIG_MODULE
from experiments.orchestration.launch import thread_budget
from experiments.training.runtime import usable_cores
from tests.conftest import (
    SMALL,
    artifact_files,
    children_of,
    client_for,
    free_port,
    run_cli,
    start_cli,
    the_parent,
)

TINY = [*SMALL, "trainer.epochs=1", "eval.tta=none"]


def launcher_config(tmp_path, *overrides: str):
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={tmp_path}", "data.root=/x",
                                           *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
        cfg.hydra.job.id = "0"
    return cfg


@pytest.mark.parametrize(("overrides", "expected"), [
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], lambda cores: max(1, cores // 2)),
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"], lambda cores: 1),
    (["hydra/launcher=ray", "+hydra.launcher.ray.remote.num_cpus=3"], lambda cores: 3),
    # a count that is no machine's core count here, so a launcher not recognised shows
    (["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=3"], lambda cores: 3),
    (["hydra/launcher=basic"], lambda cores: cores),
])
def test_parallel_jobs_share_the_cores(tmp_path, overrides, expected):
    HydraConfig.instance().set_config(launcher_config(tmp_path, *overrides))
    try:
        assert thread_budget(None) == expected(usable_cores())
        assert thread_budget(5) == 5  # trainer.threads wins
    finally:
        HydraConfig.instance().cfg = None


def sweep_children(tmp_path, experiment: str) -> tuple:
    client = client_for(tmp_path)
    parent, experiment_id = the_parent(client, experiment)
    return client, parent, children_of(client, parent.info.run_id, experiment_id)


def netns_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not netns_available(),
                    reason="needs `unshare --net` (root, or user namespaces) to keep Ray on "
                           "loopback; a local Ray would otherwise bind the machine's address")
def test_ray_launcher_sweep_in_a_loopback_only_network(tmp_path):
    """Ray binds to the machine's own address, so the sweep runs inside a network namespace
    this test makes, where only loopback exists: nothing can reach another host."""
    args = ["-m", "hydra/launcher=ray", *TINY, "trainer.seed=1,2", f"paths.root={tmp_path}",
            "mlflow.experiment_name=ray"]
    command = " ".join(f"'{a}'" for a in [sys.executable, "-m", "experiments.run", *args])
    result = subprocess.run(["unshare", "--net", "sh", "-c", f"ip link set lo up && {command}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                 "RAY_DISABLE_USAGE_STATS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    client, parent, children = sweep_children(tmp_path, "ray")
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["trainer.seed"] for c in children) == ["1", "2"]
    assert all(c.info.status == "FINISHED" for c in children)
    cores = usable_cores()
    assert {c.data.tags["threads"] for c in children} == {"1" if cores > 1 else str(cores)}
    assert {"trials/trials.csv", "comparison/comparison.md"} <= artifact_files(
        client, parent.info.run_id)


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    result = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
                      "hydra.launcher.cpus_per_task=1",
                      *TINY, "trainer.seed=1,2", f"paths.root={tmp_path}",
                      "mlflow.experiment_name=submitit"], tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    _, parent, children = sweep_children(tmp_path, "submitit")
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["trainer.seed"] for c in children) == ["1", "2"]
    assert all(c.info.status == "FINISHED" for c in children)
    # each job sizes TensorFlow to its cpus_per_task, not to the machine
    assert [c.data.tags["threads"] for c in children] == ["1", "1"]


@pytest.mark.slow
def test_optuna_sweep_logs_its_trials_and_continues_its_study(tmp_path):
    search = ["-m", "hydra/sweeper=optuna", *TINY, f"paths.root={tmp_path}",
              "optimizer.learning_rate=tag(log,interval(1e-4,1e-2))",
              "hydra.sweeper.direction=maximize", "mlflow.experiment_name=optuna",
              "hydra.sweeper.storage=sqlite:///${hydra.sweep.dir}/optuna.db",
              "hydra.sweeper.study_name=search"]
    result = run_cli([*search, "hydra.sweeper.n_trials=3"], tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    client, parent, children = sweep_children(tmp_path, "optuna")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    local = client.download_artifacts(parent.info.run_id, "trials/trials.csv", str(tmp_path))
    rows = open(local).read().splitlines()
    assert rows[0] == "run_id,state,value,optimizer.learning_rate" and len(rows) == 4
    returned = {c.info.run_id: c.data.metrics["best_val_accuracy"] for c in children}
    for row in rows[1:]:
        run_id, state, value, _ = row.split(",")
        assert state == "FINISHED" and float(value) == pytest.approx(returned[run_id])
    assert parent.data.params["best_trial_run_id"] in returned
    assert "optimization_results.yaml" in artifact_files(client, parent.info.run_id)

    # The study is stored in the sweep folder: the same sweep folder continues it.
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    again = run_cli([*search, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep_dir}"],
                    tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert len(study.trials) == 4


@pytest.mark.slow
def test_mirrored_run_on_two_logical_cpus_keeps_the_contract(tmp_path):
    result = run_cli([*TINY, "trainer.epochs=2", "trainer.distribute=mirrored",
                      "trainer.logical_cpus=2", f"paths.root={tmp_path}",
                      "mlflow.experiment_name=mirrored"], tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU:1" in result.stderr + result.stdout  # two replicas
    client = client_for(tmp_path)
    exp = client.get_experiment_by_name("mirrored")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    for name in ("test_accuracy", "test_roc_auc", "test_accuracy_ci_low", "best_epoch"):
        assert name in run.data.metrics
    assert run.data.tags["model_uri"].startswith("models:/")
    (out,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert (out / "checkpoints" / "best.keras").is_file()


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


@pytest.mark.slow
def test_multi_worker_run_with_two_local_workers_logs_one_run(tmp_path):
    """Two worker processes (TF_CONFIG on 127.0.0.1): both train the same steps, only the
    chief writes its output folder and the MLflow run; the other leaves nothing behind."""
    ports = [free_port(), free_port()]
    args = [*TINY, "trainer.epochs=2", "trainer.distribute=multi_worker", "trainer.threads=1",
            f"paths.root={tmp_path}", "mlflow.experiment_name=multi_worker"]
    workers = [start_cli([*args, f"hydra.run.dir={tmp_path / 'outputs' / f'worker{i}'}"],
                         tmp_path, env={"TF_CONFIG": tf_config(ports, i)}) for i in (0, 1)]
    try:
        outputs = [worker.communicate(timeout=900) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    codes = [worker.returncode for worker in workers]
    assert codes == [0, 0], "\n\n".join(f"worker {i}: {stderr[-3000:]}"
                                        for i, (_, stderr) in enumerate(outputs))
    client = client_for(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("multi_worker").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    for name in ("test_accuracy", "test_roc_auc", "test_accuracy_ci_low", "best_epoch"):
        assert name in run.data.metrics
    assert run.data.tags["model_uri"].startswith("models:/")
    assert (tmp_path / "outputs" / "worker0" / "checkpoints" / "best.keras").is_file()
    assert not (tmp_path / "outputs" / "worker1" / "checkpoints").exists()


def test_multi_worker_needs_tf_config(make_config, monkeypatch):
    from experiments.run import run

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        run(make_config("trainer.distribute=multi_worker"))
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, '
                                    '"task": {"type": "worker", "index": 3}}')
    with pytest.raises(ValueError, match="task worker:3 is not in the cluster"):
        run(make_config("trainer.distribute=multi_worker"))
