"""The `register` entry point and `register_as`: a real Model Registry in the temporary store."""

import os
import signal
import subprocess
import time
import uuid

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST, N_TEST, REPO, fake_digits
from helpers import free_port, run_cli
from mnist_tracking.config import TrainConfig
from mnist_tracking.errors import UserError
from mnist_tracking.experiments import best_training_run
from mnist_tracking.commands.register import register as register_command
from mnist_tracking.config import RegisterConfig
from mnist_tracking.registry import register_run
from mnist_tracking.training_run import train_and_log
from mnist_tracking.runs import KIND_TAG

SERVE_START_TIMEOUT = 180  # seconds; `mlflow models serve` takes 10-30 s on an idle machine
PIXEL_MAX = 255.0  # the fake IDX files hold uint8 pixels; the model takes [0, 1]


def unique_name() -> str:
    return f"convnet-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def runs(data_dir):
    """An experiment with a good and a bad finished training run, plus decoys that must be ignored:
    a projection run and a FAILED training run, both with better metrics than any real run."""
    client = MlflowClient()
    name = f"register-{uuid.uuid4().hex[:8]}"
    experiment_id = mlflow.create_experiment(name)
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        quiet = dict(echo=lambda line: None, progress=False)
        good = train_and_log(TrainConfig(data_dir=str(data_dir), **FAST), **quiet)
        bad = train_and_log(TrainConfig(data_dir=str(data_dir), **{**FAST, "epochs": 1}, lr=1e-6), **quiet)
    finally:
        mlflow.set_experiment("Default")
    for kind, status in (("projection", "FINISHED"), ("training", "FAILED")):
        decoy = client.create_run(experiment_id, tags={KIND_TAG: kind}).info.run_id
        for metric, value in (("best_val_acc", 2.0), ("best_val_loss", -1.0)):
            client.log_metric(decoy, metric, value)
        client.set_terminated(decoy, status)
    metrics = {run_id: client.get_run(run_id).data.metrics for run_id in (good, bad)}
    # The two runs differ in both directions, so a flipped comparison picks the other one.
    assert metrics[good]["best_val_acc"] > metrics[bad]["best_val_acc"]
    assert metrics[good]["best_val_loss"] < metrics[bad]["best_val_loss"]
    return {"experiment_id": experiment_id, "experiment": name, "good": good, "bad": bad}


@pytest.mark.parametrize("metric", ["best_val_acc", "test_acc", "best_val_loss", "test_loss"])
def test_best_run_is_highest_accuracy_or_lowest_loss(runs, metric):
    assert best_training_run(runs["experiment_id"], metric).info.run_id == runs["good"]


def test_champion_rule_worse_model_does_not_take_the_alias(runs):
    name, lines = unique_name(), []
    first = register_run(runs["good"], name, echo=lines.append)
    assert (first.version, first.created, first.has_alias) == (1, True, True)
    second = register_run(runs["bad"], name, echo=lines.append)
    assert (second.version, second.created, second.has_alias) == (2, True, False)
    assert MlflowClient().get_model_version_by_alias(name, "champion").version == 1
    assert "No alias: 'champion' stays on version 1" in lines[-2]  # the output says why


def test_champion_rule_better_model_takes_the_alias_by_loss(runs):
    name = unique_name()
    register_run(runs["bad"], name, metric="best_val_loss", alias="best", echo=lambda line: None)
    better = register_run(runs["good"], name, metric="best_val_loss", alias="best", echo=lambda line: None)
    assert better.has_alias and "beats version 1" in better.alias_reason
    assert MlflowClient().get_model_version_by_alias(name, "best").run_id == runs["good"]


def test_registering_a_run_twice_reuses_its_version(runs):
    name = unique_name()
    first = register_command(RegisterConfig(experiment=runs["experiment"], name=name), echo=lambda line: None)
    again = register_command(RegisterConfig(run_id=runs["good"], name=name), echo=lambda line: None)
    assert (again.version, again.created, again.has_alias) == (first.version, False, True)
    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 1


