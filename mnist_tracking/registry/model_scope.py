"""What a registered model's versions are compared on: one dataset and one training size, its first version's."""
from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from mnist_tracking.core.errors import UserError

DATASET, MAX_SAMPLES = "dataset", "max_samples"  # the training run's tag and param; the registered model's tags


@dataclass(frozen=True)
class Scope:
    """Val metrics compare only between trainings on the same data: same dataset, same number of images."""

    dataset: str
    max_samples: str  # as MLflow stores params: "0" = all images

    def text(self) -> str:
        size = "all training images" if self.max_samples == "0" else f"max_samples {self.max_samples}"
        return f"{self.dataset} with {size}"

    def run_filter(self) -> str:
        """The search_runs filter of the trainings in this scope."""
        return f"tags.`{DATASET}` = '{self.dataset}' AND params.`{MAX_SAMPLES}` = '{self.max_samples}'"


def scope_of_run(run) -> Scope | None:
    dataset, max_samples = run.data.tags.get(DATASET), run.data.params.get(MAX_SAMPLES)
    return Scope(dataset, max_samples) if dataset and max_samples is not None else None


def scope_of_model(name: str) -> Scope | None:
    """The registered model's scope: its tags, else its first version's run; None for a new model."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if tags.get(DATASET) and tags.get(MAX_SAMPLES) is not None:
        return Scope(tags[DATASET], tags[MAX_SAMPLES])
    versions = client.search_model_versions(f"name = '{name}'")  # registered before scopes were recorded
    for version in sorted(versions, key=lambda v: int(v.version)):
        try:
            return scope_of_run(client.get_run(version.run_id)) if version.run_id else None
        except MlflowException:  # its run was deleted for good
            return None
    return None


def check_in_scope(run, name: str) -> None:
    """Refuse a training of another dataset than the registered model's (its alias compares val metrics)."""
    scope, theirs = scope_of_model(name), scope_of_run(run)
    if scope and theirs and theirs.dataset != scope.dataset:
        raise UserError(
            f"run {run.info.run_id} ({run.info.run_name}) trained on {theirs.dataset}, but registered model "
            f"{name!r} holds {scope.dataset} models (its first version's dataset); register it under another --name"
        )


def record_scope(name: str, run) -> None:
    """The first version's scope becomes the registered model's, as tags."""
    scope = scope_of_model(name) or scope_of_run(run)
    if scope:
        client = MlflowClient()
        client.set_registered_model_tag(name, DATASET, scope.dataset)
        client.set_registered_model_tag(name, MAX_SAMPLES, scope.max_samples)
