"""What several test files share: running the CLI, tiny trainings in subprocesses, a free local port,
the metric names, reading views."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
SUMMARY_METRICS = ("best_val_acc", "best_val_loss", "best_epoch", "test_acc", "test_loss")
PROJECTION_METRICS = ("trustworthiness", "knn_acc", "silhouette", "seconds")  # each as <method>_<name>


def run_cli(*args: str, cwd, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m mnist_tracking ARGS` in a real subprocess, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "mnist_tracking", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plot_data(page: str, plot_id: str = "") -> tuple[list[dict], dict]:
    """The traces and layout an HTML view hands to Plotly.newPlot (JSON after the div id)."""
    from mnist_tracking.views import projection as views

    plot_id = plot_id or views.PLOT_ID
    start = page.index("Plotly.newPlot(")
    decoder = json.JSONDecoder()
    div_id, end = decoder.raw_decode(page, page.index('"', start))
    assert div_id == plot_id
    data, end = decoder.raw_decode(page, page.index("[", end))
    layout, _ = decoder.raw_decode(page, page.index("{", end))
    return data, layout


def array(value) -> np.ndarray:
    """A plotly array as JSON holds it: a list, or a typed array {dtype, bdata[, shape]}."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = [int(s) for s in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.asarray(value)


# --------------------------------------------------------------------------- tiny trainings in subprocesses

# Tiny runs: 48 train / 12 val images in batches of 16, so an epoch takes well under a second.
TINY = ["--batch-size", "16", "--max-samples", "60", "--device", "cpu", "--precision", "fp32", "--seed", "42"]
# One thread per process: the machines running the tests have two cores for several processes.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
STARTUP_TIMEOUT_S = 240  # imports of torch and mlflow on a busy machine


def cli_command(*args):
    return [sys.executable, "-m", "mnist_tracking", *args]


def env_for(experiment_id, **extra):
    return {**os.environ, **SUBPROCESS_ENV, "MLFLOW_EXPERIMENT_ID": experiment_id, **extra}


