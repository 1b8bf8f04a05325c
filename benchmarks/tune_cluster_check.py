"""The two-node check of `tune` on one machine: a Ray head and a second node of one CPU each
(ray.cluster_utils.Cluster), a tracking server with proxied artifacts, RAY_ADDRESS set, the same
`tune` command; mid-search the second node is killed.

    python benchmarks/tune_cluster_check.py --data-dir ../shared/data --work /tmp/tune-cluster [--max-samples 2000]

Checks and writes to benchmarks/tune_cluster.json: the trials ran on both nodes (their
mnist_tracking.ray_node_id tags), the search still finished after the second node died, and every
trial is accounted for (no run RUNNING; a trial lost with the node retried, its first run FAILED
with the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
LOOPBACK = "127.0.0.1"
SERVER_START_S, SEARCH_S = 300, 3000  # generous: a loaded machine starts slowly


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1 with proxied artifacts (what the other nodes can reach and write)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{work}/server.db",
         "--artifacts-destination", str(work / "artifacts")],
        stdout=(work / "server.log").open("w"), stderr=subprocess.STDOUT)
    uri = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return server, uri
        except OSError:
            time.sleep(1)
    server.terminate()
    raise SystemExit(f"the tracking server did not answer within {SERVER_START_S} s; see {work}/server.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--work", required=True)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--max-samples", type=int, default=2000)
    parser.add_argument("--out", default=str(HERE / "tune_cluster.json"))
    args = parser.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on the loopback address, not the interface's

    import mlflow
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    server, uri = start_server(work)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": LOOPBACK,
                                                                "include_dashboard": False})
        second = cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        head_id, second_id = cluster.head_node.node_id, second.node_id
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        experiment_id = client.create_experiment(f"tune-cluster-{int(time.time())}")
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": uri,
               "MLFLOW_EXPERIMENT_ID": experiment_id, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "mnist_tracking", "tune", "--trials", str(args.trials), "--max-epochs",
                   str(args.max_epochs), "--max-samples", str(args.max_samples), "--data-dir",
                   str(Path(args.data_dir).resolve()), "--max-concurrent", "2", "--compare-top", "0",
                   "--storage", str(work / "tune-storage"),
                   "--space", "lr=loguniform(1e-3,1e-1); batch_size=choice(64,128); device=cpu; precision=fp32"]
        started = time.perf_counter()
        search = subprocess.Popen(command, stdout=(work / "tune.log").open("w"), stderr=subprocess.STDOUT, env=env)
        killed_at = None
        while search.poll() is None and time.perf_counter() - started < SEARCH_S:
            if killed_at is None:
                on_second = [r for r in client.search_runs([experiment_id], "tags.`mnist_tracking.kind` = 'training'")
                             if r.data.tags.get("mnist_tracking.ray_node_id") == second_id]
                if any(client.get_metric_history(r.info.run_id, "val_acc") for r in on_second):
                    cluster.remove_node(second, allow_graceful=False)  # the second machine dies mid-search
                    killed_at = time.perf_counter() - started
            time.sleep(2)
        code = search.wait(timeout=60)
        runs = client.search_runs([experiment_id])
        trials = [r for r in runs if r.data.tags.get("mnist_tracking.kind") == "training"]
        nodes = {r.data.tags.get("mnist_tracking.ray_node_id") for r in trials}
        result = {
            "exit_code": code, "seconds": time.perf_counter() - started, "second_node_killed_after_s": killed_at,
            "head_node": head_id, "second_node": second_id, "ran_on_both_nodes": {head_id, second_id} <= nodes,
            "running_left": [r.info.run_id for r in runs if r.info.status == "RUNNING"],
            "trials": [{"run_id": r.info.run_id, "trial_id": r.data.tags.get("mnist_tracking.trial_id"),
                        "node": "second" if r.data.tags.get("mnist_tracking.ray_node_id") == second_id else "head",
                        "status": r.info.status, "reason": r.data.tags.get("status_reason", "")} for r in trials],
            "parent": [{"run_id": r.info.run_id, "status": r.info.status} for r in runs
                       if r.data.tags.get("mnist_tracking.kind") == "tune"],
        }
    finally:
        if cluster is not None:
            cluster.shutdown()
        server.terminate()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
