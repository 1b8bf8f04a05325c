"""The command's own local Ray: `ray start --head` in a session of its own, joined, then stopped by the command.

Started by `ray.init(address="local")`, Ray's processes would share the command's process group: a
SIGTERM to that group (`timeout`, systemd, a terminal) killed Ray's GCS and raylet under the search,
which then waited 60 s for a GCS that was gone and ended with runs left RUNNING. In a session of
their own only the command gets the signal; it stops its trials through Tune, then its head.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlparse

from mnist_tracking.core import stopping
from mnist_tracking.core.errors import UserError, first_line
from mnist_tracking.tracking.artifacts import environment

LOOPBACK = "127.0.0.1"  # a local Ray listens here only: its Jobs API has no authentication (CVE-2023-48022)
READY_LINE = "Ray runtime started"  # what `ray start` prints once the head is up
READY_TIMEOUT_S = 180  # a loaded machine starts Ray slowly
STOP_TIMEOUT_S = 20  # `ray start --block` stops its processes on SIGTERM (raylet first); the rest is killed after
POLL_S = 0.1  # how often the start is looked at (and the stop flag checked)
PR_SET_PDEATHSIG = 1  # prctl: the head gets SIGTERM when the command dies, even by SIGKILL
# Variables a local Ray's workers must not inherit from this process: `mlflow run` exports the run it
# made, and a trial would reopen it instead of starting its own.
NOT_INHERITED = ("MLFLOW_RUN_ID",)
# The head's and the driver's shared settings: token authentication (Ray's default for a new cluster,
# said explicitly so that the driver sends the token too), and no 30 s drain of a node on SIGTERM.
# Tracking URIs only this machine can reach (a file store, a local sqlite file).
LOCAL_SCHEMES = ("", "file", "sqlite")
HEAD_SETTINGS = {"RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def ensure_auth_token() -> None:
    """Ray's token file (~/.ray/auth_token), created once and atomically: two heads started at once on a new
    machine would each write their own, and one driver would then hold the other's."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))


def _dies_with_the_command() -> None:
    """In the head's process, before it runs: SIGTERM when the command that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def local_head(cpus: int | None, gpus: float | None) -> Iterator[str]:
    """A Ray head on 127.0.0.1 without the dashboard, sized to this machine (or `cpus`/`gpus`), in a process
    session of its own; yields its address and stops it at the end. Its start is a safe point for `stopping`."""
    settings = {name: os.environ.get(name, value) for name, value in HEAD_SETTINGS.items()}
    if settings["RAY_AUTH_MODE"] == "token":
        ensure_auth_token()
    port = free_port()
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
               f"--node-ip-address={LOOPBACK}", "--include-dashboard=false", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               *([f"--num-cpus={cpus}"] if cpus else []), *([f"--num-gpus={gpus:g}"] if gpus is not None else [])]
    env = {**{k: v for k, v in os.environ.items() if k not in NOT_INHERITED}, **settings}
    with tempfile.TemporaryDirectory(prefix="mnist-tracking-ray-") as folder:
        log = Path(folder) / "ray-start.log"
        with log.open("w") as out:
            # PR_SET_PDEATHSIG belongs to the thread that starts the head: the main thread, which outlives it.
            head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_dies_with_the_command if sys.platform == "linux" else None)
        try:
            _wait_until_started(head, log)
            with environment(**settings):  # the driver joins with the head's settings
                _ray_reads_environment()
                yield f"{LOOPBACK}:{port}"
        finally:
            _ray_reads_environment()  # as before: environment() has put the variables back
            stop_head(head)


def _wait_until_started(head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while READY_LINE not in log.read_text(errors="replace"):
        stopping.check()
        if head.poll() is not None or time.monotonic() > deadline:
            said = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            raise UserError(f"cannot start a local Ray (`ray start` "
                            f"{'ended ' + str(head.returncode) if head.poll() is not None else 'did not start in time'}"
                            f": {said[-1].strip() if said else 'no output'}); check free memory and /tmp space")
        time.sleep(POLL_S)


def stop_head(head: subprocess.Popen) -> None:
    """Stop our head alone (`ray stop` would stop every Ray of this machine): SIGTERM to `ray start`, which
    stops the raylet and then the rest; whatever is left of its process group is killed."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    head.wait()


def _ray_reads_environment() -> None:
    """Ray reads RAY_AUTH_MODE when it is imported, and a driver that joins a cluster by its address never
    turns token authentication on itself (Ray 2.60): read it again, as Ray's own `_enable_token_auth` does."""
    from ray._raylet import Config

    Config.initialize("")


