"""A real tracking server (PostgreSQL + proxied artifacts, deploy/tracking-server.sh): the
entry points work against it unchanged, parallel trainings keep every metric, and another local
user can neither read its secrets nor connect to its database."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import REPO
from helpers import EPOCH_METRICS, free_port

SCRIPT = REPO / "deploy" / "tracking-server.sh"
OLD_SCRIPT = REPO / "tests" / "legacy" / "tracking-server-2855795.sh"  # before issue 25: to test the migration
OTHER_USER = "nobody"  # a second local user, who must get nothing
PASSWORD_IN_URI = re.compile(r"://[^/\s:@]+:[^/\s@]+@")  # user:password@ in any URI



def have_postgres() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def pg_program(name: str) -> str:
    return str(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))[-1])


def start(script: Path, folder: Path, env: dict) -> tuple[str, str]:
    """(the MLFLOW_TRACKING_URI it prints, its stderr) of `script start folder`."""
    started = subprocess.run(["bash", str(script), "start", str(folder)], env=env, capture_output=True, text=True,
                             timeout=300)
    log = folder / "mlflow.log"
    assert started.returncode == 0, started.stderr + (log.read_text()[-2000:] if log.exists() else "")
    uri = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
    assert uri.startswith("http://127.0.0.1:")
    return uri, started.stderr


def stop(script: Path, folder: Path, env: dict) -> None:
    subprocess.run(["bash", str(script), "stop", str(folder)], env=env, capture_output=True, timeout=120)


def server_env(**extra: str) -> dict:
    return {**os.environ, "MLFLOW_PORT": str(free_port()), "PG_PORT": str(free_port()), **extra}


def as_other_user(*command: str) -> subprocess.CompletedProcess:
    # -w: never prompt for a password; cwd /: the other user may not enter ours
    return subprocess.run(["runuser", "-u", OTHER_USER, "--", *command], capture_output=True, text=True,
                          timeout=60, cwd="/")


def assert_private(folder: Path, pg_port: str, secrets: list[str]) -> None:
    """Another local user reads no secret (processes, files) and connects to no database role;
    MLflow's own role, even with its password, is no superuser."""
    processes = as_other_user("ps", "-ww", "-eo", "args")  # -ww: whole lines
    assert processes.returncode == 0 and "mlflow server" in processes.stdout, processes.stderr
    assert not PASSWORD_IN_URI.search(processes.stdout), PASSWORD_IN_URI.search(processes.stdout).group()
    for secret in secrets:
        assert secret not in processes.stdout
    for path in [folder, *folder.rglob("*")]:
        try:
            mode = path.lstat().st_mode & 0o777
        except FileNotFoundError:  # PostgreSQL replaced it while we walked (pg_internal.init, say)
            continue
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        elif path.is_file():
            assert mode == 0o600, (path, oct(mode))
    listing = as_other_user("ls", str(folder))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    for path in folder.iterdir():
        if path.is_file():
            assert as_other_user("cat", str(path)).returncode != 0, path
    server_pid = (folder / "mlflow.pid").read_text().strip()
    assert as_other_user("cat", f"/proc/{server_pid}/environ").returncode != 0
    psql = pg_program("psql")
    tcp = ["-h", "127.0.0.1", "-p", pg_port]
    for user, database in (("mlflow", "mlflow"), ("mlflow", "postgres"), ("postgres", "postgres"),
                           ("postgres", "mlflow")):
        for where in (tcp, ["-h", str(folder), "-p", pg_port]):
            tried = as_other_user(psql, "-w", *where, "-U", user, "-d", database, "-c", "SELECT 1")
            assert tried.returncode != 0 and "failed" in tried.stderr, (user, database, tried.stdout)
    # Who knows MLflow's password (the owner) gets its database and nothing more:
    with_password = {**os.environ, "PGPASSFILE": str(folder / "mlflow-pgpass")}
    as_mlflow = [psql, "-w", *tcp, "-U", "mlflow", "-d", "mlflow", "-tAc"]
    role = subprocess.run([*as_mlflow, "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                           "WHERE rolname = current_user"], env=with_password, capture_output=True, text=True)
    assert role.stdout.strip() == "f|f|f", role.stderr
    program = subprocess.run([*as_mlflow, "COPY (SELECT 1) TO PROGRAM 'true'"], env=with_password,
                             capture_output=True, text=True)
    assert "must be superuser" in program.stderr, program.stderr
    superuser = subprocess.run([psql, "-w", *tcp, "-U", "postgres", "-d", "postgres", "-c", "SELECT 1"],
                               env=with_password, capture_output=True, text=True)
    assert "no pg_hba.conf entry" in superuser.stderr, superuser.stderr


@pytest.fixture(scope="module")
def started_server():
    """(uri, folder, env) of a server started by deploy/tracking-server.sh for this module."""
    if not have_postgres():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    # Not under pytest's tmp folders: those are private to root, and PostgreSQL runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="mnist-tracking-server-"))
    env = server_env()
    try:
        uri, _ = start(SCRIPT, folder, env)
        yield uri, folder, env
    finally:
        stop(SCRIPT, folder, env)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(started_server) -> str:
    return started_server[0]


@pytest.mark.slow
@pytest.mark.server
def test_another_user_can_neither_read_the_database_password_nor_connect(started_server):
    _, folder, env = started_server
    assert_private(folder, env["PG_PORT"], secrets=[])


def train(uri: str, data_dir, cwd, *args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}  # the name decides
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="server-test")
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_tracking", "train", "--data-dir", str(data_dir), "--batch-size", "32", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
@pytest.mark.server
def test_training_through_the_server_stores_everything(server, data_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    process = train(server, data_dir, tmp_path, "--epochs", "2", "--seed", "1")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    assert not list(tmp_path.iterdir()), "nothing is written to the working directory"

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("server-test")
    [run] = client.search_runs([experiment.experiment_id], filter_string="params.seed = '1'")
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]

    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    for path in ("checkpoints/best.pt", "checkpoints/last.pt", "features/test.npz", "features/val.npz",
                 "summary.json", "plots/training_curves.png", "plots/confusion_matrix.png"):
        assert (local / path).stat().st_size > 0, path
    torch.load(local / "checkpoints/best.pt", weights_only=True)
    assert np.load(local / "features/test.npz", allow_pickle=False)["features"].shape[1] == 512

    import mlflow

    previous = mlflow.get_tracking_uri()  # the session's temporary store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", previous)  # restored after: MLflow 3's set_tracking_uri exports it
    mlflow.set_tracking_uri(server)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        answer = model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32))
        assert np.asarray(answer["probabilities"]).shape == (3, 10)
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.slow
@pytest.mark.server
def test_parallel_trainings_keep_every_metric(server, data_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    epochs, seeds = 2, (11, 12, 13, 14)
    processes = [train(server, data_dir, tmp_path, "--epochs", str(epochs), "--seed", str(s)) for s in seeds]
    for process in processes:
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-2000:]

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("server-test")
    for seed in seeds:
        [run] = client.search_runs([experiment.experiment_id], filter_string=f"params.seed = '{seed}'")
        assert run.info.status == "FINISHED"
        counts = {name: len(client.get_metric_history(run.info.run_id, name)) for name in EPOCH_METRICS}
        assert counts == {name: epochs for name in EPOCH_METRICS}, (seed, counts)


