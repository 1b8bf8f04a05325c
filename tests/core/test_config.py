"""Each parameter is defined once (config.py): MLproject and the click options agree with it, and its checks hold."""

from __future__ import annotations

import re

import pytest
import yaml
from fakes import REPO
from helpers import (
    invoke,
    one_error_line,
    runs_of,
)

from mnist_tracking.cli.main import ENTRY_POINTS
from mnist_tracking.cli.main import main as cli
from mnist_tracking.core.config import (
    CompareConfig,
    ProjectConfig,
    SweepConfig,
    TrainConfig,
)
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.parameters import given_under_mlflow_run, parameters

MLPROJECT_TYPES = {"float": float, "int": int, "string": str, "path": str}


def mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_mlproject_and_the_cli_agree_with_the_one_definition(entry_point):
    command, config_class = ENTRY_POINTS[entry_point]
    spec = mlproject()["entry_points"][entry_point]
    options = {option.name: option for option in cli.commands[command].params}
    defined = parameters(config_class)
    assert list(spec["parameters"]) == [p.name for p in defined]
    assert list(options) == [p.name for p in defined]
    for p in defined:
        in_mlproject, option = spec["parameters"][p.name], options[p.name]
        assert in_mlproject["type"] == p.mlproject and MLPROJECT_TYPES[in_mlproject["type"]] is p.type, p.name
        assert option.opts == [p.flag] and option.help == p.help and option.required == p.required, p.name
        if p.required:
            assert "default" not in in_mlproject, p.name
        else:
            assert p.type(in_mlproject["default"]) == p.default == option.default, p.name
        # MLflow passes every parameter to its option
        assert re.search(rf"{p.flag} \{{{p.name}\}}", spec["command"]), p.name


def test_help_texts_are_written_for_every_parameter():
    for _, config_class in ENTRY_POINTS.values():
        for p in parameters(config_class):
            assert p.help.endswith(".") and len(p.help) > 10, (config_class.__name__, p.name)


@pytest.mark.parametrize("values, message", [
    (dict(lr=0), "lr must be a number > 0, got 0.0"),
    (dict(lr=float("nan")), "lr must be a number > 0, got nan"),
    (dict(epochs=0), "epochs must be between 1 and 1000, got 0"),
    (dict(epochs=1001), "epochs must be between 1 and 1000, got 1001"),
    (dict(weight_decay=float("inf")), "weight_decay must be at least 0 and finite, got inf"),
    (dict(batch_size=1), "batch_size must be at least 2 (BatchNorm cannot train on one image a batch), got 1"),
    (dict(val_fraction=1.0), "val_fraction must be between 0 and 1 (exclusive), got 1.0"),
    (dict(seed=-1), f"seed must be between 0 and {2**32 - 1}, got -1"),
    (dict(max_samples=-5), "max_samples must be at least 0 (0 = all), got -5"),
    (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop': choose one of sgd, adam, adamw"),
    (dict(epochs="many"), "epochs must be an integer, got 'many'"),
])
def test_a_value_outside_its_range_is_refused_in_one_line_that_says_the_range(values, message):
    with pytest.raises(UserError) as caught:
        TrainConfig(**values)
    assert str(caught.value) == message


def test_strings_are_stripped_and_choices_case_insensitive():
    config = TrainConfig(optimizer=" SGD ", data_dir=" /data ", register_as=" my model ", resume_from="  ")
    assert (config.optimizer, config.data_dir, config.register_as, config.resume_from) == (
        "sgd", "/data", "my model", "")
    assert ProjectConfig(run_id=" abc ", split="TEST").run_id == "abc"
    from mnist_tracking.core.config import RegisterConfig

    assert RegisterConfig(name="my model ", alias=" champion", experiment=" exp").name == "my model"  # not a 2nd model


def test_the_other_entry_points_check_their_ranges_too():
    with pytest.raises(UserError, match="max_points must be at least 10, got 5"):
        ProjectConfig(run_id="x", max_points=5)
    with pytest.raises(UserError, match="dims must be 2 or 3, got 4"):
        ProjectConfig(run_id="x", dims=4)
    with pytest.raises(UserError, match="run_id is required"):
        ProjectConfig(run_id="   ")
    with pytest.raises(UserError, match=r"epochs_scale must be a number > 0 \(1 = the course report's epochs\)"):
        SweepConfig(epochs_scale=0)
    with pytest.raises(UserError, match="run_ids needs two or more"):
        CompareConfig(run_ids="a,")


def test_under_mlflow_run_a_value_that_differs_from_its_default_counts_as_given():
    assert given_under_mlflow_run(TrainConfig()) == frozenset()
    assert given_under_mlflow_run(TrainConfig(lr=0.5, optimizer="ADAM", epochs=20)) == {"lr", "optimizer"}


def test_the_logged_params_are_the_parameters_only():
    config = TrainConfig(given=frozenset({"lr"}))
    assert list(config.to_dict()) == [p.name for p in parameters(TrainConfig)]
    assert TrainConfig.from_dict({**config.to_dict(), "world_size": 1}) == config


def test_batch_size_one_is_refused_before_any_run(fresh_experiment):
    result = invoke("train", "--batch-size", "1")
    assert "batch_size must be at least 2 (BatchNorm cannot train on one image a batch), got 1" in one_error_line(
        result.stderr)
    assert runs_of(fresh_experiment) == []


@pytest.mark.parametrize("points", [1, 10, 19])
def test_too_few_snapshot_points_to_judge_are_refused_up_front(points):
    with pytest.raises(UserError, match=rf"snapshot_points must be 0 \(off\) or at least 20 "
                                        rf"\(two of each digit\), got {points}"):
        TrainConfig(snapshot_points=points)
    assert TrainConfig(snapshot_points=0).snapshot_points == 0 and TrainConfig(snapshot_points=20).snapshot_points == 20


@pytest.mark.parametrize("args, expected", [
    (["--max-samples", "12"], "snapshot_points=1000 of the 2 val images leaves 2 point(s), too few"),
    (["--val-fraction", "0.999"], "val_fraction=0.999 of 400 images leaves 0 training and 400 val images"),
])
def test_ranges_that_depend_on_the_data_are_checked_before_any_run(data_dir, fresh_experiment, args, expected):
    from helpers import invoke, one_error_line, runs_of

    result = invoke("train", "--data-dir", str(data_dir), "--device", "cpu", *args)
    assert result.exit_code != 0 and expected in one_error_line(result.stderr), result.stderr
    assert runs_of(fresh_experiment) == []