def start_training(data_dir, experiment_id, *args, cwd, **popen):
    return subprocess.Popen(
        cli_command("train", "--data-dir", str(data_dir), *TINY, *args),
        cwd=cwd, env=env_for(experiment_id), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def invoke(*args, env: dict | None = None):
    """The CLI in this process, through click's CliRunner: for what the command says and logs, where the
    process itself (its exit after a signal, a fresh interpreter) is not what is tested."""
    from mnist_tracking.cli import main as cli

    return CliRunner().invoke(cli.main, list(args), env=env)


def as_mlflow_run(entry_point: str, experiment_id: str, **params) -> tuple[subprocess.CompletedProcess, str]:
    """What `mlflow run . -e ENTRY_POINT -P name=value ...` does, in this process: MLflow's own run of the project
    (its tags and params), the entry point's command line as MLproject makes it (MLflow's own code), run with
    MLFLOW_RUN_ID set, then the run ended as MLflow's local runner ends one whose command exited. What only the
    `mlflow run` process shows (a signal to it) keeps the real command (tests/tracking/test_train_run.py)."""
    import shlex

    from fakes import REPO
    from mlflow.projects import utils
    from mlflow.projects._project_spec import load_project

    entry = load_project(str(REPO)).get_entry_point(entry_point)
    words = shlex.split(entry.compute_command({k: str(v) for k, v in params.items()}, storage_dir=None))
    assert words[:3] == ["python", "-m", "mnist_tracking"], words  # MLproject runs the CLI
    run = utils._create_run(str(REPO), experiment_id, str(REPO), None, entry_point, params)
    run_id = run.info.run_id
    result = run_in_process(*words[3:], env={"MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": experiment_id})
    if MlflowClient().get_run(run_id).info.status == "RUNNING":
        MlflowClient().set_terminated(run_id, "FINISHED" if result.returncode == 0 else "FAILED")
    return result, run_id


def run_in_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`invoke`, answered as run_cli answers (returncode, stdout, stderr): the same checks, without the
    seconds a fresh interpreter spends importing torch and MLflow."""
    result = invoke(*args, env=env)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def error_lines(stderr):
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def one_error_line(stderr):
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    return errors[0]


def runs_of(experiment_id):
    return MlflowClient().search_runs([experiment_id])


def steps(run_id, name="val_acc"):
    return [m.step for m in MlflowClient().get_metric_history(run_id, name)]


def history(run_id):
    """{metric: [value per epoch]} of a run, in step order."""
    client = MlflowClient()
    return {
        name: [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]
        for name in EPOCH_METRICS
    }


def load_artifact(run_id, path, tmp_path):
    local = MlflowClient().download_artifacts(run_id, path, str(tmp_path))
    return torch.load(local, weights_only=True)


def wait_until(condition, process, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"the training ended before {what}: {process.communicate()[1][-3000:]}")
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- pages in a browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

# Where a point is drawn, in CSS pixels from the plot's centre: plotly's axis offsets and scales.
POINT_POSITION = """
var plot = document.getElementById(arguments[0]), trace = plot._fullData[arguments[1]];
var xa = plot._fullLayout[trace.xaxis.replace("x", "xaxis")], ya = plot._fullLayout[trace.yaxis.replace("y", "yaxis")];
var box = plot.getBoundingClientRect();
return [xa._offset + xa.l2p(trace.x[arguments[2]]) - box.width / 2,
        ya._offset + ya.l2p(trace.y[arguments[2]]) - box.height / 2];
"""


def offline_chromium():
    """Headless Chromium that can fetch nothing (a page must be self-contained); fails under CI=true
    when it is missing, skips elsewhere."""
    import os

    import pytest

    if not all(os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER)):
        message = "no chromium / chromium-driver (apt-get install chromium chromium-driver)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,800",
                     "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"):  # nothing may be fetched
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for_plot(driver, plot_id: str, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not driver.execute_script(f"var p = document.getElementById('{plot_id}'); "
                                    "return !!(p && p._fullLayout && p._fullData);"):
        assert time.monotonic() < deadline, "the plot was not drawn"
        time.sleep(0.5)


def assert_store_consistent(run, tmp_path):
    """A run that ended: contiguous per-epoch metrics from step 1, and checkpoints that load."""
    assert run.info.status in ("KILLED", "FAILED", "FINISHED"), run.info.status
    completed = steps(run.info.run_id)
    assert completed == list(range(1, len(completed) + 1))
    for name in EPOCH_METRICS:
        assert steps(run.info.run_id, name) == completed, name
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "checkpoints")}
    if not completed:
        assert artifacts == set()
        return 0
    assert artifacts == {"checkpoints/best.pt", "checkpoints/last.pt"}
    last = load_artifact(run.info.run_id, "checkpoints/last.pt", tmp_path / run.info.run_id)
    best = load_artifact(run.info.run_id, "checkpoints/best.pt", tmp_path / run.info.run_id)
    assert last["epoch"] == len(completed)
    assert 1 <= best["epoch"] <= len(completed)
    return len(completed)


class CreatesAFile:
    """Unpickling this calls open(path, "w"): what an attacker's checkpoint could run instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def interrupt_analysis(command: str, run_id: str, experiment_id: str, cwd, *args: str):
    """`command --run-id run_id ARGS` in a real subprocess, sent SIGTERM as soon as its own run is in
    `experiment_id`: (the completed process's stderr and return code, that run)."""
    import signal

    process = subprocess.Popen(cli_command(command, "--run-id", run_id, *args), cwd=cwd, env=env_for(experiment_id),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: runs_of(experiment_id), process, STARTUP_TIMEOUT_S, f"the {command} run")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=STARTUP_TIMEOUT_S)
    [run] = runs_of(experiment_id)
    return stderr, process.returncode, run


def read_only(folder, command: list[str]) -> list[str]:
    """`command` run where `folder` is a read-only bind mount of itself (a mount namespace of its own):
    writes there really fail, also for root, whom chmod does not stop; other processes see no change."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to make a read-only store")
    return ["unshare", "--map-root-user", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
            str(folder), *command]


# --------------------------------------------------------------------------- an MLflow server for the UI

SERVER_TIMEOUT_S = 240  # a first start migrates the store's schema: slow on a busy machine


def start_mlflow_server(uri: str, folder):
    """(the process, its base URL) of `mlflow server` on 127.0.0.1 over the store `uri`, logging to
    folder/server.log; it answers once wait_for_mlflow_server returns."""
    port = free_port()
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", uri, "--default-artifact-root", (folder / "artifacts").as_uri(), "--workers", "1"],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its uvicorn workers too
        )
    return server, f"http://127.0.0.1:{port}"


def wait_for_mlflow_server(server, base: str, folder) -> None:
    import urllib.request

    deadline = time.monotonic() + SERVER_TIMEOUT_S
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never via a proxy
    while True:
        try:
            with direct.open(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert server.poll() is None, f"mlflow server exited: {(folder / 'server.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"mlflow server did not answer in {SERVER_TIMEOUT_S}s"
        time.sleep(1)


def stop_mlflow_server(server) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1 over a sqlite store in `folder`, artifacts served; waits for /health."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, stdout=open(folder / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(1)
        assert server.poll() is None, (folder / "server.log").read_text()[-2000:]
    pytest.fail("mlflow server did not answer")
