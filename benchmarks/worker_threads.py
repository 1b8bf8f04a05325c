"""Why each pytest-xdist worker gets its share of the cores (tests/conftest.py): two 3-epoch fits on the tests'
fake data, side by side, as two workers run them, with torch's default threads against one thread each.

    python benchmarks/worker_threads.py [--repeat 3] [--out benchmarks/worker_threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDE_BY_SIDE = 2  # the suite's workers (--maxprocesses=2)
EPOCHS = 3

ONE_FIT = """
import sys, time, torch
sys.path[:0] = [{tests!r}, {repo!r}]
from fakes import FAST
from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.data import load_splits
from mnist_tracking.core.trainer import Trainer
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
config = TrainConfig(data_dir={data!r}, **{{**FAST, "epochs": {epochs}}})
splits = load_splits(config.dataset, config.data_dir, config.val_fraction, config.seed)
started = time.perf_counter()
Trainer(config, splits, torch.device("cpu"), "fp32").fit()
print(time.perf_counter() - started)
"""


def side_by_side(script: str, threads: int) -> list[float]:
    """The fit seconds of SIDE_BY_SIDE processes started together (threads 0: torch's default)."""
    processes = [subprocess.Popen([sys.executable, "-c", script, str(threads)], stdout=subprocess.PIPE, text=True,
                                  env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
                 for _ in range(SIDE_BY_SIDE)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in processes]


def cpu_name() -> str:
    """The CPU's model name and whether it computes bf16 natively (the CPUs of our machines vary)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    return f"{model} ({'AVX-512 BF16' if 'avx512_bf16' in info else 'no AVX-512 BF16'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "worker_threads.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from fakes import write_fake_dataset

    data = tempfile.mkdtemp(prefix="worker-threads-")
    write_fake_dataset(Path(data))
    script = ONE_FIT.format(tests=str(REPO / "tests"), repo=str(REPO), data=data, epochs=EPOCHS)
    share = max(1, (os.cpu_count() or 1) // SIDE_BY_SIDE)
    rows = []
    for repeat in range(args.repeat):
        for label, threads in (("torch's default threads", 0), (f"{share} thread(s) each", share)):
            seconds = side_by_side(script, threads)
            rows.append({"repeat": repeat + 1, "threads": label, "fit_seconds": [round(s, 2) for s in seconds]})
            print(f"{label:>24}: {', '.join(f'{s:.2f} s' for s in seconds)}", flush=True)
    default = [s for r in rows if r["threads"].startswith("torch") for s in r["fit_seconds"]]
    shared = [s for r in rows if not r["threads"].startswith("torch") for s in r["fit_seconds"]]
    ratio = (sum(default) / len(default)) / (sum(shared) / len(shared))
    print(f"default / shared: {ratio:.2f}x")
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "side_by_side": SIDE_BY_SIDE,
              "epochs": EPOCHS, "rows": rows, "default_over_shared": round(ratio, 2), "when": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