def test_version_links_the_logged_model_and_carries_tags(runs):
    name = unique_name()
    registration = register_command(RegisterConfig(experiment=runs["experiment"], name=name), echo=lambda line: None)
    version = MlflowClient().get_model_version(name, registration.version)
    [model] = mlflow.search_logged_models(
        experiment_ids=[runs["experiment_id"]], filter_string=f"source_run_id = '{runs['good']}'", output_format="list"
    )
    assert version.run_id == runs["good"] and version.source == f"models:/{model.model_id}"
    metrics = MlflowClient().get_run(runs["good"]).data.metrics
    assert version.tags["source_run_id"] == runs["good"] and version.tags["metric"] == "best_val_acc"
    assert float(version.tags["metric_value"]) == metrics["best_val_acc"]
    assert runs["good"] in version.description and "best_val_acc" in version.description


def test_register_command_prints_the_version_and_a_ui_link(runs, tmp_path):
    name = unique_name()
    result = run_cli("register", "--experiment", runs["experiment"], "--name", name, cwd=tmp_path,
                     env={"MNIST_TRACKING_UI_PORT": "5123"})
    assert result.returncode == 0, result.stderr
    assert f"as {name} version 1" in result.stdout and runs["good"] in result.stdout
    # the link and the hint name the same port, the one asked for
    assert f"http://127.0.0.1:5123/#/models/{name}/versions/1?workflowType=machine_learning" in result.stdout
    assert "mlflow ui --host 127.0.0.1 --port 5123" in result.stdout
    # a first registration: none of MLflow's "Registered model ... already exists" from register_model
    assert "already exists" not in result.stdout + result.stderr


def test_register_as_registers_the_training_run(data_dir, fresh_experiment):
    name, lines = unique_name(), []
    config = TrainConfig(data_dir=str(data_dir), **{**FAST, "epochs": 1}, register_as=name)
    run_id = train_and_log(config, echo=lines.append, progress=False)
    assert MlflowClient().get_model_version_by_alias(name, "champion").run_id == run_id
    assert any(f"as {name} version 1" in line for line in lines)


@pytest.fixture
def no_model_run(fresh_experiment):
    """A finished training run with metrics but no logged model (one whose model was never logged),
    in an experiment of its own: the fresh one stays without training runs."""
    client = MlflowClient()
    elsewhere = client.create_experiment(f"no-model-{fresh_experiment}-{os.urandom(3).hex()}")
    run_id = client.create_run(elsewhere, tags={KIND_TAG: "training"}).info.run_id
    client.log_metric(run_id, "best_val_acc", 0.5)
    client.set_terminated(run_id)
    return run_id


BAD_INPUT = {  # case: (what the user passes, what the one-line error says)
    "unknown experiment": (dict(experiment="no-such-experiment"), "unknown experiment 'no-such-experiment'"),
    "no training runs": (dict(experiment="{empty}"), "has no finished training runs"),
    "metric no run has": (dict(experiment="{experiment}", metric="best_val_f1"), "has the metric 'best_val_f1'; choose one of"),
    "unknown run": (dict(run_id="feedc0ffee"), "unknown run_id 'feedc0ffee'"),
    "run without a model": (dict(run_id="{no_model_run}"), "has no logged model 'model'"),
    "run without the metric": (dict(run_id="{good}", metric="best_val_f1"), "has no metric 'best_val_f1'"),
    "reserved alias": (dict(experiment="{experiment}", alias="latest"), "alias 'latest' is not allowed"),
}


def bad_input(case, runs, no_model_run, experiment_id):
    values = {**runs, "no_model_run": no_model_run, "empty": MlflowClient().get_experiment(experiment_id).name}
    kwargs, expected = BAD_INPUT[case]
    return {k: v.format(**values) for k, v in kwargs.items()}, expected


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_one_line_user_error(case, runs, no_model_run, fresh_experiment):
    # `fresh_experiment` holds only `no_model_run`, which is no training run.
    kwargs, expected = bad_input(case, runs, no_model_run, fresh_experiment)
    name = unique_name()
    with pytest.raises(UserError) as error:
        register_command(RegisterConfig(name=name, **kwargs), echo=lambda line: None)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert MlflowClient().search_registered_models(f"name = '{name}'") == []  # nothing half-written


