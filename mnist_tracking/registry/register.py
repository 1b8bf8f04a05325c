"""The Model Registry: a training run's model registered once, the alias moved only to a better one, under a lock."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from mnist_tracking.core import stopping
from mnist_tracking.core.config import ALIAS, REGISTER_METRIC, RegisterConfig, TrainConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.model import MODEL_NAME
from mnist_tracking.registry.experiments import (
    beats,
    best_training_run,
    invalid_metric_value,
    lower_is_better,
    resolve_experiment,
)
from mnist_tracking.registry.locks import registry_lock
from mnist_tracking.registry.model_files import (
    OUTPUT_TAG,
    SERVE_ENV,
    checked_model_output,
    model_description,
)
from mnist_tracking.registry.model_scope import check_in_scope, record_scope, scope_of_model
from mnist_tracking.tracking.links import ui_hint, ui_model_url
from mnist_tracking.tracking.runs import NOTE_TAG, SOURCE_RUN_TAG, attempted_run_tags
from mnist_tracking.tracking.source_runs import require_training_run
from mnist_tracking.tracking.train import train_and_log

LOGGED_MODEL_NAME = "model"  # the name `log_model` gives the network; `runs:/<run_id>/model`




@dataclass
class Registration:
    """What `register_run` did: the version of `name` that holds the run's model, and the alias."""

    name: str
    version: int
    run_id: str
    metric: str
    value: float
    created: bool  # False: the run was registered before, that version is reused
    alias: str
    has_alias: bool  # the version holds `alias` after the call
    alias_reason: str




def logged_model_of(run):
    """The LoggedModel `model` the training run logged (MLflow 3 keeps it beside the run's artifacts)."""
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{LOGGED_MODEL_NAME}'",
        output_format="list",
    )
    ready = [m for m in models if str(m.status).upper().endswith("READY")]
    if not ready:
        raise UserError(
            f"run {run.info.run_id} ({run.info.run_name}) has no logged model {LOGGED_MODEL_NAME!r}; "
            f"only training runs log one, at their end: pass the id of a finished training run"
        )
    return max(ready, key=lambda m: m.creation_timestamp)  # the latest, should there be several


def ensure_registered_model(name: str) -> None:
    """Create `name`, or bring its description up to date (what its versions answer)."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description=model_description(name))
        return
    if registered.description != model_description(name):
        client.update_registered_model(name, description=model_description(name))


def check_names(name: str, alias: str, metric: str) -> None:
    """Reject bad names before anything is written, with MLflow's own rules (`latest`, `v3`, `a/b`)."""
    from mlflow.exceptions import MlflowException

    if not metric.strip():
        raise UserError("metric is empty; pass e.g. --metric best_val_acc (or a *_loss metric: lower is better)")
    try:  # private helpers, so guarded: MLflow checks the same again when it writes
        from mlflow.utils.validation import (
            _validate_model_alias_name,
            _validate_model_alias_name_reserved,
            _validate_model_name,
        )
    except ImportError:
        return
    checks = [("name", name, _validate_model_name)]
    if alias:  # empty: register without an alias
        checks += [("alias", alias, _validate_model_alias_name), ("alias", alias, _validate_model_alias_name_reserved)]
    for what, value, check in checks:
        try:
            check(value)
        except MlflowException as exc:
            raise UserError(
                f"{what} {value!r} is not allowed: {exc.message.splitlines()[0].rstrip('.')}; "
                f"choose another --{what}"
            ) from exc


def holder_value(version, metric: str) -> float | None:
    """The holder's `metric`: from its run, else from the tags we put on the version."""
    from mlflow.exceptions import MlflowException

    try:
        value = MlflowClient().get_run(version.run_id).data.metrics.get(metric) if version.run_id else None
    except MlflowException:  # the run was deleted for good
        value = None
    if value is None and version.tags.get("metric") == metric:
        value = float(version.tags["metric_value"])
    return value


