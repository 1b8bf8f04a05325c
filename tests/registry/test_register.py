"""The `register` entry point and `register_as`: a real Model Registry in the temporary store."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from fakes import FAST, N_TEST, REPO, fake_digits
from helpers import (
    SUBPROCESS_ENV,
    TINY,
    free_port,
    invoke,
    one_error_line,
    run_in_process,
    runs_of,
)
from mlflow.tracking import MlflowClient

from mnist_tracking.core.config import RegisterConfig, TrainConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.registry.experiments import best_training_run
from mnist_tracking.registry.register import register as register_command
from mnist_tracking.registry.register import register_run
from mnist_tracking.tracking.runs import KIND_TAG
from mnist_tracking.tracking.train import train_and_log

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
    # What it answers, so that a client of @champion can tell it from an older version (logits):
    assert version.tags["output"] == "probabilities" and "Answers probabilities." in version.description
    description = MlflowClient().get_registered_model(name).description
    assert '{"probabilities": (N, 10)}' in description and "at most 1000 per request" in description
    assert "`logits`" in description and "without the tag" in description
    # The logged model names its versions, as mlflow.register_model tags it: the runs table's
    # Models column shows "<name> v1" from this tag, else only "model".
    tagged = json.loads(MlflowClient().get_logged_model(model.model_id).tags["mlflow.modelVersions"])
    assert {"name": name, "version": str(registration.version)} in tagged


def test_registering_updates_an_older_registered_models_description(runs):
    name = unique_name()
    MlflowClient().create_registered_model(name, description="(N, 10) class scores (logits)")
    register_run(runs["good"], name, echo=lambda line: None)
    assert "probabilities" in MlflowClient().get_registered_model(name).description


def test_register_command_prints_the_version_and_a_ui_link(runs, tmp_path):
    name = unique_name()
    result = run_in_process("register", "--experiment", runs["experiment"], "--name", name,
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
    from mnist_tracking.registry.register import train_and_register as train

    config = TrainConfig(data_dir=str(data_dir), **{**FAST, "epochs": 1}, register_as=name)
    run_id = train(config, echo=lines.append, progress=False)
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
    "metric no run has": (dict(experiment="{experiment}", metric="best_val_f1"),
                          "has the metric 'best_val_f1'; choose one of"),
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
    result = run_in_process("register", *options)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr


def test_the_register_entry_point_gives_version_1_to_the_better_run(runs):
    # `mlflow run . -e register`: its command line from MLproject, under the run MLflow made (helpers.as_mlflow_run).
    from helpers import as_mlflow_run

    name = unique_name()
    result, made = as_mlflow_run("register", runs["experiment_id"], name=name)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    champion = client.get_model_version_by_alias(name, "champion")
    assert (champion.version, champion.run_id) == (1, runs["good"])
    # The run `mlflow run` wrapped the command in says what it registered.
    [wrapper] = client.search_runs([runs["experiment_id"]], f"tags.`{KIND_TAG}` = 'registration'")
    assert wrapper.info.run_id == made and wrapper.info.status == "FINISHED"
    assert wrapper.data.tags["registered_model_name"] == name
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


def assert_one_line_refusal(status: int, answer: dict, reason: str) -> None:
    """A 400 whose message is the model's one-line reason: no stack trace, no server path, no data."""
    assert status == 400, (status, answer)
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in answer, answer
    message = answer["message"]
    assert "\n" not in message and reason in message, message
    assert not any(leak in message for leak in ("site-packages", "/root", ".py", "Traceback")), message