def _not_main_thread_warning(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def init_in_thread(**init_kwargs) -> None:
    """ray.init, run in a thread of its own: from the main thread it replaces our SIGTERM handler by one that
    calls sys.exit inside whatever runs. Our handlers are put back after it (its C++ core installs absl's)."""
    import ray

    failed: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(**init_kwargs)
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    worker_log = logging.getLogger("ray._private.worker")  # it says so in a warning: what we asked for
    worker_log.addFilter(_not_main_thread_warning)
    thread = threading.Thread(target=init, name="ray-init", daemon=True)
    thread.start()
    thread.join()
    worker_log.removeFilter(_not_main_thread_warning)
    stopping.restore()
    if failed:
        raise failed[0]


# --------------------------------------------------------------------------- the search's Ray


TRACKING_URI_VAR = "MNIST_TRACKING_TRIAL_TRACKING_URI"  # every worker of the search's job gets it


# Variables of this command that its trials need, wherever they run: MLflow's bounded HTTP retries (the CLI
# sets them, so that a dead server ends a search within minutes) and the checkpoint cache.
JOB_VARIABLE_PREFIXES = ("MLFLOW_HTTP_REQUEST_", "MNIST_TRACKING_CHECKPOINT_CACHE")


def job_environment(tracking_uri: str) -> dict[str, str]:
    """What every worker of the search's Ray job is given: this command's tracking store, its MLflow HTTP settings
    and its checkpoint cache. A cluster that was running before the command (RAY_ADDRESS) started its workers with
    another process's environment, and a restored trial's saved config holds the URI of its first day."""
    given = {name: value for name, value in os.environ.items() if name.startswith(JOB_VARIABLE_PREFIXES) and value}
    return {TRACKING_URI_VAR: tracking_uri, **given}


def absolute_tracking_uri(uri: str) -> str:
    """The tracking URI with a relative local path made absolute: Ray runs each trial in its own
    folder (RAY_CHDIR_TO_TRIAL_DIR), where `sqlite:///mlflow.db` would be another database."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///"):]
        return f"sqlite:///{os.path.abspath(path)}" if path and path != ":memory:" else uri
    if parsed.scheme in ("", "file") and len(parsed.scheme) != 1:  # a bare path or file:, not a Windows drive
        path = parsed.path if parsed.scheme == "file" else uri
        return f"file://{os.path.abspath(path)}"
    return uri


def is_local_uri(uri: str) -> bool:
    """True for a store only this machine reaches: a file store or a sqlite file."""
    return urlparse(uri).scheme in LOCAL_SCHEMES


@contextmanager
def ray_session(cpus: int | None, gpus: float | None, tracking_uri: str, artifact_location: str) -> Iterator[dict]:
    """Ray for the search: with RAY_ADDRESS set, join that cluster (refusing a tracking store its other
    machines cannot reach); else start a local head on 127.0.0.1 without the dashboard, sized to this
    machine (or `cpus`/`gpus`), in a process session of its own, and stop it at the end. Yields what it
    started or joined. Its start is a safe point: a signal meanwhile stops the command once Ray is up."""
    import ray

    address = os.environ.get("RAY_ADDRESS", "").strip()
    with local_head(cpus, gpus) if not address else nullcontext(address) as joined:
        try:
            # The store is the job's, not the trial's: a search restored on another day (its trials' configs
            # saved with the URI of then) logs where this command logs.
            init_in_thread(address=joined, _node_ip_address=None if address else LOOPBACK, log_to_driver=True,
                           configure_logging=False, runtime_env={"env_vars": job_environment(tracking_uri)})
        except Exception as exc:  # Ray raises many kinds; one line says which and what to do
            ray.shutdown()  # what it started before it failed
            where = f"join the Ray cluster at RAY_ADDRESS={address}" if address else "start a local Ray"
            hint = ("check that `ray start --head` runs there and that this machine reaches it" if address
                    else "check free memory and /tmp space, or unset a stale RAY_ADDRESS")
            raise UserError(f"cannot {where} ({type(exc).__name__}: {first_line(exc)}); {hint}") from None
        try:
            stopping.check()  # a signal while Ray started: nothing of the search's has run yet
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            if address:
                check_reachable_store(len(nodes), tracking_uri, artifact_location)
            yield {"address": address or "local", "nodes": len(nodes),
                   "cpus": ray.cluster_resources().get("CPU", 0), "gpus": ray.cluster_resources().get("GPU", 0),
                   # a trial runs on one node: what the largest offers is the most one trial can get
                   "node_cpus": max((n["Resources"].get("CPU", 0) for n in nodes), default=0),
                   "node_gpus": max((n["Resources"].get("GPU", 0) for n in nodes), default=0)}
        finally:
            ray.shutdown()  # the driver first, then (local_head) our head; from a cluster this only disconnects


def unfit_trial(cluster: dict, cpus: float, gpus: float, one: str = "trial") -> str:
    """Why a trial asking for `cpus` and `gpus` can never start on this Ray (Tune would only warn and
    wait for ever), or "" when it fits on the largest node."""
    for name, asked, has in (("cpus", cpus, cluster["node_cpus"]), ("gpus", gpus, cluster["node_gpus"])):
        if asked > has:
            unit = name[:-1].upper() + "s"
            more = " (or start the local Ray with more: --ray-cpus)" if name == "cpus" and one == "trial" else ""
            return (f"{name}_per_trial {asked:g} is more than any node of the Ray cluster has (the largest has {has:g} "
                    f"{unit}): no {one} could start; give at most {has:g}{more}")
    return ""


def check_reachable_store(nodes: int, tracking_uri: str, artifact_location: str) -> None:
    """On a cluster of several machines every trial writes to the store: refuse one only this machine reaches."""
    if nodes < 2:
        return
    fix = ("start a tracking server (deploy/tracking-server.sh, with proxied artifacts: --artifacts-destination) "
           "and set MLFLOW_TRACKING_URI=http://<host>:<port>")
    if is_local_uri(tracking_uri):
        raise UserError(f"the tracking store {tracking_uri} is a local file that the other {nodes - 1} machine(s) of "
                        f"the Ray cluster cannot reach; {fix}")
    if artifact_location and urlparse(artifact_location).scheme in ("", "file"):
        raise UserError(f"the experiment stores artifacts in {artifact_location}, a local folder that the other "
                        f"{nodes - 1} machine(s) of the Ray cluster cannot write; {fix} and use a new experiment "
                        f"(its artifact root is then mlflow-artifacts:/)")
