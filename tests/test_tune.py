"""`tune`: the search space and settings (checked before Ray starts), the parent's pure builders, and
real searches on a real local Ray over the fake data (slow)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mnist_tracking.errors import UserError
from mnist_tracking.search_space import DEFAULT_SPACE, load_space, parse_space
from mnist_tracking.trials import absolute_tracking_uri, check_reachable_store
from mnist_tracking.tune_report import TrialRow, parallel_coordinates_html, ranked, trials_figure, trials_table
from mnist_tracking.tune_settings import TuneSettings


# --------------------------------------------------------------------------- the search space


def test_the_default_space_searches_the_usual_training_levers():
    space = load_space("")
    assert {n: d.kind for n, d in space.searched.items()} == {
        "lr": "loguniform", "momentum": "uniform", "weight_decay": "loguniform", "optimizer": "choice",
        "batch_size": "choice", "activation": "choice"}
    assert space.fixed == {}
    assert parse_space(space.text()) == space == parse_space(DEFAULT_SPACE)


def test_the_compact_syntax_reads_ranges_choices_and_fixed_values_in_their_types():
    space = load_space("lr=loguniform(1e-4, 1e-1); batch_size=choice(32,64); early_stopping=int(2,4);"
                       " optimizer=choice(SGD,adam)\nscheduler=Plateau; snapshot_points=0")
    assert space.searched["lr"].values == (1e-4, 0.1)
    assert space.searched["batch_size"].values == (32, 64) and all(type(v) is int for v in space.searched["batch_size"].values)
    assert space.searched["early_stopping"].kind == "int"
    assert space.searched["optimizer"].values == ("sgd", "adam")  # normalised as the training has them
    assert space.fixed == {"scheduler": "plateau", "snapshot_points": 0}


def test_a_yaml_space_file_reads_like_the_compact_syntax(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {loguniform: [1.0e-4, 1.0e-1]}\noptimizer: {choice: [sgd, adam]}\nmomentum: uniform(0.5,0.9)\n"
                    "scheduler: plateau\n")
    assert load_space(str(path)) == load_space(
        "lr=loguniform(1e-4,1e-1); optimizer=choice(sgd,adam); momentum=uniform(0.5,0.9); scheduler=plateau")


@pytest.mark.parametrize("space, expected", [
    ("scheduler=plateau", "nothing to search"),
    ("lrate=loguniform(1e-4,1e-1)", "unknown parameter 'lrate'"),
    ("batch_size=choice(32,abc)", "batch_size is an integer, got 'abc'"),
    ("batch_size=uniform(16,64)", "batch_size is an integer: uniform(...) draws floats"),
    ("optimizer=choice(sgd,rmsprop)", "unknown optimizer 'rmsprop'"),
    ("lr=loguniform(0,0.1)", "lr must be a number > 0"),
    ("weight_decay=loguniform(0,0.1)", "loguniform needs bounds > 0"),
    ("lr=uniform(0.1,0.01)", "empty range"),
    ("batch_size=choice(1,32)", "batch_size must be at least 2"),
    ("seed=choice(1,2)", "--seed"),
    ("epochs=int(1,5)", "--max-epochs"),
    ("val_fraction=uniform(0.1,0.3)", "never searched"),
    ("lr=normal(0,1)", "unknown kind normal"),
    ("lr", "cannot read 'lr'"),
    ("lr=choice(0.1,0.1)", "distinct values"),
])
def test_bad_search_spaces_are_refused_in_one_line(space, expected):
    with pytest.raises(UserError, match=None) as caught:
        load_space(space)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("settings, expected", [
    ({"trials": 0}, "trials must be at least 1"),
    ({"max_epochs": 3, "grace_period": 4}, "grace_period must be between 1 and max_epochs (3)"),
    ({"metric": "test_acc"}, "unknown metric 'test_acc'"),
    ({"metric": "snapshot_knn_acc", "space": "lr=uniform(0.01,0.1); snapshot_points=0"}, "needs feature snapshots"),
    ({"reduction_factor": 1}, "reduction_factor must be > 1"),
    ({"compare_top": 1}, "compare_top must be 0"),
    ({"dataset": "cifar"}, "unknown dataset"),
    ({"gpus_per_trial": -1}, "gpus_per_trial must be >= 0"),
])
def test_bad_tune_settings_are_refused_in_one_line(settings, expected):
    with pytest.raises(UserError) as caught:
        TuneSettings(**settings)
    assert expected in str(caught.value)


def test_the_settings_give_every_trial_the_same_data_and_budget(tmp_path):
    settings = TuneSettings(trials=9, max_epochs=4, data_dir="data", seed=7, space="lr=uniform(0.01,0.1); scheduler=none")
    config = settings.trial_config({"lr": 0.05})
    assert (config.epochs, config.seed, config.lr, config.scheduler) == (4, 7, 0.05, "none")
    assert config.data_dir.startswith("/")  # Ray runs each trial in its own folder
    assert settings.n_startup_trials() == 3  # a third of 9 trials, not Optuna's 10
    assert TuneSettings(trials=100).n_startup_trials() == 10 and TuneSettings(trials=2).n_startup_trials() == 2


def test_a_relative_tracking_uri_is_made_absolute_for_the_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert absolute_tracking_uri("./mlruns") == f"file://{tmp_path}/mlruns"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_cluster_refuses_a_store_its_other_machines_cannot_reach():
    check_reachable_store(1, "sqlite:////tmp/mlflow.db", "/tmp/mlruns/0")  # one machine: fine
    with pytest.raises(UserError, match="local file that the other 1 machine"):
        check_reachable_store(2, "sqlite:////tmp/mlflow.db", "mlflow-artifacts:/0")
    with pytest.raises(UserError, match="cannot write"):
        check_reachable_store(3, "http://10.0.0.1:5000", "/tmp/mlruns/0")
    check_reachable_store(3, "http://10.0.0.1:5000", "mlflow-artifacts:/0")


# --------------------------------------------------------------------------- the parent's builders


def rows():
    space = load_space("lr=loguniform(1e-4,1e-1); optimizer=choice(sgd,adam)")
    return space, [
        TrialRow("a", "r1", "FINISHED", values={"lr": 0.01, "optimizer": "sgd"}, history=[(1, 0.5), (2, 0.8), (3, 0.9)],
                 test_acc=0.88),
        TrialRow("b", "r2", "KILLED", "stopped by ASHA after epoch 1", {"lr": 1e-4, "optimizer": "adam"}, [(1, 0.2)],
                 cut_by_scheduler=True),
        TrialRow("c", "r3", "FINISHED", values={"lr": 0.05, "optimizer": "adam"}, history=[(1, 0.6), (2, 0.95), (3, 0.93)]),
        TrialRow("d", "r4", "FAILED", "diverged", {"lr": 0.1, "optimizer": "sgd"}, []),
    ]


def test_the_best_trials_are_complete_ones_never_those_asha_cut():
    space, trials = rows()
    trials[1].history = [(1, 0.99)]  # better than all, but cut: never the best
    assert [r.trial_id for r in ranked(trials, "max")] == ["c", "a"]
    assert [r.trial_id for r in ranked(trials, "min")] == ["a", "c"]


def test_the_trials_table_has_a_column_per_searched_value_and_the_outcome():
    space, trials = rows()
    table = trials_table(trials, space, "val_acc", "max", {"r1": "http://ui/r1"})
    assert table["trial"] == ["a", "b", "c", "d"] and table["optimizer"] == ["sgd", "adam", "adam", "sgd"]
    assert table["best_val_acc"] == [0.9, 0.2, 0.95, None] and table["epochs_run"] == [3, 1, 3, 0]
    assert table["state"] == ["FINISHED", "KILLED", "FINISHED", "FAILED"] and table["run"][0] == "http://ui/r1"


def test_the_trials_figure_draws_one_line_per_trial_that_reported():
    space, trials = rows()
    axes = trials_figure(trials, "val_acc", 3, best_trial="c").axes[0]
    curves = [line for line in axes.lines if len(line.get_xdata()) > 1 or line.get_marker() == "None"]
    assert len(curves) == 3  # d reported nothing
    assert "1 stopped early by ASHA" in axes.get_title()


def test_the_parallel_coordinates_view_is_self_contained():
    space, trials = rows()
    html = parallel_coordinates_html(trials, space, "val_acc", "max")
    assert "parcoords" in html and "log10 lr" in html
    assert '<script src="http' not in html  # plotly.js inline: opens offline and in MLflow's artifact viewer


# --------------------------------------------------------------------------- the command, bad input


@pytest.mark.parametrize("args, expected", [
    (["--space", "scheduler=plateau"], "nothing to search"),
    (["--max-epochs", "2", "--grace-period", "3"], "grace_period must be between"),
    (["--space", "lr=choice(0.1,fast)"], "lr is a number (float), got 'fast'"),
])
def test_cli_tune_refuses_bad_input_in_one_line_without_ray_or_a_run(args, expected, fresh_experiment):
    import mlflow

    result = subprocess.run([sys.executable, "-m", "mnist_tracking", "tune", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"Error: {result.stderr.strip()[7:]}"] and expected in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stdout + result.stderr
    assert mlflow.search_runs([fresh_experiment]).empty  # nothing half-written