@pytest.mark.slow
@pytest.mark.server
def test_served_champion_answers_probabilities_and_refuses_bad_input_in_one_line(runs, tmp_path, monkeypatch):
    """`mlflow models serve` of the registered model, for real, with pickles refused: class
    probabilities for good images; a one-line 400 for bad pixels and for too many images."""
    import json

    from mnist_tracking.tracking.served_model import MAX_IMAGES

    name = unique_name()
    register_run(runs["good"], name, echo=lambda line: None)
    uri = f"models:/{name}@champion"
    images, labels = fake_digits(N_TEST, seed=1)  # the fake test split, as IDX pixels
    x = (images.astype(np.float32) / PIXEL_MAX)[:, None]  # (N, 1, 28, 28) in [0, 1]
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # for the server too
    expected = mlflow.pyfunc.load_model(uri).predict(x)["probabilities"]  # in process, pickle-free

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
        assert list(answer["predictions"]) == ["probabilities"]
        probabilities = np.asarray(answer["predictions"]["probabilities"], dtype=np.float32)
        assert probabilities.shape == (N_TEST, 10) and (probabilities >= 0).all()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-5)
        test_acc = MlflowClient().get_run(runs["good"]).data.metrics["test_acc"]
        assert (probabilities.argmax(1) == labels).mean() == pytest.approx(test_acc)

        pixels = "pixels must be numbers in [0, 1] (image bytes / 255)"
        for bad in ((x[:2] * PIXEL_MAX).tolist(),  # bytes, not [0, 1]
                    [[[[None] * 28] * 28]]):  # JSON null arrives as NaN
            assert_one_line_refusal(*post(f"{base}/invocations", json.dumps({"inputs": bad}).encode()), pixels)
        too_many = np.zeros((MAX_IMAGES + 1, 1, 28, 28), dtype=np.uint8).tolist()
        assert_one_line_refusal(*post(f"{base}/invocations", json.dumps({"inputs": too_many}).encode()),
                                f"{MAX_IMAGES + 1} images in one request; at most {MAX_IMAGES}: send them in parts")
        status, answer = post(f"{base}/invocations",  # exactly the limit is answered
                              json.dumps({"inputs": np.zeros((MAX_IMAGES, 1, 28, 28), np.uint8).tolist()}).encode())
        assert status == 200 and len(answer["predictions"]["probabilities"]) == MAX_IMAGES, status

        for bad in (  # refused by MLflow's own check of the signature, before the model runs
            {"inputs": x[:, 0].tolist()},  # (N, 28, 28): no channel dimension
            {"inputs": [[[["dark"] * 28] * 28]]},  # strings, not floats
            {"inputs": {"image": x[:1].tolist()}},  # a named input the signature does not have
        ):
            status, answer = post(f"{base}/invocations", json.dumps(bad).encode())
            assert status == 400 and answer.get("message") and "stack_trace" not in answer, (status, answer)
        status, _ = post(f"{base}/invocations", b"{not json")
        assert status == 400
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def copy_of_model(trained_run: str, accuracy: float, experiment_id: str) -> str:
    """A FINISHED training run with `best_val_acc` = accuracy and a copy of `trained_run`'s logged model."""
    [source] = mlflow.search_logged_models(experiment_ids=[MlflowClient().get_run(trained_run).info.experiment_id],
                                           filter_string=f"source_run_id = '{trained_run}'", output_format="list")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tag(KIND_TAG, "training")
        mlflow.log_metric("best_val_acc", accuracy)
        model = mlflow.initialize_logged_model(name="model", source_run_id=run.info.run_id)
        target = Path(model.artifact_location.removeprefix("file://"))
        shutil.copytree(Path(source.artifact_location.removeprefix("file://")), target, dirs_exist_ok=True)
        mlflow.finalize_logged_model(model.model_id, "READY")
    return run.info.run_id


@pytest.mark.slow
def test_concurrent_registrations_leave_the_alias_on_the_best_model(trained_run, fresh_experiment, tmp_path):
    accuracies = [0.91, 0.97, 0.93, 0.95]  # the best neither first nor last
    runs = [copy_of_model(trained_run, accuracy, fresh_experiment) for accuracy in accuracies]
    best = runs[accuracies.index(max(accuracies))]
    code = ("import sys; from mnist_tracking.registry.register import register_run; "
            "register_run(sys.argv[1], sys.argv[2], echo=lambda l: None)")
    for round_ in range(2):  # six registrations racing, twice: each round a fresh model name
        name = f"race-{fresh_experiment}-{round_}"
        processes = [subprocess.Popen([sys.executable, "-c", code, run_id, name], cwd=tmp_path,
                                      env={**os.environ, **SUBPROCESS_ENV}, stderr=subprocess.PIPE, text=True)
                     for run_id in runs]
        for process in processes:
            assert process.wait(timeout=600) == 0, process.stderr.read()[-2000:]
        holder = MlflowClient().get_model_version_by_alias(name, "champion")
        assert holder.run_id == best, (round_, holder.run_id, best)
        assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == len(runs)  # one version each


def test_an_invalid_register_as_fails_before_training(fresh_experiment, data_dir):
    result = invoke("train", "--data-dir", str(data_dir), *TINY, "--register-as", "a/b")
    assert "name 'a/b' is not allowed" in one_error_line(result.stderr)
    assert runs_of(fresh_experiment) == []  # not after a whole training


def fake_training(metrics: dict[str, float]) -> str:
    with mlflow.start_run() as run:
        mlflow.set_tag(KIND_TAG, "training")
        mlflow.log_metrics(metrics)
    return run.info.run_id


def test_the_best_run_is_never_one_with_an_impossible_metric(fresh_experiment):
    from mnist_tracking.registry.experiments import best_training_run
    fake_training({"best_val_acc": 2.0})
    fake_training({"best_val_acc": math.nan})
    good = fake_training({"best_val_acc": 0.97})
    assert best_training_run(fresh_experiment, "best_val_acc").info.run_id == good
    fake_training({"best_val_loss": -1.0})
    low = fake_training({"best_val_loss": 0.05})
    assert best_training_run(fresh_experiment, "best_val_loss").info.run_id == low


