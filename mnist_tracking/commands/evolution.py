"""The `evolution` entry point: a training run's feature snapshots on aligned layouts, animated epoch by epoch."""

from __future__ import annotations

from collections.abc import Callable

from mnist_tracking.config import EvolutionConfig
from mnist_tracking.evolution_run import FOLDER, evolve_and_log
from mnist_tracking.links import ui_url
from mnist_tracking.runs import get_run


def evolution(config: EvolutionConfig, echo: Callable[[str], None] = print) -> str:
    """Follow the run's snapshots into an evolution run, then say where to look. Returns its id."""
    run_id = evolve_and_log(config, echo=echo)
    experiment_id = get_run(run_id).info.experiment_id
    echo(f"View the evolution: {ui_url(experiment_id, run_id)}  ({FOLDER}/<method>.html: press play; {FOLDER}/<method>.gif)")
    return run_id
