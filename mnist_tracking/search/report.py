"""What a `tune` parent shows, as pure builders: the trials table, the trials figure, the parallel-coordinates view."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mnist_tracking.search.space import CHOICE, LOGUNIFORM, SearchSpace

FIGURE_SIZE = (8.0, 5.0)  # inches
STOPPED_BY_ASHA = "stopped by ASHA"  # how a stopped trial's status_reason starts
STOPPED_MARKER, FINISHED_MARKER = "x", "o"


@dataclass
class TrialRow:
    """One trial as the parent reports it."""

    trial_id: str
    run_id: str
    state: str  # the run's status: FINISHED, KILLED, FAILED
    reason: str = ""  # why it ended so, when not FINISHED
    values: dict = field(default_factory=dict)  # its searched values
    history: list = field(default_factory=list)  # (epoch, metric value) in epoch order
    cut_by_scheduler: bool = False  # stopped by ASHA (not by its own early stopping)
    test_acc: float | None = None

    @property
    def epochs_run(self) -> int:
        return max((epoch for epoch, _ in self.history), default=0)

    def best(self, mode: str) -> float | None:
        values = [v for _, v in self.history if v is not None and math.isfinite(v)]
        if not values:
            return None
        return max(values) if mode == "max" else min(values)

    @property
    def complete(self) -> bool:
        """Ran its whole budget or stopped by its own early stopping: a candidate for the best."""
        return self.state == "FINISHED" and not self.cut_by_scheduler


def ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """The complete trials with a metric, best first."""
    candidates = [r for r in rows if r.complete and r.best(mode) is not None]
    return sorted(candidates, key=lambda r: r.best(mode), reverse=mode == "max")


def trials_table(rows: list[TrialRow], space: SearchSpace, metric: str, mode: str, links: dict[str, str]) -> dict:
    """Columns for mlflow.log_table: trial, every searched value, best metric, epochs run, state, reason, run link."""
    names = list(space.searched)
    table = {"trial": [r.trial_id for r in rows]}
    for name in names:
        table[name] = [r.values.get(name) for r in rows]
    table[f"best_{metric}"] = [r.best(mode) for r in rows]
    table["epochs_run"] = [r.epochs_run for r in rows]
    table["test_acc"] = [r.test_acc for r in rows]
    table["state"] = [r.state for r in rows]
    table["reason"] = [r.reason for r in rows]
    table["run"] = [links.get(r.run_id, "") for r in rows]
    return table


def trials_figure(rows: list[TrialRow], metric: str, max_epochs: int, best_trial: str = ""):
    """Every trial's metric per epoch: the ones ASHA stopped end early (x), the best one is drawn thick."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE, layout="constrained")
    axes = figure.add_subplot()
    for row in rows:
        if not row.history:
            continue
        epochs, values = zip(*row.history, strict=True)
        best = row.trial_id == best_trial
        line, = axes.plot(epochs, values, linewidth=2.8 if best else 1.2, alpha=1.0 if best else 0.75,
                          label=f"{row.trial_id} (best)" if best else None)
        marker = STOPPED_MARKER if row.cut_by_scheduler else FINISHED_MARKER if row.state == "FINISHED" else "s"
        axes.plot(epochs[-1], values[-1], marker=marker, color=line.get_color(), markersize=7)
    stopped = sum(r.cut_by_scheduler for r in rows)
    axes.set_title(f"{len(rows)} trials, {stopped} stopped early by ASHA (x); o: ran to the end")
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_xlim(0.8, max_epochs + 0.2)
    axes.set_xticks(range(1, max_epochs + 1))
    axes.grid(alpha=0.3)
    if best_trial:
        axes.legend(loc="best")
    return figure


def parallel_coordinates_html(rows: list[TrialRow], space: SearchSpace, metric: str, mode: str) -> str:
    """A self-contained HTML page (plotly.js inline): one line per trial through its searched values to its
    best metric, coloured by it (log-scaled parameters on a log10 axis, choices as ticks)."""
    import plotly.graph_objects as go

    shown = [r for r in rows if r.best(mode) is not None]
    dimensions = []
    for name, domain in space.searched.items():
        values = [r.values.get(name) for r in shown]
        if domain.kind == CHOICE:
            ticks = [str(v) for v in domain.values]
            dimensions.append(dict(label=name,
                                   values=[ticks.index(str(v)) if str(v) in ticks else np.nan for v in values],
                                   tickvals=list(range(len(ticks))), ticktext=ticks, range=[0, max(len(ticks) - 1, 1)]))
        elif domain.kind == LOGUNIFORM:
            low, high = (math.log10(b) for b in domain.values)
            dimensions.append(dict(label=f"log10 {name}", values=[math.log10(v) for v in values], range=[low, high]))
        else:
            dimensions.append(dict(label=name, values=values, range=list(domain.values)))
    scores = [r.best(mode) for r in shown]
    dimensions.append(dict(label=f"best {metric}", values=scores))
    figure = go.Figure(go.Parcoords(
        line=dict(color=scores, colorscale="Viridis", reversescale=mode == "min", showscale=True),
        dimensions=dimensions,
    ))
    figure.update_layout(title=f"{len(shown)} trials: searched values against the best {metric}",
                         template="plotly_white", margin=dict(l=80, r=80, t=80, b=40))
    return figure.to_html(include_plotlyjs=True, full_html=True)  # inline: opens offline, in MLflow's viewer


def stop_reason(epoch: int, max_epochs: int, metric: str, value: float, cutoff: float, best: float, compared: int,
                reduction_factor: float) -> str:
    """Why ASHA stopped a trial, as the KILLED run's status_reason."""
    return (f"{STOPPED_BY_ASHA} after epoch {epoch} of {max_epochs}: its {metric} {value:.4f} was below the rung's "
            f"cutoff {cutoff:.4f} (the top 1/{reduction_factor:g} of the {compared} trials that reached epoch {epoch} "
            f"before it; best {best:.4f})")