def test_registering_an_impossible_metric_is_one_line(fresh_experiment):
    run_id = fake_training({"best_val_acc": 2.0})
    result = invoke("register", "--run-id", run_id, "--name", f"impossible-{run_id[:6]}")
    assert "cannot be registered by best_val_acc: its best_val_acc is 2.0, outside [0, 1]" in one_error_line(
        result.stderr)


def test_a_holder_with_a_nan_metric_loses_the_alias_to_a_valid_one(trained_run, fresh_experiment):
    from mnist_tracking.registry.register import register_run
    client, name = MlflowClient(), f"nan-holder-{trained_run[:6]}"
    nan_run = fake_training({"best_val_acc": math.nan})
    client.create_registered_model(name)
    [model] = mlflow.search_logged_models(experiment_ids=[MlflowClient().get_run(trained_run).info.experiment_id],
                                          filter_string=f"source_run_id = '{trained_run}'", output_format="list")
    held = client.create_model_version(name, f"models:/{model.model_id}", run_id=nan_run)
    client.set_registered_model_alias(name, "champion", held.version)
    registration = register_run(trained_run, name, echo=lambda line: None)
    assert registration.has_alias and "not a valid value" in registration.alias_reason
    assert int(client.get_model_version_by_alias(name, "champion").version) == registration.version


@pytest.fixture
def planted_model(trained_run, fresh_experiment):
    """(run id, local folder of its logged model): a finished training with a copy of a real
    training's model, which a test replaces."""
    run_id = copy_of_model(trained_run, 0.5, fresh_experiment)
    [model] = mlflow.search_logged_models(experiment_ids=[fresh_experiment],
                                          filter_string=f"source_run_id = '{run_id}'", output_format="list")
    return run_id, Path(model.artifact_location.removeprefix("file://"))


def pt2_with_pickled_inputs(path: Path) -> None:
    """A pt2 archive as torch.export.save writes it by default: its example inputs pickled."""
    import torch

    from mnist_tracking.core.model import ConvNet

    torch.export.save(torch.export.export(ConvNet().eval(), (torch.rand(2, 1, 28, 28),)), str(path))


def plant_code_path(mlmodel: Path) -> None:
    """An MLmodel whose code folder MLflow would put first on sys.path (a numpy.py there would run)."""
    import yaml

    config = yaml.safe_load(mlmodel.read_text())
    config["flavors"]["python_function"]["code"] = "code"
    mlmodel.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("plant, says", [
    (lambda model: (model / "artifacts/network.pt2").rename(model / "artifacts/network.pkl"),
     "holds artifacts/network.pkl, which serving would unpickle"),
    (lambda model: (model / "served_model.py").write_text("import os; os.system('touch /tmp/owned')\n"),
     "served_model.py is not this mnist-tracking's (it would run on load)"),
    (lambda model: pt2_with_pickled_inputs(model / "artifacts/network.pt2"),
     "the network file holds network/data/sample_inputs/model.pt, which loading it would unpickle"),
    (lambda model: plant_code_path(model / "MLmodel"), "brings code of its own (code)"),
], ids=["pickle", "foreign-code", "pickled-pt2-inputs", "code-path"])
def test_register_refuses_a_model_that_would_unpickle_or_run_foreign_code(planted_model, plant, says):
    run_id, model = planted_model
    plant(model)
    result = invoke("register", "--run-id", run_id, "--name", f"planted-{run_id[:6]}")
    assert says in one_error_line(result.stderr)


def test_loading_a_planted_network_is_refused_before_anything_is_unpickled(planted_model, monkeypatch):
    run_id, model = planted_model
    pt2_with_pickled_inputs(model / "artifacts/network.pt2")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(mlflow.exceptions.MlflowException, match="which loading it would unpickle; refusing to load it"):
        mlflow.pyfunc.load_model(f"runs:/{run_id}/model")


def test_register_refuses_runs_that_are_not_finished_trainings(fresh_experiment):
    with mlflow.start_run() as projection:
        mlflow.set_tag(KIND_TAG, "projection")
    result = invoke("register", "--run-id", projection.info.run_id)
    assert "is a projection run, not a training run" in one_error_line(result.stderr)
    running = MlflowClient().create_run(fresh_experiment, tags={KIND_TAG: "training"})
    result = invoke("register", "--run-id", running.info.run_id)
    assert "is still RUNNING (by a process of unknown host); wait for its training to finish, then register it" in \
        one_error_line(result.stderr)


def test_the_printed_serve_command_refuses_pickles(trained_run):
    from mnist_tracking.registry.register import register_run
    lines = []
    register_run(trained_run, f"serve-{trained_run[:6]}", echo=lines.append)
    [serve] = [line for line in lines if line.startswith("Serve it:")]
    assert serve.startswith("Serve it: MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false mlflow models serve")