def apply_alias(name: str, version: int, alias: str, metric: str, value: float) -> tuple[bool, str]:
    """Move `alias` to `version` only if it beats the holder on `metric`; returns (holds, why)."""
    from mlflow.exceptions import MlflowException

    if not alias:
        return False, "no alias asked for"
    client = MlflowClient()
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None and int(holder.version) == version:
        return True, f"version {version} already holds {alias!r}"
    if holder is None:
        reason = f"no version held {alias!r} yet"
    else:
        held = holder_value(holder, metric)
        if held is not None and invalid_metric_value(metric, held):
            reason = f"version {holder.version}'s {metric} {held} is not a valid value, so any valid one beats it"
            client.set_registered_model_alias(name, alias, version)
            return True, reason
        if held is None:
            return False, (
                f"{alias!r} stays on version {holder.version}, which has no {metric} to compare with; move it "
                f"by hand if you mean to (MlflowClient().set_registered_model_alias)"
            )
        if not beats(value, held, metric):
            better = "lower" if lower_is_better(metric) else "higher"
            return False, (
                f"{alias!r} stays on version {holder.version}: its {metric} {held:.4f} is {better} than or "
                f"equal to this run's {value:.4f}"
            )
        reason = f"{metric} {value:.4f} beats version {holder.version}'s {held:.4f}"
    client.set_registered_model_alias(name, alias, version)
    return True, reason


def register_run(
    run_id: str,
    name: str,
    echo: Callable[[str], None] = print,
    metric: str = REGISTER_METRIC,
    alias: str = ALIAS,
) -> Registration:
    """Register the training run's model as a version of `name` (once per run) and give it
    `alias` if it beats the version holding it on `metric`."""
    check_names(name, alias, metric)
    run = require_training_run(run_id, "register it", finished=True)
    run_id = run.info.run_id
    check_in_scope(run, name)
    value = metric_of(run, metric)
    model = logged_model_of(run)
    output = checked_model_output(model, run)
    stopping.check()  # the last safe point: the alias is read, compared and moved as one step
    with registry_lock(echo):  # create, look up and move the alias as one step among concurrent registrations
        ensure_registered_model(name)
        version, created = version_of(run, model, name, metric, value, output)
        record_scope(name, run)
        has_alias, reason = apply_alias(name, version, alias, metric, value)
    registration = Registration(name, version, run_id, metric, value, created, alias, has_alias, reason)
    echo_registration(registration, run.info.run_name, echo)
    describe_mlflow_run_command_run(registration)
    return registration


def metric_of(run, metric: str) -> float:
    """The run's value of `metric`; UserError naming the metrics it has when it has not that one,
    or saying why its value cannot rank a model."""
    value = run.data.metrics.get(metric)
    if value is None:
        raise UserError(
            f"run {run.info.run_id} ({run.info.run_name}) has no metric {metric!r}; choose one of "
            f"{', '.join(sorted(run.data.metrics)) or '(it has none: is it a training run?)'}"
        )
    problem = invalid_metric_value(metric, value)
    if problem:
        raise UserError(f"run {run.info.run_id} ({run.info.run_name}) cannot be registered by {metric}: {problem}")
    return float(value)


def version_of(run, model, name: str, metric: str, value: float, output: str) -> tuple[int, bool]:
    """The version of `name` holding the run's model, created unless the run was registered before
    (a version from the same run or the same LoggedModel is reused); returns (version, created)."""
    client = MlflowClient()
    run_id = run.info.run_id
    source = f"models:/{model.model_id}"
    existing = [
        v for v in client.search_model_versions(f"run_id = '{run_id}'")
        if v.name == name and (v.run_id == run_id or v.source == source)
    ]
    if existing:
        return min(int(v.version) for v in existing), False
    tags = {SOURCE_RUN_TAG: run_id, "source_run_name": run.info.run_name or "", "metric": metric,
            "metric_value": repr(value), OUTPUT_TAG: output}
    # The LoggedModel's URI, as MLflow 3 expects: the version links to it and to its run. Through
    # the client, not mlflow.register_model, which prints "Registered model ... already exists"
    # on a first registration (ensure_registered_model has just created it, with its description).
    version = int(client.create_model_version(name, source, run_id=run_id, tags=tags, model_id=model.model_id).version)
    link_logged_model(client, model.model_id, name, version)
    metrics = run.data.metrics
    others = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("best_val_acc", "test_acc", "best_val_loss")
                       if k in metrics and k != metric)
    client.update_model_version(
        name, version,
        description=(
            f"{MODEL_NAME} from run {run.info.run_name} ({run_id}), chosen by {metric} {value:.4f}"
            + (f"; {others}" if others else "") + f". Answers {output}."
        ),
    )
    return version, True


