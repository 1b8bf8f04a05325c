"""Which levers speed up a training step on this machine: each measured, none assumed.

    python benchmarks/training_levers.py [--data-dir ../shared/data] [--steps 80] [--reps 3]

Times the training step alone (forward, backward, SGD step on batches already in memory, no
data handling) for the tutorial's layout and for each lever, in rounds (every variant once per
round, `--reps` rounds), and prints a Markdown table of medians. The step is what stays when data
handling costs nothing, so its rate bounds what any loop can reach with the same arithmetic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH_SIZE = 128
WARMUP_STEPS = 5  # first steps pay oneDNN's kernel selection (and torch.compile's compilation)
EPOCH_IMAGES = 48_000  # a full-MNIST training split, to say whether a warm-up pays for itself


def batches(data_dir: str | None, steps: int):
    """`steps` (images (128, 1, 28, 28) in [0, 1], labels (128,)) pairs: real MNIST when given."""
    import torch

    n = steps * BATCH_SIZE
    if data_dir:
        from mnist_tracking.core.data import load_splits

        train = load_splits("mnist", data_dir, 0.2, 42).train
        images, labels = train.images[:n], train.labels[:n]
    else:
        generator = torch.Generator().manual_seed(0)
        images, labels = torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    return [(images[i : i + BATCH_SIZE], labels[i : i + BATCH_SIZE]) for i in range(0, n, BATCH_SIZE)]


def variants() -> dict[str, dict]:
    return {
        "tutorial: fp32, NCHW (contiguous)": {},
        "channels_last (ours)": {"channels_last": True},
        "channels_last, SGD foreach": {"channels_last": True, "foreach": True},
        "channels_last, torch.compile": {"channels_last": True, "compile": True},
        "channels_last, bf16 autocast": {"channels_last": True, "bf16": True},
        "channels_last, 1 thread": {"channels_last": True, "threads": 1},
    }


def measure(data: list, channels_last=False, foreach=None, compile=False, bf16=False,
            threads=None) -> tuple[float, float]:
    """(images per second over the timed steps, seconds of the warm-up steps) of one variant."""
    import torch

    from mnist_tracking.core.model import ConvNet

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = ConvNet("relu")
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=layout).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=foreach)
        step_model = torch.compile(model) if compile else model

        def step(images, labels):
            images = images.contiguous(memory_format=layout)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = step_model(images)  # (128, 1, 28, 28) -> (128, 10)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        started = time.perf_counter()
        for images, labels in data[:WARMUP_STEPS]:
            step(images, labels)
        warmup = time.perf_counter() - started
        started = time.perf_counter()
        for images, labels in data:
            step(images, labels)
        return len(data) * BATCH_SIZE / (time.perf_counter() - started), warmup
    finally:
        torch.set_num_threads(default_threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder with MNIST/raw (torchvision layout); random pixels without it")
    parser.add_argument("--steps", type=int, default=80, help="timed steps per variant and round")
    parser.add_argument("--reps", type=int, default=3, help="rounds")
    args = parser.parse_args()
    # An empty compile cache, so torch.compile's first warm-up is the cold one a user pays.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

    import torch

    data = batches(args.data_dir, args.steps)
    rates: dict[str, list[float]] = {name: [] for name in variants()}
    warmups: dict[str, list[float]] = {name: [] for name in variants()}
    for rep in range(args.reps):
        for name, options in variants().items():
            rate, warmup = measure(data, **options)
            rates[name].append(rate)
            warmups[name].append(warmup)
            print(f"round {rep + 1}: {name}: {rate:.1f} img/s (warm-up {warmup:.1f} s)", file=sys.stderr, flush=True)

    baseline = statistics.median(rates["tutorial: fp32, NCHW (contiguous)"])
    print(f"Training step only, batch {BATCH_SIZE}, {args.steps} steps x {args.reps} rounds, "
          f"{'real MNIST' if args.data_dir else 'random pixels'}; torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads.\n")
    print("| variant | img/s (median) | vs tutorial layout | first warm-up (5 steps) | epoch of 48,000 images |")
    print("|---|---|---|---|---|")
    for name in variants():
        rate, warmup = statistics.median(rates[name]), warmups[name][0]  # round 1: compiles from scratch
        epoch = warmup + (EPOCH_IMAGES - WARMUP_STEPS * BATCH_SIZE) / rate
        print(f"| {name} | {rate:.0f} | {rate / baseline:.2f}x | {warmup:.1f} s | {epoch:.0f} s |")


if __name__ == "__main__":
    main()