# A second process that holds the registry lock of the test store for `sys.argv[2]` seconds.
HOLD_THE_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""
SHORT_WAIT_S = 2  # the bound, shortened for the test; the holder keeps the lock far longer


def hold_registry_lock(seconds: float) -> subprocess.Popen:
    database = mlflow.get_registry_uri().split(":///", 1)[1]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, database + ".registry.lock", str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_waiting_for_the_registry_lock_is_said_and_bounded(trained_run, monkeypatch):
    from mnist_tracking.registry import locks

    monkeypatch.setattr(locks, "REGISTRY_LOCK_WAIT_S", SHORT_WAIT_S)
    holder = hold_registry_lock(30)
    lines = []
    started = time.monotonic()
    try:
        with pytest.raises(UserError) as error:
            register_run(trained_run, unique_name(), echo=lines.append)
    finally:
        holder.kill()
        holder.wait()
    waited = time.monotonic() - started
    assert SHORT_WAIT_S <= waited < 20, waited
    assert any(line.startswith("Waiting for another registration to finish (the registry lock: ")
               and line.endswith(f"giving up after {SHORT_WAIT_S} s") for line in lines), lines
    assert str(error.value).startswith("another registration has held the registry lock (")
    assert f"for over {SHORT_WAIT_S} s; wait for it to finish" in str(error.value)


def test_a_registration_waits_for_the_lock_then_registers(trained_run):
    holder = hold_registry_lock(1)  # released within the bound
    lines = []
    try:
        registration = register_run(trained_run, unique_name(), echo=lines.append)
    finally:
        holder.wait(timeout=60)
    assert registration.version == 1
    assert lines[0].startswith("Waiting for another registration to finish")


def training_on(trained_run: str, experiment_id: str, accuracy: float, dataset: str, max_samples: str) -> str:
    """A finished training of `dataset` on `max_samples` images with `best_val_acc` = accuracy."""
    run_id = copy_of_model(trained_run, accuracy, experiment_id)
    MlflowClient().set_tag(run_id, "dataset", dataset)
    MlflowClient().log_param(run_id, "max_samples", max_samples)
    return run_id


def test_register_ranks_only_trainings_of_the_models_dataset_and_size(trained_run, fresh_experiment):
    """A registered model belongs to its first version's dataset and training size: a better
    Fashion-MNIST training or a better 600-image smoke run never takes its alias."""
    name = unique_name()
    first = training_on(trained_run, fresh_experiment, 0.5, "mnist", "0")
    register_run(first, name, echo=lambda line: None)
    training_on(trained_run, fresh_experiment, 0.99, "fashion-mnist", "0")
    training_on(trained_run, fresh_experiment, 0.98, "mnist", "600")
    better = training_on(trained_run, fresh_experiment, 0.6, "mnist", "0")

    lines = []
    experiment = MlflowClient().get_experiment(fresh_experiment).name
    registration = register_command(RegisterConfig(experiment=experiment, name=name), echo=lines.append)
    assert registration.run_id == better and registration.has_alias, lines
    assert f"Best finished training run of experiment {experiment!r} on mnist with all training images" in lines[0]
    assert MlflowClient().get_registered_model(name).tags == {"dataset": "mnist", "max_samples": "0"}


def test_register_refuses_a_run_of_another_dataset_in_one_line(trained_run, fresh_experiment):
    name = unique_name()
    register_run(training_on(trained_run, fresh_experiment, 0.5, "mnist", "0"), name, echo=lambda line: None)
    fashion = training_on(trained_run, fresh_experiment, 0.99, "fashion-mnist", "0")
    result = invoke("register", "--run-id", fashion, "--name", name)
    assert result.exit_code != 0
    assert (f"trained on fashion-mnist, but registered model {name!r} holds mnist models (its first version's "
            f"dataset); register it under another --name") in one_error_line(result.stderr)
    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 1


def test_register_without_a_training_on_the_models_data_says_so(trained_run, fresh_experiment):
    name = unique_name()
    register_run(training_on(trained_run, fresh_experiment, 0.5, "fashion-mnist", "600"), name, echo=lambda line: None)
    other = mlflow.create_experiment(f"mnist-only-{uuid.uuid4().hex[:6]}")
    training_on(trained_run, other, 0.9, "mnist", "600")
    result = invoke("register", "--experiment", MlflowClient().get_experiment(other).name, "--name", name)
    assert "has no finished training runs on fashion-mnist with max_samples 600, the data of registered model" in \
        one_error_line(result.stderr)


def test_the_registry_lock_file_is_only_written_into_a_folder_we_own(tmp_path):
    from mnist_tracking.registry.locks import LOCK_SUFFIX, sqlite_lock_file

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