@pytest.fixture(scope="module")
def auth_server():
    """(uri, folder, env) of an AUTH=1 server (MLflow's basic-auth app) for this module."""
    if not have_postgres():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    folder = Path(tempfile.mkdtemp(prefix="mnist-tracking-auth-"))
    env = server_env(AUTH="1")
    try:
        uri, _ = start(SCRIPT, folder, env)
        yield uri, folder, env
    finally:
        stop(SCRIPT, folder, env)
        shutil.rmtree(folder, ignore_errors=True)


def admin_of(folder: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": (folder / "admin-password").read_text().strip()}


@pytest.fixture(scope="module")
def admins_run(auth_server, data_dir, tmp_path_factory) -> str:
    """The id of a training the admin ran through the AUTH=1 server with their credentials."""
    from mlflow.tracking import MlflowClient

    uri, folder, _ = auth_server
    with pytest.MonkeyPatch.context() as patch:
        for name, value in admin_of(folder).items():
            patch.setenv(name, value)  # train() passes os.environ on; the client below reads them too
        trained = train(uri, data_dir, tmp_path_factory.mktemp("admin"), "--epochs", "1", "--max-samples", "300",
                        "--seed", "9")
        _, err = trained.communicate(timeout=600)
        assert trained.returncode == 0, err[-2000:]
        client = MlflowClient(tracking_uri=uri)
        [run] = client.search_runs([client.get_experiment_by_name("server-test").experiment_id], "params.seed = '9'")
    return run.info.run_id


@pytest.mark.slow
@pytest.mark.server
def test_the_basic_auth_server_refuses_anonymous_clients_and_serves_the_admin(auth_server, data_dir, tmp_path):
    """AUTH=1: MLflow's basic-auth app with a generated admin password (MLflow 3.17 starts it only
    with one) and its secrets private; anonymous requests get 401, an anonymous training one line."""
    uri, folder, env = auth_server
    password = admin_of(folder)["MLFLOW_TRACKING_PASSWORD"]
    secret_key = (folder / "flask-secret").read_text().strip()
    assert_private(folder, env["PG_PORT"], secrets=[password, secret_key])
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert refused.value.code == 401

    anonymous = train(uri, data_dir, tmp_path, "--epochs", "1", "--max-samples", "100")
    _, err = anonymous.communicate(timeout=600)
    assert anonymous.returncode != 0 and "Traceback" not in err, err[-2000:]
    [line] = [line for line in err.splitlines() if line.startswith("Error:")]
    assert line.startswith("Error: tracking store error") and "401" in line, line


@pytest.mark.slow
@pytest.mark.server
def test_the_admin_trains_through_the_basic_auth_server_and_its_files_stay_private(auth_server, admins_run):
    """With the admin's credentials a training runs as usual; basic_auth.db, written by then, is private too."""
    from mlflow.tracking import MlflowClient

    uri, folder, env = auth_server
    with pytest.MonkeyPatch.context() as patch:
        for name, value in admin_of(folder).items():
            patch.setenv(name, value)
        run = MlflowClient(tracking_uri=uri).get_run(admins_run)
    assert run.info.status == "FINISHED" and run.data.metrics["epochs_run"] == 1
    secrets = [admin_of(folder)["MLFLOW_TRACKING_PASSWORD"], (folder / "flask-secret").read_text().strip()]
    assert_private(folder, env["PG_PORT"], secrets=secrets)


def project_as(uri: str, credentials: dict[str, str], cwd, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`mnist-tracking project` as the user of `credentials`, with only `env`'s experiment choice."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_EXPERIMENT", "MLFLOW_RUN_ID"))}
    return subprocess.run([sys.executable, "-m", "mnist_tracking", "project", "--methods", "pca", *args],
                          cwd=cwd, env={**clean, "MLFLOW_TRACKING_URI": uri, **credentials, **env},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.server
def test_a_reader_of_another_users_run_projects_it_into_an_experiment_of_their_own(auth_server, admins_run, tmp_path,
                                                                                   monkeypatch):
    """Issue 25, case 9: a user who may read the admin's training run (default_permission READ) but
    not write it gets the whole projection in their own experiment and one warning; the training
    run is left as it was. Without an experiment of their own, one line before any work."""
    import base64
    import json
    import urllib.request

    from mlflow.tracking import MlflowClient

    uri, folder, _ = auth_server
    admin = admin_of(folder)
    for name, value in admin.items():
        monkeypatch.setenv(name, value)  # this test's client acts as the admin
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(admins_run)
    owners = run.info.experiment_id
    before = {path.path for path in client.list_artifacts(run.info.run_id)}

    reader = {"MLFLOW_TRACKING_USERNAME": "reader", "MLFLOW_TRACKING_PASSWORD": os.urandom(12).hex()}
    basic = base64.b64encode(f"{admin['MLFLOW_TRACKING_USERNAME']}:{admin['MLFLOW_TRACKING_PASSWORD']}".encode())
    request = urllib.request.Request(  # the basic-auth app's own API: the admin creates a user
        f"{uri}/api/2.0/mlflow/users/create", method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Basic {basic.decode()}"},
        data=json.dumps({"username": reader["MLFLOW_TRACKING_USERNAME"],
                         "password": reader["MLFLOW_TRACKING_PASSWORD"]}).encode())
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
        assert response.status == 200

    # No experiment chosen: the projection run would go into the admin's experiment. One line, no run.
    refused = project_as(uri, reader, tmp_path, "--run-id", run.info.run_id)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert f"may read run {run.info.run_id}" in line and "MLFLOW_EXPERIMENT_NAME" in line, line
    assert "Projecting" not in refused.stdout  # before any work
    assert {r.data.tags.get("mnist_tracking.kind") for r in client.search_runs([owners])} == {"training"}

    # Their own experiment: the projection is whole there, the training run is not written.
    done = project_as(uri, reader, tmp_path, "--run-id", run.info.run_id, MLFLOW_EXPERIMENT_NAME="readers-projections")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [warning] = [line for line in done.stdout.splitlines() if line.startswith("Warning: this user may read")]
    assert run.info.run_id in warning and "403" in warning
    mine = client.get_experiment_by_name("readers-projections").experiment_id
    [projection] = client.search_runs([mine])
    assert projection.info.status == "FINISHED" and projection.data.tags["source_run_id"] == run.info.run_id
    assert "pca_knn_acc" in projection.data.metrics
    logged = {path.path for path in client.list_artifacts(projection.info.run_id, "projections")}
    assert {"projections/pca.png", "projections/pca.html", "projections/pca.csv", "projections/overview.png"} <= logged
    after = client.get_run(run.info.run_id)
    assert {path.path for path in client.list_artifacts(run.info.run_id)} == before  # no projections/ added
    assert "pca_knn_acc" not in after.data.metrics and "projection_views_from" not in after.data.tags


@pytest.mark.slow
@pytest.mark.server
def test_a_folder_of_the_earlier_script_is_migrated_on_its_next_start(tmp_path):
    """The script before issue 25 made `mlflow` the cluster's superuser and put its password on the
    command line: the next start moves the data to a role that owns only its database, keeps every
    run, and leaves nothing open (here the folder was made with umask 022, as a user's would be)."""
    from mlflow.tracking import MlflowClient

    if not have_postgres():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    parent = Path(tempfile.mkdtemp(prefix="mnist-tracking-migrate-"))
    parent.chmod(0o755)  # PostgreSQL (`postgres`) must reach the folder the old script makes in it
    folder = parent / "server"
    env = server_env()
    try:
        uri, _ = start(OLD_SCRIPT, folder, {**env, "AUTH": "1"})
        client = MlflowClient(tracking_uri=uri)
        credentials = {"MLFLOW_TRACKING_USERNAME": "admin",
                       "MLFLOW_TRACKING_PASSWORD": (folder / "admin-password").read_text().strip()}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in credentials.items():
                patch.setenv(name, value)
            experiment = client.create_experiment("before-migration")
            run = client.create_run(experiment)
            client.log_metric(run.info.run_id, "val_acc", 0.5, step=1)
            client.set_terminated(run.info.run_id)
            stop(OLD_SCRIPT, folder, env)
            (folder / "mlflow.log").chmod(0o644)  # as the old script left it on its later starts

            uri, messages = start(SCRIPT, folder, {**env, "AUTH": "1"})
            assert [line.split(":")[0] for line in messages.splitlines()] == [
                f"migrating {folder}", f"migrated {folder}"], messages
            assert not (folder / "pg-password").exists()
            [metric] = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "val_acc")
            assert metric.value == 0.5
            assert_private(folder, env["PG_PORT"], secrets=list(credentials.values()))
    finally:
        stop(SCRIPT, folder, env)
        shutil.rmtree(parent, ignore_errors=True)


def test_the_deploy_script_answers_an_unknown_command_with_its_usage(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "restart", str(tmp_path / "server")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "deploy/tracking-server.sh start [DIR]" in result.stdout and "AUTH=1" in result.stdout
    assert not (tmp_path / "server").exists()  # nothing made for a command it does not know
