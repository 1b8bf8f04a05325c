"""The `register` entry point: a given training run's model, or the experiment's best, in the Model Registry."""

from __future__ import annotations

from collections.abc import Callable

from mnist_tracking.config import RegisterConfig
from mnist_tracking.experiments import best_training_run, resolve_experiment
from mnist_tracking.model_scope import scope_of_model
from mnist_tracking.ranking import lower_is_better
from mnist_tracking.registry import Registration, check_names, register_run


def register(config: RegisterConfig, echo: Callable[[str], None] = print) -> Registration:
    """Register `run_id`, or the experiment's best finished training run by `metric`; the alias moves
    only to a better model."""
    check_names(config.name, config.alias, config.metric)  # before any lookup
    run_id = config.run_id
    if not run_id:
        experiment = resolve_experiment(config.experiment)
        scope = scope_of_model(config.name)  # only trainings on the registered model's data compete
        best = best_training_run(experiment.experiment_id, config.metric, scope, config.name)
        echo(f"Best finished training run of experiment {experiment.name!r}"
             + (f" on {scope.text()}" if scope else "") + f" by {config.metric} "
             f"({'lowest' if lower_is_better(config.metric) else 'highest'}): {best.info.run_name} ({best.info.run_id})")
        run_id = best.info.run_id
    return register_run(run_id, config.name, echo=echo, metric=config.metric, alias=config.alias)