@pytest.mark.parametrize("case", ["no training runs", "run without a model"])
def test_register_command_shows_bad_input_as_one_line(case, runs, no_model_run, fresh_experiment, tmp_path):
    kwargs, expected = bad_input(case, runs, no_model_run, fresh_experiment)
    options = [arg for key, value in kwargs.items() for arg in (f"--{key.replace('_', '-')}", value)]
    result = run_cli("register", *options, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr


@pytest.mark.slow
def test_mlflow_run_register_gives_version_1_to_the_better_run(runs, tmp_path):
    name = unique_name()
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "-e", "register",
         "--experiment-name", runs["experiment"], "-P", f"name={name}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        # set_experiment() exports MLFLOW_EXPERIMENT_ID, which `mlflow run` reads as --experiment-id
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    champion = client.get_model_version_by_alias(name, "champion")
    assert (champion.version, champion.run_id) == (1, runs["good"])
    # The run `mlflow run` wrapped the command in says what it registered.
    [wrapper] = client.search_runs([runs["experiment_id"]], f"tags.`{KIND_TAG}` = 'registration'")
    assert wrapper.info.status == "FINISHED" and wrapper.data.tags["registered_model_name"] == name
    good = client.get_run(runs["good"])  # named after the run it registered, and nested under it
    assert wrapper.info.run_name == f"register-of-{good.info.run_name}"
    assert wrapper.data.tags["mlflow.parentRunId"] == runs["good"] == wrapper.data.tags["source_run_id"]


def post(url: str, body: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def wait_until_serving(process, base: str, log) -> None:
    import urllib.request

    deadline = time.monotonic() + SERVE_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer /ping in {SERVE_START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_served_champion_answers_like_the_model_and_rejects_bad_input(runs, tmp_path, monkeypatch):
    import json

    name = unique_name()
    register_run(runs["good"], name, echo=lambda line: None)
    uri = f"models:/{name}@champion"
    images, labels = fake_digits(N_TEST, seed=1)  # the fake test split, as IDX pixels
    x = (images.astype(np.float32) / PIXEL_MAX)[:, None]  # (N, 1, 28, 28) in [0, 1]
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    expected = mlflow.pyfunc.load_model(uri).predict(x)  # in process, pickle-free

    port, log = free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_until_serving(process, base, log)
        status, answer = post(f"{base}/invocations", json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200, answer
        scores = np.asarray(answer["predictions"], dtype=np.float32)
        assert scores.shape == (N_TEST, 10)
        assert (scores.argmax(1) == expected.argmax(1)).all()
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
        test_acc = MlflowClient().get_run(runs["good"]).data.metrics["test_acc"]
        assert (scores.argmax(1) == labels).mean() == pytest.approx(test_acc)

        for bad in (
            {"inputs": x[:, 0].tolist()},  # (N, 28, 28): no channel dimension
            {"inputs": [[[["dark"] * 28] * 28]]},  # strings, not floats
            {"inputs": {"image": x[:1].tolist()}},  # a named input the signature does not have
            {"inputs": (x[:2] * PIXEL_MAX).tolist()},  # bytes, not [0, 1]: refused by ServedConvNet
            {"inputs": [[[[None] * 28] * 28]]},  # JSON null arrives as NaN
        ):
            status, answer = post(f"{base}/invocations", json.dumps(bad).encode())
            assert 400 <= status < 500, (status, answer)
            assert answer.get("message"), answer
        status, _ = post(f"{base}/invocations", b"{not json")
        assert 400 <= status < 500
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_the_registry_lock_file_is_only_written_into_a_folder_we_own(tmp_path):
    from mnist_tracking.registry import LOCK_SUFFIX, sqlite_lock_file

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder in (ours, theirs):
        folder.mkdir()
        (folder / "mlflow.db").write_bytes(b"")
    assert sqlite_lock_file(str(ours / "mlflow.db")) == f"{ours / 'mlflow.db'}{LOCK_SUFFIX}"
    if os.getuid() == 0:  # root may write anywhere: a folder of another user
        os.chown(theirs, 65534, 65534)
    else:
        theirs.chmod(0o555)
    try:
        # somebody else's folder: the database file itself is locked, no file is left beside it
        assert sqlite_lock_file(str(theirs / "mlflow.db")) == str(theirs / "mlflow.db")
    finally:
        theirs.chmod(0o755)
    assert ".registry.lock" in (REPO / ".gitignore").read_text()
