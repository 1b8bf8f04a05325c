"""A real-data check of three recovery cases against a real `mlflow server`, printing what a user sees.

    python benchmarks/recovery_check.py --data-dir ../shared/data [--max-samples 6000]

1. resume keeps what was not given: a 3-epoch fp32 training interrupted (SIGINT) after epoch 1,
   resumed with `--resume-from` alone;
2. the server dies mid-training: killed after epoch 1, started again, the run resumed;
3. the server dies after the last epoch, while the results are logged: started again, the
   run finished by `--resume-from`.
Each step's command, exit code and error line are printed; the run ids too.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, stdout=open(folder / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(300):
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            time.sleep(1)
    raise SystemExit("the server did not start")


def epochs_logged(client, run_id: str) -> int:
    return len(client.get_metric_history(run_id, "val_acc"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--max-samples", default="6000")
    parser.add_argument("--port", type=int, default=5077)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="recovery-check-"))
    uri = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MNIST_TRACKING_CHECKPOINT_CACHE": str(folder / "cache")}
    client = MlflowClient(tracking_uri=uri)
    base = [sys.executable, "-m", "mnist_tracking", "train", "--data-dir", str(Path(args.data_dir).resolve()),
            "--max-samples", args.max_samples, "--epochs", "3", "--precision", "fp32", "--snapshot-points", "0"]

    def train(*extra: str, stop_when=None, stop=None) -> tuple[int, str, str]:
        print("$", " ".join(["mnist-tracking train", *extra] if extra[:1] == ("--resume-from",) else
                            ["mnist-tracking train ...", *extra]), flush=True)
        before = {r.info.run_id for r in client.search_runs(["0"])}
        process = subprocess.Popen([*base, *extra] if extra[:1] != ("--resume-from",) else
                                   [sys.executable, "-m", "mnist_tracking", "train", *extra],
                                   cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run_id = ""
        while stop_when and process.poll() is None:
            if not run_id:  # this training's run: the one that was not there before
                new = [r.info.run_id for r in client.search_runs(["0"]) if r.info.run_id not in before]
                run_id = new[0] if new else ""
            if run_id and stop_when(run_id):
                stop(process)
                break
            time.sleep(0.5)
        out, err = process.communicate(timeout=1800)
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        print(f"  exit {process.returncode}; {errors[-1] if errors else 'no error'}", flush=True)
        run_id = run_id or (out.split("; run ")[1].split()[0] if "; run " in out else "")
        return process.returncode, run_id, err

    server = start_server(folder, args.port)
    print("== 1. resume keeps what was not given")
    _, first, _ = train(stop_when=lambda r: epochs_logged(client, r) >= 1,
                        stop=lambda process: process.send_signal(signal.SIGINT))  # Ctrl-C
    print(f"  interrupted run {first}: {client.get_run(first).info.status}")
    train("--resume-from", first)
    [resumed] = client.search_runs(["0"], filter_string=f"tags.resumed_from = '{first}'")
    p = resumed.data.params
    print(f"  resumed run {resumed.info.run_id}: epochs={p['epochs']} data_dir={p['data_dir']}"
          f" precision={p['precision']} status={resumed.info.status}"
          f" epochs logged={epochs_logged(client, resumed.info.run_id)}")

    print("== 2. the server dies mid-training")
    _, second, _ = train(stop_when=lambda r: epochs_logged(client, r) >= 1,
                         stop=lambda process: os.killpg(server.pid, signal.SIGKILL))
    server = start_server(folder, args.port)
    train("--resume-from", second)
    [again] = client.search_runs(["0"], filter_string=f"tags.resumed_from = '{second}'")
    print(f"  resumed run {again.info.run_id}: status={again.info.status} from epoch "
          f"{again.data.tags['resumed_from_epoch']}; the dead run {second}: {client.get_run(second).info.status}")

    print("== 3. the server dies while the results are logged")
    _, third, _ = train(stop_when=lambda r: epochs_logged(client, r) >= 3,
                        stop=lambda process: os.killpg(server.pid, signal.SIGKILL))
    server = start_server(folder, args.port)
    train("--resume-from", third)
    [done] = client.search_runs(["0"], filter_string=f"tags.resumed_from = '{third}'")
    print(f"  finished run {done.info.run_id}: status={done.info.status} test_acc={done.data.metrics.get('test_acc')}"
          f" epochs logged={epochs_logged(client, done.info.run_id)}")
    os.killpg(server.pid, signal.SIGKILL)
    print(f"store: {folder}")


if __name__ == "__main__":
    main()
