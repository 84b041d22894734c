"""The README's guarded tracking server: `mlflow server --app-name basic-auth`, runs logging with
the credentials in their environment - accepted for a user who may write the experiment,
refused in one line, before any data is read, for one who may not, a wrong password and none."""

from __future__ import annotations

import os

import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL, mlflow_server, run_cli

ADMIN = ("admin", "admin-password-1234")
ALICE = ("alice", "alice-password-1234")  # may edit the experiment
BOB = ("bob", "bob-password-1234")        # may not read it

AUTH_INI = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///{folder}/basic_auth.db
admin_username = {admin}
admin_password = {password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""

pytestmark = pytest.mark.slow  # ~45 s: a server, a run and three refused runs


def as_user(user: tuple[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    if user is not None:
        env.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    return env


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A basic-auth server whose admin created alice and bob and gave alice EDIT on the
    experiment `guarded`; yields (URI, experiment id)."""
    folder = tmp_path_factory.mktemp("guarded")
    (folder / "basic_auth.ini").write_text(AUTH_INI.format(folder=folder, admin=ADMIN[0],
                                                           password=ADMIN[1]))
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-secret"}
    with mlflow_server(folder, "--app-name", "basic-auth", env=env) as uri:
        os.environ.update(as_user(ADMIN))
        try:
            admin = get_app_client("basic-auth", tracking_uri=uri)
            for name, password in (ALICE, BOB):
                admin.create_user(name, password)
            experiment_id = MlflowClient(uri).create_experiment("guarded")
            admin.grant_user_permission(ALICE[0], "experiment", experiment_id, "EDIT")
        finally:
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(key)
        yield uri, experiment_id


def run_as(user: tuple[str, str] | None, uri: str, tmp_path):
    return run_cli([*SMALL, "trainer.epochs=1", f"paths.root={tmp_path}",
                    f"mlflow.tracking_uri={uri}", "mlflow.experiment_name=guarded"],
                   tmp_path, env=as_user(user))


def test_a_user_who_may_edit_logs_a_run_with_credentials_from_the_environment(guarded,
                                                                               tmp_path):
    uri, experiment_id = guarded
    result = run_as(ALICE, uri, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    os.environ.update(as_user(ADMIN))
    try:
        (logged,) = MlflowClient(uri).search_runs([experiment_id])
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key)
    assert logged.info.status == "FINISHED" and logged.info.user_id == ALICE[0]
    assert "test_accuracy" in logged.data.metrics and logged.data.tags["model_uri"]


@pytest.mark.parametrize(("user", "message"), [
    (BOB, "user 'bob' may not read experiment 'guarded' (HTTP 403). Ask the server's admin "
          "for EDIT permission"),
    (("bob", "not-his-password"), "refused the password of user 'bob' (HTTP 401)"),
    (None, "refused a request without credentials (HTTP 401) when asked to read its "
           "experiments. Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
])
def test_a_user_who_may_not_is_refused_in_one_line_before_any_data_is_read(
        guarded, tmp_path, user, message):
    uri, _ = guarded
    result = run_as(user, uri, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".cache" / "demo").exists()  # refused before the data was made
