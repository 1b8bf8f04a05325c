"""The trial runner of `tune` and the sweep on Ray: starting or joining Ray, and one trial as a training run."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from urllib.parse import urlparse

from mnist_tracking import stopping
from mnist_tracking.errors import UserError, first_line
from mnist_tracking.ray_head import LOOPBACK, NOT_INHERITED, init_in_thread, local_head

TRIAL_TAG = "mnist_tracking.trial_id"
NODE_TAG = "mnist_tracking.ray_node_id"
# A trial's config key holding a whole training (params, tags, label) rather than searched values: the sweep's grid.
TRAINING_KEY = "training"
# Tracking URIs only this machine can reach (a file store, a local sqlite file).
LOCAL_SCHEMES = ("", "file", "sqlite")


# --------------------------------------------------------------------------- Ray itself


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
            init_in_thread(address=joined, _node_ip_address=None if address else LOOPBACK, log_to_driver=True,
                           configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; one line says which and what to do
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


@contextmanager
def environment_without(names: tuple[str, ...]) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# --------------------------------------------------------------------------- one trial


def run_trial(config: dict) -> None:
    """One Tune trial: the project's own training (`train_and_log`) as a run nested under the search's
    (or the sweep's) parent, reporting each logged epoch to Tune. Its whole context comes in
    `config["context"]` (absolute tracking URI, experiment and parent ids, data folder, threads):
    nothing is inherited. Its parameters are the context's fixed ones, a sweep's whole training
    (`config["training"]`) or the searched values, then the context's per-trial ones.

    A failure of the training itself (a divergence, bad data) ends its run FAILED with the reason and
    returns normally, so that Tune does not retry it; only a lost actor or node is retried."""
    import mlflow
    import ray
    import torch
    from ray import tune

    from mnist_tracking.config import TrainConfig
    from mnist_tracking.runs import STATUS_REASON_TAG, end_run
    from mnist_tracking.training_run import train_and_log

    context = config["context"]
    for name in NOT_INHERITED + ("MLFLOW_EXPERIMENT_NAME",):
        os.environ.pop(name, None)
    mlflow.set_tracking_uri(context["tracking_uri"])
    mlflow.set_experiment(experiment_id=context["experiment_id"])
    torch.set_num_threads(max(1, int(context["threads"])))  # the CPUs Tune gave this trial, no more
    trial_id = tune.get_context().get_trial_id()
    training = config.get(TRAINING_KEY, {})  # a sweep's trial: one whole training of its grid
    searched = {name: value for name, value in config.items() if name not in ("context", TRAINING_KEY)}
    params = {**context["fixed"], **training.get("params", {}), **searched, **context["per_trial"]}
    reporter = EpochReporter(context["metric"])
    tags = {TRIAL_TAG: trial_id, NODE_TAG: ray.get_runtime_context().get_node_id(), **training.get("tags", {})}
    prefix = training.get("label", trial_id)
    try:
        train_and_log(TrainConfig(**params), echo=lambda line: print(f"[{prefix}] {line}", flush=True),
                      progress=False, on_epoch=reporter, parent_run_id=context["parent_run_id"], tags=tags)
    except SystemExit:  # Tune stopped this trial (the scheduler, an interruption): its run was ended KILLED
        from mnist_tracking.checkpoints import drop_local_checkpoint

        if reporter.run_id:
            drop_local_checkpoint(reporter.run_id)  # no resume starts from a trial Tune stopped
        raise
    except Exception as exc:  # noqa: BLE001 - the training's own failure: recorded, not retried
        run = mlflow.last_active_run()
        if reporter.run_id or run is not None:
            run_id = reporter.run_id or run.info.run_id
            stored = mlflow.tracking.MlflowClient().get_run(run_id)
            if stored.info.status == "RUNNING" or STATUS_REASON_TAG not in stored.data.tags:
                end_run(run_id, f"{type(exc).__name__}: {first_line(exc)}", "FAILED")
        print(f"[{prefix}] failed: {first_line(exc)}", flush=True)


class EpochReporter:
    """The trainer's extra epoch callback in a trial: reports the logged epoch to Tune."""

    def __init__(self, metric: str):
        self.metric, self.run_id, self.epoch = metric, "", 0

    def __call__(self, result, trainer) -> None:
        import mlflow
        from ray import tune

        self.run_id = mlflow.active_run().info.run_id
        self.epoch = result.epoch
        metrics = {**result.metrics(), "epoch": result.epoch, "run_id": self.run_id}
        if result.snapshot_knn_acc is not None:
            metrics["snapshot_knn_acc"] = result.snapshot_knn_acc
        tune.report(metrics)  # SystemExit when Tune stops the trial: the training's run ends KILLED (runs.ended)


def trial_resources(cpus: float, gpus: float) -> dict:
    return {"cpu": cpus, "gpu": gpus} if gpus else {"cpu": cpus}


def trainable(cpus: float, gpus: float) -> Callable:
    from ray import tune

    return tune.with_resources(run_trial, trial_resources(cpus, gpus))
