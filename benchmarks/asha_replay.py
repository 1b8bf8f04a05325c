"""Replay ASHA on the curves and epoch times a FIFO search recorded: how its speed-up depends on the trials' order.

    python benchmarks/asha_replay.py --store /tmp/tune-bench [--fifo-parent <run id>] [--orders 300]

benchmarks/tune.py runs the same configurations with ASHA and with FIFO (every trial to its end). This
script takes the FIFO search's trials from that store (each one's val_acc per epoch, the time of each
epoch and of what follows the last one: test evaluation, features, model) and replays them through
Ray's own ASHA bookkeeping (`ray.tune.schedulers.async_hyperband._Bracket`, with stop_last_trials=False
as `tune` uses it) on as many slots as trials ran at once. A trial ASHA stops costs its epochs so far;
the next trial starts when a slot frees. It reports the replayed fit time of FIFO and of ASHA, their
ratio and the trials stopped: first in the order the search drew them (the check: with the defaults
it must stop the trials the real ASHA search stopped), then over `--orders` random orders of the
same trials, for several reduction factors and grace periods. Writes benchmarks/asha_replay.json/.md.
It measures nothing new: it reads what the search logged and trains nothing.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

STOPPED_TRIAL_SECONDS = 3.0  # a stopped trial's run is ended and its local checkpoint dropped: no test, no model
REDUCTION_FACTORS = (2, 3, 4, 5)
GRACE_PERIODS = (1, 2)


class RecordedTrial(NamedTuple):
    val_acc: list[float]  # per epoch
    epoch_seconds: list[float]  # epoch 1's includes the run's start (data, model)
    after_last_seconds: float  # test evaluation, features, model logging


def recorded_trials(store: str, parent_id: str) -> tuple[list[RecordedTrial], int, dict]:
    """The FIFO search's trials in the order their runs started, the most that ran at once, and its parent's
    settings."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{Path(store).resolve()}/mlflow.db")
    client = MlflowClient()
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                                           "tags.`mnist_tracking.kind` = 'training'")
    runs.sort(key=lambda r: r.info.start_time)
    trials = []
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
        times = [run.info.start_time] + [m.timestamp for m in history]
        trials.append(RecordedTrial([m.value for m in history],
                                    [(b - a) / 1000 for a, b in zip(times, times[1:], strict=False)],  # ms -> s
                                    (run.info.end_time - times[-1]) / 1000))
    spans = [(r.info.start_time, r.info.end_time) for r in runs]
    at_once = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    return trials, at_once, dict(parent.data.params)