def link_logged_model(client: MlflowClient, model_id: str, name: str, version: int) -> None:
    """Tag the LoggedModel with its registered versions, as mlflow.register_model does: the runs
    table's Models column reads this tag to show "mnist-convnet v1" instead of the bare "model"."""
    versions = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    versions.append({"name": name, "version": str(version)})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})


def echo_registration(reg: Registration, run_name: str, echo: Callable[[str], None]) -> None:
    what = "Registered" if reg.created else "Already registered:"
    echo(f"{what} run {run_name} ({reg.run_id}) as {reg.name} version {reg.version} ({reg.metric} {reg.value:.4f}).")
    if reg.has_alias:
        echo(f"Alias {reg.alias!r} -> version {reg.version}: {reg.alias_reason}.")
    else:
        echo(f"No alias: {reg.alias_reason}.")
    echo(f"View it: {ui_model_url(reg.name, reg.version)}{ui_hint()}")
    if reg.has_alias:
        echo(f"Serve it: {SERVE_ENV} mlflow models serve -m \"models:/{reg.name}@{reg.alias}\" --env-manager local")


def describe_mlflow_run_command_run(reg: Registration) -> None:
    """`mlflow run -e register` wraps us in a run: say in it what was registered."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or run_id == reg.run_id:  # `main` with register_as: that is the training run itself
        return
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    # named register-of-<run name>, and nested under that run when both share an experiment
    for key, value in {
        **attempted_run_tags("register", {"run_id": reg.run_id}, experiment_id),
        "registered_model_name": reg.name,
        "registered_model_version": str(reg.version),
        SOURCE_RUN_TAG: reg.run_id,
        NOTE_TAG: (
            f"Registered run {reg.run_id} as **{reg.name}** version {reg.version} ({reg.metric} {reg.value:.4f}). "
            + (f"Alias {reg.alias!r}: {reg.alias_reason}." if reg.has_alias else f"No alias: {reg.alias_reason}.")
        ),
    }.items():
        client.set_tag(run_id, key, value)


def register(config: RegisterConfig, echo: Callable[[str], None] = print) -> Registration:
    """The `register` entry point's steps: register `run_id`, or the experiment's best finished training run by
    `metric`; the alias moves only to a better model."""
    check_names(config.name, config.alias, config.metric)  # before any lookup
    run_id = config.run_id
    if not run_id:
        experiment = resolve_experiment(config.experiment)
        scope = scope_of_model(config.name)  # only trainings on the registered model's data compete
        best = best_training_run(experiment.experiment_id, config.metric, scope, config.name)
        echo(f"Best finished training run of experiment {experiment.name!r}"
             + (f" on {scope.text()}" if scope else "") + f" by {config.metric} "
             f"({'lowest' if lower_is_better(config.metric) else 'highest'}): "
             f"{best.info.run_name} ({best.info.run_id})")
        run_id = best.info.run_id
    return register_run(run_id, config.name, echo=echo, metric=config.metric, alias=config.alias)


def train_and_register(config: TrainConfig, echo: Callable[[str], None] = print, progress: bool = True) -> str:
    """The `main` entry point's steps: train and log as configured; with `register_as`, register the model (the
    alias rule of `register`). Returns the training run's id."""
    if config.register_as:  # a bad name must fail now, not after the whole training
        check_names(config.register_as, ALIAS, REGISTER_METRIC)
    run_id = train_and_log(config, echo=echo, progress=progress)
    if config.register_as:
        register_run(run_id, name=config.register_as, echo=echo, metric=REGISTER_METRIC, alias=ALIAS)
    return run_id
