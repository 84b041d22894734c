"""Interrupted runs resume, failures are recorded, the tracking store never loses a run."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from experiments.run import run
from tests.conftest import SMALL, all_runs, client_for, free_port, run_cli, start_cli

EPOCHS = 4


def kill_after_epoch(process: subprocess.Popen[str], epoch: int, sig: int) -> str:
    """Read the run's output until epoch `epoch + 1` starts, then send `sig`; all of the
    output, also what the run printed while it stopped."""
    seen = []
    deadline = time.monotonic() + 300
    for line in process.stdout:
        seen.append(line)
        if f"Epoch {epoch + 1}/{EPOCHS}" in line:
            process.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(seen[-20:])
    rest, _ = process.communicate(timeout=120)
    return "".join(seen) + (rest or "")


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGKILL, marks=pytest.mark.slow),
                                 signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_into_the_same_run_with_each_epoch_once(tmp_path, sig):
    args = [*SMALL, f"trainer.epochs={EPOCHS}", "trainer.verbose=2", "data.images_per_class=30",
            f"paths.root={tmp_path}", "mlflow.experiment_name=resume"]
    output = kill_after_epoch(start_cli(args, tmp_path, merge_output=True), 2, sig)
    client = client_for(tmp_path)
    (interrupted,) = all_runs(client, "resume")
    run_id = interrupted.info.run_id
    assert f"resume={run_id}" in output
    assert interrupted.info.status == ("KILLED" if sig == signal.SIGTERM else "RUNNING"), (
        output[-6000:])
    steps_before = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps_before[:2] == [1, 2] and len(steps_before) <= 3

    # Same command line plus resume=<id>: allowed (nothing changes the experiment).
    result = run_cli([*args, "trainer.verbose=0", f"resume={run_id}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (resumed,) = all_runs(client, "resume")
    assert resumed.info.run_id == run_id and resumed.info.status == "FINISHED"
    for name in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), name
    assert "test_accuracy" in resumed.data.metrics
    assert 1 <= resumed.data.metrics["best_epoch"] <= EPOCHS
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val_accuracy")}
    assert resumed.data.metrics["best_val_accuracy"] == max(val.values())


def test_resume_refuses_overrides_that_change_the_experiment(tmp_path, make_config):
    cfg = make_config("trainer.epochs=1", "mlflow.experiment_name=refuse")
    run(cfg)
    (finished,) = all_runs(client_for(tmp_path), "refuse")
    run_id = finished.info.run_id
    changed = make_config(f"resume={run_id}", "trainer.epochs=7")
    with pytest.raises(ValueError, match=r"refusing overrides.*trainer.epochs=7"):
        run(changed, overrides=[f"resume={run_id}", "trainer.epochs=7"])
    same = make_config(f"resume={run_id}")
    with pytest.raises(ValueError, match="already FINISHED"):
        run(same, overrides=[f"resume={run_id}"])
    with pytest.raises(ValueError, match="No MLflow run 'nope'"):
        run(make_config("resume=nope"), overrides=["resume=nope"])


def test_unreachable_tracking_server_fails_before_training(tmp_path, make_config):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="did not answer") as info:
        run(make_config(f"mlflow.tracking_uri={uri}"))
    assert uri in str(info.value) and "local store" in str(info.value)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow  # guards the store-creation lock; ~40 s of two full processes
def test_two_processes_share_one_sqlite_store(tmp_path):
    args = [*SMALL, "trainer.epochs=2", f"paths.root={tmp_path}", "mlflow.experiment_name=par"]
    procs = [start_cli([*args, f"trainer.seed={seed}", f"mlflow.run_name=seed{seed}"], tmp_path)
             for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    client = client_for(tmp_path)
    runs = all_runs(client, "par")
    assert sorted(r.info.run_name for r in runs) == ["seed1", "seed2"]
    for finished in runs:
        assert finished.info.status == "FINISHED"
        assert finished.data.params["trainer.seed"] == finished.info.run_name[-1]
        for name in ("loss", "val_accuracy", "lr"):
            steps = sorted(m.step for m in client.get_metric_history(finished.info.run_id, name))
            assert steps == [1, 2]


def kill_at(process: subprocess.Popen[str], marker: str, sig: int) -> str:
    """Read the run's output until a line holds `marker`, then send `sig`."""
    seen = []
    deadline = time.monotonic() + 300
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            process.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(seen[-20:])
    process.communicate(timeout=120)
    return "".join(seen)


@pytest.mark.slow  # ~25 s per signal; the SIGTERM resume during training stays in the default run
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_run_killed_during_its_final_evaluation_resumes_by_evaluating(tmp_path, sig):
    epochs = 2
    args = [*SMALL, f"trainer.epochs={epochs}", "trainer.verbose=2", f"paths.root={tmp_path}",
            "eval.bootstrap_resamples=2000", "mlflow.experiment_name=late"]
    kill_at(start_cli(args, tmp_path, merge_output=True), "Evaluating the checkpoint", sig)
    client = client_for(tmp_path)
    (interrupted,) = all_runs(client, "late")
    run_id = interrupted.info.run_id
    assert interrupted.info.status in ("KILLED", "RUNNING")
    assert "test_accuracy" not in interrupted.data.metrics

    result = run_cli([*args, "trainer.verbose=0", f"resume={run_id}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training had finished" in result.stdout
    (resumed,) = all_runs(client, "late")
    assert resumed.info.status == "FINISHED"
    for name in ("loss", "val_loss", "lr"):  # epochs not repeated
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [1, 2]
    for name in ("test_accuracy", "test_tta_roc_auc", "best_epoch"):  # logged once
        assert len(client.get_metric_history(run_id, name)) == 1, name
    assert "model_uri" in resumed.data.tags


@pytest.mark.slow  # two processes training at once, ~25 s on 2 cores
def test_resume_refuses_a_run_whose_process_still_lives(tmp_path):
    # Far more epochs than the test lasts: on a fast machine 30 epochs of this tiny model ended
    # while the second command was starting, and the "still running" run had finished.
    args = [*SMALL, "trainer.epochs=1000", "trainer.verbose=2", "data.images_per_class=30",
            f"paths.root={tmp_path}", "mlflow.experiment_name=alive"]
    first = start_cli(args, tmp_path, merge_output=True)
    try:
        seen = []
        for line in first.stdout:
            seen.append(line)
            if "Epoch 2/1000" in line:
                break
        (running,) = all_runs(client_for(tmp_path), "alive")
        run_id = running.info.run_id
        second = run_cli([*args, f"resume={run_id}"], tmp_path)
        assert second.returncode == 2
        assert "still running" in second.stderr and "process" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run was left alone ...
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    client = client_for(tmp_path)
    (left,) = all_runs(client, "alive")
    assert left.info.status == "KILLED"  # ... until we stopped it ourselves
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert len(steps) == len(set(steps))  # no epoch logged twice


def test_user_errors_are_one_message_and_exit_code_2(tmp_path):
    result = run_cli([*SMALL, f"paths.root={tmp_path}", "resume=0123456789abcdef0123456789abcdef"],
                     tmp_path)
    assert result.returncode == 2
    assert "No MLflow run" in result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr


def test_a_required_key_left_unset_names_it_and_how_to_set_it(tmp_path):
    result = run_cli([f"paths.root={tmp_path}"], tmp_path)  # the defaults: data=folder, no root
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr[-3000:]
    assert "`data.root` must be set" in result.stderr
    assert "experiment=quickstart" in result.stderr