def replay(trials: list[RecordedTrial], slots: int, max_t: int, grace_period: int | None,
           reduction_factor: float) -> dict:
    """Replayed fit seconds and the epochs at which ASHA stopped trials (grace_period None: FIFO)."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    class Trial(NamedTuple):  # what _Bracket reads of a trial
        trial_id: str

    bracket = _Bracket(grace_period, max_t, reduction_factor, 0, stop_last_trials=False) if grace_period else None
    events: list[tuple[float, int, int]] = []  # (when an epoch ends, trial, epoch)
    waiting = iter(range(len(trials)))
    for _ in range(min(slots, len(trials))):
        k = next(waiting)
        heapq.heappush(events, (trials[k].epoch_seconds[0], k, 1))
    stopped, end = [], 0.0
    while events:
        now, k, epoch = heapq.heappop(events)
        trial = trials[k]
        stop = bracket is not None and bracket.on_result(Trial(str(k)), epoch, trial.val_acc[epoch - 1]) == "STOP"
        if stop or epoch == len(trial.val_acc):
            stopped += [epoch] if stop else []
            free_at = now + (STOPPED_TRIAL_SECONDS if stop else trial.after_last_seconds)
            end = max(end, free_at)
            k = next(waiting, None)
            if k is not None:
                heapq.heappush(events, (free_at + trials[k].epoch_seconds[0], k, 1))
        else:
            heapq.heappush(events, (now + trial.epoch_seconds[epoch], k, epoch + 1))
    return {"seconds": end, "stopped_at_epochs": sorted(stopped)}


def quantiles(values: list[float]) -> dict:
    cuts = statistics.quantiles(values, n=10)
    return {"p10": cuts[0], "median": statistics.median(values), "p90": cuts[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="the store benchmarks/tune.py wrote (its --store)")
    parser.add_argument("--fifo-parent", default="",
                        help="the FIFO search's parent run (default: benchmarks/tune.json's)")
    parser.add_argument("--orders", type=int, default=300, help="random orders of the trials to replay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "asha_replay"), help="writes <out>.json and <out>.md")
    args = parser.parse_args()

    measured = json.loads((HERE / "tune.json").read_text())
    parent = args.fifo_parent or measured["fifo"]["parent_run_id"]
    trials, slots, params = recorded_trials(args.store, parent)
    max_t = int(params["max_epochs"])
    fifo = replay(trials, slots, max_t, None, 1)["seconds"]
    in_order = {f"rf{rf}_grace{g}": {**replay(trials, slots, max_t, g, rf), "ratio": None}
                for rf in REDUCTION_FACTORS for g in GRACE_PERIODS}
    for r in in_order.values():
        r["ratio"] = fifo / r["seconds"]
    rng = random.Random(args.seed)
    orders = [rng.sample(trials, len(trials)) for _ in range(args.orders)]
    over_orders = {}
    for rf in REDUCTION_FACTORS:
        for g in GRACE_PERIODS:
            ratios, stopped = [], []
            for order in orders:
                asha = replay(order, slots, max_t, g, rf)
                ratios.append(replay(order, slots, max_t, None, 1)["seconds"] / asha["seconds"])
                stopped.append(len(asha["stopped_at_epochs"]))
            over_orders[f"rf{rf}_grace{g}"] = {"ratio": quantiles(ratios), "stopped_median": statistics.median(stopped),
                                               "share_at_least_x2": sum(r >= 2 for r in ratios) / len(ratios)}
    from benchmarks.run import machine

    results = {"machine": machine(), "fifo_parent_run_id": parent, "trials": len(trials), "slots": slots,
               "max_epochs": max_t, "orders": args.orders, "seed": args.seed,
               "measured": {"fifo_fit_seconds": measured["fifo"]["fit_seconds"],
                            "asha_fit_seconds": measured["asha"]["fit_seconds"],
                            "asha_stopped_at_epochs": measured["asha"]["stopped_at_epochs"],
                            "settings": {"reduction_factor": params.get("reduction_factor"),
                                         "grace_period": params.get("grace_period")}},
               "replayed_fifo_seconds": fifo, "in_the_drawn_order": in_order, "over_random_orders": over_orders}
    Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out + ".md").write_text(report(results))
    print(report(results))


def report(r: dict) -> str:
    m = r["measured"]
    lines = [
        f"ASHA replayed on the {r['trials']} FIFO trials of search {r['fifo_parent_run_id']} ({r['slots']} at once, "
        f"at most {r['max_epochs']} epochs; recorded on {r['machine'].get('cpu', '?')}). Measured: FIFO "
        f"{m['fifo_fit_seconds']:.0f} s, ASHA {m['asha_fit_seconds']:.0f} s (reduction factor "
        f"{m['settings']['reduction_factor']}, grace period {m['settings']['grace_period']}), stopped at "
        f"{m['asha_stopped_at_epochs']}. Replayed FIFO: {r['replayed_fifo_seconds']:.0f} s.", "",
        f"| reduction factor, grace period | drawn order: ratio, stopped at | {r['orders']} random orders: "
        "ratio p10 / median / p90 | orders at x2 or more | trials stopped (median) |",
        "|---|---|---|---|---|",
    ]
    for key, d in r["in_the_drawn_order"].items():
        o = r["over_random_orders"][key]
        rf, grace = key.removeprefix("rf").split("_grace")
        q = o["ratio"]
        lines.append(f"| {rf}, {grace} | x{d['ratio']:.2f}, {d['stopped_at_epochs']} | x{q['p10']:.2f} / "
                     f"x{q['median']:.2f} / x{q['p90']:.2f} | {o['share_at_least_x2']:.0%} | {o['stopped_median']:g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
