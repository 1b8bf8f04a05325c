"""Ray Tune's pieces of a search: the space as Tune domains, Optuna's seeded TPE, and ASHA saying why it stopped a trial."""

from __future__ import annotations

from mnist_tracking.search_space import CHOICE, INT, LOGUNIFORM, UNIFORM, SearchSpace

# --------------------------------------------------------------------------- the space in Tune's terms


def tune_space(space: SearchSpace) -> dict:
    """The searched parameters as Tune domains (Optuna's searcher reads them)."""
    from ray import tune

    def domain(d):
        low, *rest = d.values
        return {
            UNIFORM: lambda: tune.uniform(low, rest[0]),
            LOGUNIFORM: lambda: tune.loguniform(low, rest[0]),
            INT: lambda: tune.randint(low, rest[0] + 1),  # Tune's upper bound is excluded, ours included
            CHOICE: lambda: tune.choice(list(d.values)),
        }[d.kind]()

    return {name: domain(d) for name, d in space.searched.items()}


# --------------------------------------------------------------------------- the scheduler


def explained_asha(metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: float):
    """Ray's ASHAScheduler (stop_last_trials=False: a trial at its last epoch finishes, logging its test
    evaluation and model) that keeps, in `.reasons`, why it stopped each trial it stopped."""
    from ray.tune.schedulers import ASHAScheduler

    from mnist_tracking.tune_report import stop_reason

    class ExplainedASHA(ASHAScheduler):
        def __init__(self):
            super().__init__(metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                             reduction_factor=reduction_factor, stop_last_trials=False)
            self.reasons: dict[str, str] = {}

        def on_trial_result(self, tune_controller, trial, result):
            rung = self._rung_before(trial, result)
            action = super().on_trial_result(tune_controller, trial, result)
            if action == self.STOP and rung is not None:
                milestone, values, cutoff = rung
                sign = self._metric_op
                self.reasons[trial.trial_id] = stop_reason(
                    int(result[self._time_attr]), max_t, metric, result[metric], sign * cutoff,
                    sign * max(values), len(values), reduction_factor)
            return action

        def _rung_before(self, trial, result):
            """(milestone, recorded values, cutoff) of the rung this result is judged at, before it is recorded."""
            bracket = self._trial_info.get(trial.trial_id)
            if bracket is None or self._time_attr not in result or metric not in result:
                return None
            now = result[self._time_attr]
            for milestone, recorded in bracket._rungs:
                if now < milestone or trial.trial_id in recorded:
                    continue
                values = [v for v in recorded.values() if v is not None]
                return (milestone, values, bracket.cutoff(recorded)) if values else None
            return None

    return ExplainedASHA()


def optuna_searcher(metric: str, mode: str, seed: int, n_startup_trials: int):
    """Optuna's TPE, seeded, with `n_startup_trials` random configurations first."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial: Tune and we report them
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    return OptunaSearch(metric=metric, mode=mode, sampler=sampler)
