"""A resumed training's parameters: the run's own, changed only where the resume may change them."""

from __future__ import annotations

from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.parameters import resume_changes

# Parameters added after runs were logged without them: the value that reproduces how such a
# run trained (before `early_stopping_monitor`, early stopping watched the val accuracy; before
# `snapshot_points`, no snapshots were taken).
LEGACY_VALUES = {"early_stopping_monitor": "val_acc", "snapshot_points": 0}

# What a resumed run may change: how far to train and where. Everything else (lr, optimizer,
# batch size, seed, data split, ...) is the resumed run's, so its training continues unchanged.
RESUME_MAY_CHANGE = ("epochs", "data_dir", "device", "precision", "register_as", "resume_from")


def resumed_config(config: TrainConfig, checkpoint: dict, run_id: str, finished: bool = False) -> TrainConfig:
    """The resumed run's parameters (from its checkpoint), changed only where this invocation gives
    one of `RESUME_MAY_CHANGE`.

    `config.given`: the parameters the user set (None where that is not known: then a value other
    than the default counts as given, as under `mlflow run`). A given parameter outside `RESUME_MAY_CHANGE`
    whose value differs from the run's is an error, since it would not continue the same training. A run
    whose epochs are all done (or that stopped early) and that did not finish (it failed or was stopped
    while its results were being logged) is resumed to log those results; a `finished` one has nothing
    to continue.
    """
    original = {**LEGACY_VALUES, **checkpoint["params"]}
    conflicts, changed = resume_changes(config, original, RESUME_MAY_CHANGE)
    if conflicts:
        listed = ", ".join(f"{name}={given} (the run has {had})" for name, given, had in conflicts)
        raise UserError(
            f"resuming run {run_id} keeps its training parameters, but these differ: {listed}; "
            f"leave them out (only {', '.join(RESUME_MAY_CHANGE[:4])} may change)"
        )
    resumed = TrainConfig.from_dict({**original, **changed, "resume_from": config.resume_from})
    done, state = checkpoint["epoch"], checkpoint["train_state"]
    if finished and state.get("stopped_early"):
        raise UserError(
            f"run {run_id} stopped early after epoch {done} (no improvement in {original['early_stopping_monitor']} "
            f"in {original['early_stopping']} epochs) and finished; there is nothing to continue: "
            "train a new run instead"
        )
    if finished and resumed.epochs <= done:
        raise UserError(
            f"run {run_id} has already trained {done} epochs; pass epochs greater than {done} "
            f"(now {resumed.epochs}) to continue it"
        )
    if resumed.epochs < done:
        raise UserError(f"run {run_id} has already trained {done} epochs; epochs {resumed.epochs} would end before "
                        f"them: leave epochs out, or pass at least {done}")
    return resumed
