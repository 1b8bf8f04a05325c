"""`tune`: the search space and settings (checked before Ray starts), the parent's pure builders, and
real searches on a real local Ray over the fake data (slow)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from mnist_tracking.core.errors import UserError
from mnist_tracking.search.cluster import absolute_tracking_uri, check_reachable_store
from mnist_tracking.search.report import TrialRow, parallel_coordinates_html, ranked, trials_figure, trials_table
from mnist_tracking.search.settings import TuneConfig, n_startup_trials, trial_config
from mnist_tracking.search.space import DEFAULT_SPACE, load_space, parse_space

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
    assert (space.searched["batch_size"].values == (32, 64)
            and all(type(v) is int for v in space.searched["batch_size"].values))
    assert space.searched["early_stopping"].kind == "int"
    assert space.searched["optimizer"].values == ("sgd", "adam")  # normalised as the training has them
    assert space.fixed == {"scheduler": "plateau", "snapshot_points": 0}


def test_a_yaml_space_file_reads_like_the_compact_syntax(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {loguniform: [1.0e-4, 1.0e-1]}\noptimizer: {choice: [sgd, adam]}\nmomentum: uniform(0.5,0.9)\n"
                    "scheduler: plateau\n")
    assert load_space(str(path)) == load_space(
        "lr=loguniform(1e-4,1e-1); optimizer=choice(sgd,adam); momentum=uniform(0.5,0.9); scheduler=plateau")


def test_a_space_file_built_to_expand_without_bound_is_refused_before_it_expands(tmp_path):
    # "Billion laughs": 9 levels of 9 aliases is 9**9 strings once expanded (gigabytes); refused from its events.
    levels = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "space.yaml"
    bomb.write_text("\n".join(levels + ["lr: *a9"]) + "\n")
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"uses YAML anchors or aliases \(line 1\); write each value out$"):
        load_space(str(bomb))
    assert time.perf_counter() - started < 1
    huge = tmp_path / "huge.yaml"
    huge.write_text("lr: loguniform(1e-4,1e-1)\n" + "# padding\n" * 10_000)
    with pytest.raises(UserError, match=r"has 100026 characters, more than a space needs"):
        load_space(str(huge))


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
    ({"reduction_factor": 1}, "reduction_factor must be a number > 1"),
    ({"compare_top": 1}, "compare_top must be 0"),
    ({"dataset": "cifar"}, "unknown dataset"),
    ({"gpus_per_trial": -1}, "gpus_per_trial must be at least 0"),
])
def test_bad_tune_settings_are_refused_in_one_line(settings, expected):
    with pytest.raises(UserError) as caught:
        TuneConfig(**settings)
    assert expected in str(caught.value)


def test_the_settings_give_every_trial_the_same_data_and_budget(tmp_path):
    settings = TuneConfig(trials=9, max_epochs=4, data_dir="data", seed=7, space="lr=uniform(0.01,0.1); scheduler=none")
    config = trial_config(settings, {"lr": 0.05})
    assert (config.epochs, config.seed, config.lr, config.scheduler) == (4, 7, 0.05, "none")
    assert config.data_dir.startswith("/")  # Ray runs each trial in its own folder
    assert n_startup_trials(settings) == 3  # a third of 9 trials, not Optuna's 10
    assert n_startup_trials(TuneConfig(trials=100)) == 10 and n_startup_trials(TuneConfig(trials=2)) == 2


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


def test_a_trial_larger_than_every_node_is_refused_not_left_waiting():
    from mnist_tracking.search.cluster import unfit_trial

    two_cpus = {"node_cpus": 2.0, "node_gpus": 0.0}  # Tune would only warn, and wait for ever
    assert unfit_trial(two_cpus, 2, 0) == "" and unfit_trial(two_cpus, 0.5, 0) == ""
    assert unfit_trial(two_cpus, 4, 0) == ("cpus_per_trial 4 is more than any node of the Ray cluster has (the largest "
                                           "has 2 CPUs): no trial could start; give at most 2 (or start the local Ray "
                                           "with more: --ray-cpus)")
    assert unfit_trial(two_cpus, 1, 0.5, "training") == ("gpus_per_trial 0.5 is more than any node of the Ray cluster "
                                                         "has (the largest has 0 GPUs): no training could start; give "
                                                         "at most 0")


# --------------------------------------------------------------------------- the parent's builders


def rows():
    space = load_space("lr=loguniform(1e-4,1e-1); optimizer=choice(sgd,adam)")
    return space, [
        TrialRow("a", "r1", "FINISHED", values={"lr": 0.01, "optimizer": "sgd"}, history=[(1, 0.5), (2, 0.8), (3, 0.9)],
                 test_acc=0.88),
        TrialRow("b", "r2", "KILLED", "stopped by ASHA after epoch 1", {"lr": 1e-4, "optimizer": "adam"}, [(1, 0.2)],
                 cut_by_scheduler=True),
        TrialRow("c", "r3", "FINISHED", values={"lr": 0.05, "optimizer": "adam"},
                 history=[(1, 0.6), (2, 0.95), (3, 0.93)]),
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


def test_a_restored_asha_does_not_judge_a_restarted_trial_again_at_a_rung_its_earlier_run_reached():
    """After a SIGKILL, Tune's saved rungs may predate a judgement (it saves 10 s apart or more): a trial restarted
    on --resume was judged again at a rung its first run had passed. The store's epochs say it passed."""
    from types import SimpleNamespace

    from mnist_tracking.search.engine import explained_asha

    def scheduler(earlier=None):
        asha = explained_asha("val_acc", "max", max_t=3, grace_period=1, reduction_factor=2)
        asha.earlier = earlier
        for trial_id in ("good", "restarted"):
            asha.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
        assert asha.on_trial_result(None, SimpleNamespace(trial_id="good"),
                                    {"training_iteration": 1, "val_acc": 0.9}) == "CONTINUE"
        return asha

    restarted, epoch_1 = SimpleNamespace(trial_id="restarted"), {"training_iteration": 1, "val_acc": 0.2}
    assert scheduler().on_trial_result(None, restarted, epoch_1) == "STOP"  # judged at rung 1, as a new trial is
    remembering = scheduler(lambda trial_id: {1: 0.3} if trial_id == "restarted" else {})
    assert remembering.on_trial_result(None, restarted, epoch_1) == "CONTINUE"
    assert remembering.reasons == {}


# --------------------------------------------------------------------------- the command, bad input


@pytest.mark.parametrize("args, expected", [
    (["--space", "scheduler=plateau"], "nothing to search"),
    (["--max-epochs", "2", "--grace-period", "3"], "grace_period must be between"),
    (["--space", "lr=choice(0.1,fast)"], "lr is a number (float), got 'fast'"),
    (["--metric", "accuracy"], "unknown metric 'accuracy'"),
])
def test_cli_tune_refuses_bad_input_in_one_line_without_ray_or_a_run(args, expected, fresh_experiment):
    import mlflow
    from helpers import invoke

    result = invoke("tune", *args)
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [f"Error: {result.stderr.strip()[7:]}"] and expected in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.output
    assert mlflow.search_runs([fresh_experiment]).empty  # nothing half-written


# --------------------------------------------------------------------------- real searches on a local Ray

# lr 1e-5 barely moves in 3 epochs on the fake digits, 0.05 learns them in one: ASHA must stop the former.
TEST_SPACE = "lr=choice(0.00001,0.05); device=cpu; precision=fp32; snapshot_points=50; batch_size=32"
SEARCH = dict(trials=4, max_epochs=3, grace_period=1, space=TEST_SPACE, startup_trials=4, ray_cpus=2, max_concurrent=2,
              compare_top=2, register_as="tune-test-model")


@pytest.fixture(scope="module")
def ray_env():
    """What every Ray our tests start needs here: the loopback address, not the interface's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        yield patch


@pytest.fixture(scope="module")
def search(ray_env, ray_head, data_dir, tmp_path_factory):
    """One real search (4 trials, 3 epochs, 2 at once on a local Ray of 2 CPUs), shared by the tests that read it."""
    import mlflow

    from mnist_tracking.search.tune import tune_and_log

    experiment_id = mlflow.create_experiment(f"tune-{tmp_path_factory.mktemp('x').name}")
    # An earlier test's set_experiment() leaves MLflow's active experiment set, and that wins over
    # MLFLOW_EXPERIMENT_ID: the search would land in "Default" (so set both, as fresh_experiment does).
    ray_env.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)  # (the module's end removes it)
    mlflow.set_experiment(experiment_id=experiment_id)
    lines = []
    settings = TuneConfig(data_dir=str(data_dir), storage=str(tmp_path_factory.mktemp("tune-storage")), **SEARCH)
    try:
        with pytest.MonkeyPatch.context() as patch:  # the session's Ray (tests/search/conftest.py), for it alone
            patch.setenv("RAY_ADDRESS", ray_head)
            parent_id = tune_and_log(settings, echo=lines.append)
    finally:
        mlflow.set_experiment("Default")  # what conftest's fresh_experiment leaves, too
    return experiment_id, parent_id, lines


def runs_of(experiment_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient().search_runs([experiment_id])


@pytest.mark.slow
@pytest.mark.ray
def test_every_trial_is_a_training_run_nested_under_the_tune_parent(search):
    experiment_id, parent_id, _ = search
    runs = runs_of(experiment_id)
    parent = next(r for r in runs if r.info.run_id == parent_id)
    assert parent.data.tags["mnist_tracking.kind"] == "tune" and parent.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mnist_tracking.kind") == "training"]
    assert len(trials) == 4 and len({r.data.tags["mnist_tracking.trial_id"] for r in trials}) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in trials)
    assert all(len(r.data.tags["mnist_tracking.ray_node_id"]) > 20 for r in trials)  # Ray's hex node id
    assert all(r.data.params["epochs"] == "3" and r.data.params["lr"] in ("1e-05", "0.05") for r in trials)
    assert [r.info.status for r in runs if r.info.status not in ("FINISHED", "KILLED")] == []  # none RUNNING


@pytest.mark.slow
@pytest.mark.ray
def test_asha_stops_weak_trials_killed_with_why_and_full_budget_trials_log_everything(search):
    from mlflow.tracking import MlflowClient

    from mnist_tracking.tracking.checkpoints import local_checkpoint

    experiment_id, _, _ = search
    trials = [r for r in runs_of(experiment_id) if r.data.tags.get("mnist_tracking.kind") == "training"]
    stopped = [r for r in trials if r.info.status == "KILLED"]
    assert stopped, [(r.data.params["lr"], r.info.status) for r in trials]
    for run in stopped:
        # At rung 1 mostly; at rung 3 when the order in which Ray ran the trials put a weak one there last (seen
        # once in a whole-suite run: "stopped by ASHA after epoch 3 of 3: its val_acc 0.1125 was below ...").
        assert re.match(r"stopped by ASHA after epoch [13] of 3: its val_acc \S+ was below the rung's cutoff",
                        run.data.tags["status_reason"]), run.data.tags["status_reason"]
        assert "test_acc" not in run.data.metrics and "no test evaluation" in run.data.tags["mlflow.note.content"]
        assert not local_checkpoint(run.info.run_id).parent.exists()  # no checkpoint copy left behind
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) >= 2
    for run in finished:
        assert run.data.metrics["epochs_run"] == 3 and 0 <= run.data.metrics["test_acc"] <= 1
        paths = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
        assert {"features", "summary.json", "checkpoints"} <= paths
        assert MlflowClient().search_logged_models([experiment_id],
                                                   filter_string=f"source_run_id = '{run.info.run_id}'")


@pytest.mark.slow
@pytest.mark.ray
def test_the_parent_logs_the_trials_the_best_its_comparison_and_registration(search):
    from mlflow.tracking import MlflowClient

    experiment_id, parent_id, lines = search
    client = MlflowClient()
    parent = client.get_run(parent_id)
    best_id = parent.data.tags["best_run_id"]
    best = client.get_run(best_id)
    assert best.info.status == "FINISHED" and parent.data.params["best_lr"] == best.data.params["lr"] == "0.05"
    assert parent.data.metrics["best_val_acc"] == max(m.value for m in client.get_metric_history(best_id, "val_acc"))
    assert parent.data.metrics["trials_run"] == 4 and parent.data.metrics["trials_stopped_by_asha"] >= 1
    table = client.load_table(experiment_id, "tune/trials.json", run_ids=[parent_id])
    assert len(table) == 4 and {"trial", "lr", "best_val_acc", "epochs_run", "state", "run"} <= set(table.columns)
    assert set(table["state"]) == {"FINISHED", "KILLED"}
    paths = {a.path for a in client.list_artifacts(parent_id, "tune")}
    assert {"tune/trials.png", "tune/parallel_coordinates.html", "tune/trials.json"} <= paths
    comparison = client.get_run(parent.data.tags["comparison_run_id"])
    assert comparison.data.tags["mnist_tracking.kind"] == "comparison"
    assert comparison.data.tags["mlflow.parentRunId"] == parent_id
    assert best_id in comparison.data.tags["compared_run_ids"].split(",")
    version = client.get_model_version("tune-test-model", parent.data.tags["registered_model_version"])
    assert version.run_id == best_id
    assert any(line.startswith("4 trials:") for line in lines)


@pytest.mark.slow
@pytest.mark.ray
def test_the_report_of_a_search_shows_its_settings_trials_best_and_comparison(search, monkeypatch):
    import mlflow
    from helpers import run_in_process
    from mlflow.tracking import MlflowClient
    from report_checks import Page, check_numbers

    _, parent_id, _ = search
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # no experiment chosen: the parent's holds the report
    result = run_in_process("report", "--run-id", parent_id)
    assert result.returncode == 0, result.stderr
    report = MlflowClient().get_run(result.stdout.split("/runs/")[-1].split("?")[0])
    assert report.data.tags["mnist_tracking.kind"] == "report"
    assert report.data.tags["mlflow.parentRunId"] == parent_id
    page = mlflow.artifacts.load_text(f"runs:/{report.info.run_id}/report/report.html")
    order = ["The search", "The trials", "Parallel coordinates of the trials", "The best trial",
             "Training model ConvNet with learning rate 0.05", "The best trials on one aligned map", "Provenance"]
    assert [page.index(text) for text in order] == sorted(page.index(text) for text in order)
    assert check_numbers(page) > 20 and Page(page).scripts == 0
    assert page.count("data-source=\"trials\"") >= 4 * 2  # every trial's best metric and epochs


def test_a_resume_keeps_the_searchs_settings_and_refuses_a_different_one(tmp_path):
    from mnist_tracking.search.settings import resumed_settings

    original = TuneConfig(trials=4, max_epochs=2, space=TEST_SPACE, data_dir=str(tmp_path), max_samples=600, seed=7,
                          compare_top=2, storage=str(tmp_path / "state"))
    logged = {name: str(value) for name, value in original.to_params().items()}
    parent_id = "0123456789abcdef0123456789abcdef"

    resumed = resumed_settings(TuneConfig(resume=parent_id, given=frozenset({"resume"})), logged, parent_id)
    assert (resumed.trials, resumed.max_epochs, resumed.max_samples, resumed.seed, resumed.compare_top) == (4, 2, 600,
                                                                                                           7, 2)
    assert resumed.search_space == original.search_space and resumed.resume == parent_id
    assert (resumed.data_dir, resumed.storage) == (str(tmp_path), str(tmp_path / "state"))

    moved = resumed_settings(TuneConfig(resume=parent_id, max_concurrent=1, data_dir="/elsewhere",
                                        given=frozenset({"resume", "max_concurrent", "data_dir"})), logged, parent_id)
    assert (moved.max_concurrent, moved.data_dir, moved.trials) == (1, "/elsewhere", 4)
    same = resumed_settings(TuneConfig(resume=parent_id, trials=4, given=frozenset({"resume", "trials"})), logged,
                            parent_id)
    assert same.trials == 4
    with pytest.raises(UserError, match=rf"^resuming search {parent_id} keeps its settings, but these differ: "
                                        r"max_epochs=6 \(the search has 2\), trials=12 \(the search has 4\); leave "
                                        r"them out \(only data_dir, storage"):
        resumed_settings(TuneConfig(resume=parent_id, given=frozenset({"resume", "trials", "max_epochs"})), logged,
                         parent_id)


def tune_command(data_dir, storage, *extra):
    return [sys.executable, "-m", "mnist_tracking", "tune", "--trials", "3", "--max-epochs", "3",
            "--max-concurrent", "1", "--ray-cpus", "1", "--space", TEST_SPACE, "--startup-trials", "3",
            "--compare-top", "0", "--data-dir", str(data_dir), "--storage", str(storage), *extra]


def wait_for(condition, timeout_s: float, what: str, process, err_file, poll_s: float = 1.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"the search ended ({process.returncode}) before {what}: "
                                 f"{err_file.read_text()[-2000:]}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.signals
def test_sigterm_ends_the_search_and_its_trials_killed_and_resume_continues_it(ray_env, data_dir, tmp_path,
                                                                               fresh_experiment):
    import os
    import signal

    from mlflow.tracking import MlflowClient

    client, storage = MlflowClient(), tmp_path / "storage"
    # Files, not pipes: Ray's workers print every epoch, and a full pipe would stall the search.
    out_file, err_file = tmp_path / "out.log", tmp_path / "err.log"
    with out_file.open("w") as out, err_file.open("w") as err:
        process = subprocess.Popen(tune_command(data_dir, storage), stdout=out, stderr=err, text=True,
                                   env={**os.environ, "MLFLOW_EXPERIMENT_ID": fresh_experiment})

    def a_trial_epoch():
        runs = [r for r in runs_of(fresh_experiment) if r.data.tags.get("mnist_tracking.kind") == "training"]
        return any(client.get_metric_history(r.info.run_id, "val_acc") for r in runs)

    wait_for(a_trial_epoch, 900, "a trial's first epoch", process, err_file)  # a loaded machine starts Ray slowly
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    err = err_file.read_text()
    assert process.returncode == 130, err[-2000:]
    runs = runs_of(fresh_experiment)
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    parent = next(r for r in runs if r.data.tags.get("mnist_tracking.kind") == "tune")
    parent_id = parent.info.run_id
    assert parent.info.status == "KILLED" and f"--resume {parent_id}" in parent.data.tags["status_reason"]
    assert f"--resume {parent_id}" in err.strip().splitlines()[-1]
    interrupted = [r for r in runs if "interrupted by SIGTERM" in r.data.tags.get("status_reason", "")
                   and r.data.tags.get("mnist_tracking.kind") == "training"]
    assert interrupted and all(r.info.status == "KILLED" for r in interrupted)
    finished_before = {r.info.run_id for r in runs if r.info.status == "FINISHED"}

    # The resume as printed, from another folder: the space, budget, data and storage are the search's own.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = subprocess.run([sys.executable, "-m", "mnist_tracking", "tune", "--resume", parent_id], cwd=elsewhere,
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "MLFLOW_EXPERIMENT_ID": fresh_experiment})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Tune: 3 trials of at most 3 epochs" in resumed.stdout, resumed.stdout[-2000:]
    runs = runs_of(fresh_experiment)
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    trials = [r for r in runs if r.data.tags.get("mnist_tracking.kind") == "training"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent_id}
    latest = {}
    for run in sorted(trials, key=lambda r: r.info.start_time):
        latest[run.data.tags["mnist_tracking.trial_id"]] = run
    assert len(latest) == 3 and all(r.info.status in ("FINISHED", "KILLED") for r in latest.values())
    assert finished_before <= {r.info.run_id for r in latest.values()}  # a finished trial is not trained again
    # No trial left a local checkpoint copy (about 20 MB each): a resumed search trains its cut trials anew.
    from mnist_tracking.tracking.checkpoints import cache_folder

    assert [r.info.run_id for r in trials if (cache_folder() / r.info.run_id).exists()] == []
    assert not (storage / parent_id).exists()  # Tune's state goes with the search's end
    again = subprocess.run([sys.executable, "-m", "mnist_tracking", "tune", "--resume", parent_id], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "MLFLOW_EXPERIMENT_ID": fresh_experiment})
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == (
        f"Error: search {parent_id} ({parent.info.run_name}) ended FINISHED: every trial ended, and there is nothing "
        "to resume; start a new search")


GROUP_STOP_S = 30  # the bound from signal to exit for a search


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.signals
def test_sigterm_to_the_whole_process_group_ends_the_search_like_a_signal_to_the_command(ray_env, data_dir, tmp_path,
                                                                                        fresh_experiment):
    """What `timeout`, systemd and a terminal send: the signal reaches every process of the command's group.
    Ray's head runs in a session of its own, so it is the command that stops the trials and then its head
    (a SIGTERM to the group once killed Ray's GCS under the search, which waited 60 s for it and exited 1
    with runs left RUNNING)."""
    import os
    import signal
    import time

    import psutil

    err_file = tmp_path / "err.log"
    with err_file.open("w") as err:
        process = subprocess.Popen(tune_command(data_dir, tmp_path / "storage"), stdout=subprocess.DEVNULL, stderr=err,
                                   text=True, start_new_session=True,
                                   env={**os.environ, "MLFLOW_EXPERIMENT_ID": fresh_experiment})

    def a_trial_epoch():
        from mlflow.tracking import MlflowClient

        runs = [r for r in runs_of(fresh_experiment) if r.data.tags.get("mnist_tracking.kind") == "training"]
        return any(MlflowClient().get_metric_history(r.info.run_id, "val_acc") for r in runs)

    wait_for(a_trial_epoch, 900, "a trial's first epoch", process, err_file)
    ray_processes = psutil.Process(process.pid).children(recursive=True)
    assert any(p.name().startswith("raylet") for p in ray_processes)
    signalled = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=300)
    took = time.monotonic() - signalled
    err = err_file.read_text()
    runs = runs_of(fresh_experiment)
    parent = next(r for r in runs if r.data.tags.get("mnist_tracking.kind") == "tune")
    parent_id = parent.info.run_id
    assert process.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"Error: search {parent_id} interrupted by SIGTERM; continue the "
                                                   f"search with --resume {parent_id}"), err[-2000:]
    assert "Traceback" not in err
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    assert parent.info.status == "KILLED"
    assert all(r.data.tags.get("status_reason") for r in runs if r.info.status == "KILLED")
    _, alive = psutil.wait_procs(ray_processes, timeout=30)  # no Ray process left behind
    assert alive == []
    assert took < GROUP_STOP_S, f"{took:.1f} s from the signal to the exit"


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.ray
def test_the_mlflow_ui_shows_the_search_its_nested_trials_the_trials_table_and_figure(search, tmp_path):
    """What a user browses after `tune` (issue 26): the parent with its trials nested under it in the
    runs table, the trials table (`log_table`) and the trials figure on the parent's artifacts."""
    import mlflow
    from browser import Browser, Q, ui_chromium
    from helpers import start_mlflow_server, stop_mlflow_server, wait_for_mlflow_server
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By

    experiment_id, parent_id, _ = search
    parent = MlflowClient().get_run(parent_id)
    trials = [r for r in runs_of(experiment_id) if r.data.tags.get("mnist_tracking.kind") == "training"]
    server, base = start_mlflow_server(mlflow.get_tracking_uri(), tmp_path)  # over the tests' own store
    driver = None
    try:
        wait_for_mlflow_server(server, base, tmp_path)
        driver = ui_chromium()
        browser = Browser(driver, base, tmp_path)
        name = parent.info.run_name
        browser.open(f"/#/experiments/{experiment_id}/runs{Q}", name)
        driver.find_element(By.XPATH,
                            f"//*[text()='{name}']/ancestor::*[contains(@class,'ag-cell-value')]//button").click()
        browser.wait_until(lambda: all(driver.find_elements(By.XPATH, f"//a[contains(@href, '{t.info.run_id}')]")
                                       for t in trials), "the trials are not shown nested under the search")
        browser.shot("tune-1-nested-trials")

        page = f"/#/experiments/{experiment_id}/runs/{parent_id}/artifacts/tune"
        browser.open(f"{page}/trials.json{Q}", "trial", "epochs_run", "state", "best_val_acc",
                     *{t.data.tags["mnist_tracking.trial_id"] for t in trials})
        browser.shot("tune-2-trials-table")
        browser.open(f"{page}/trials.png{Q}", "trials.png")
        browser.wait_until(lambda: [i for i in driver.find_elements(By.TAG_NAME, "img")  # the figure, not an icon
                                    if driver.execute_script("return arguments[0].complete "
                                                             "&& arguments[0].naturalWidth > 200", i)],
                           "tune/trials.png is not shown as a loaded image")
        browser.shot("tune-3-trials-figure")
    finally:
        if driver is not None:
            driver.quit()
        stop_mlflow_server(server)


def ray_is_starting(pid: int) -> bool:
    """Early in ray.init: its GCS server (a child of the command) runs."""
    import psutil

    try:
        return any(p.name().startswith("gcs_server") for p in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


def ray_core_worker_started(pid: int) -> bool:
    """Late in ray.init: the command's own core worker (which installs absl's signal handler) logs."""
    import glob

    return bool(glob.glob(f"/tmp/ray/session_*/logs/python-core-driver-*_{pid}.log"))


@pytest.mark.slow
@pytest.mark.parametrize("command, moment", [("tune", ray_is_starting), ("tune", ray_core_worker_started),
                                             ("sweep", ray_core_worker_started)],
                         ids=["tune-early-in-ray-init", "tune-late-in-ray-init", "sweep-late-in-ray-init"])
@pytest.mark.ray
@pytest.mark.signals
def test_sigterm_while_ray_starts_ends_the_parent_killed_in_one_line(command, moment, ray_env, data_dir, tmp_path,
                                                                      fresh_experiment):
    """ray.init puts its own SIGTERM handler (sys.exit(15)) and, late, absl's (which arms an alarm
    that aborts the process 3 s on): a SIGTERM then used to end the command 15 or -6 with no line,
    its parent FAILED without a reason, or be swallowed and the search run on."""
    import os
    import signal

    import psutil
    from mlflow.tracking import MlflowClient

    args = (tune_command(data_dir, tmp_path / "storage") if command == "tune" else
            [sys.executable, "-m", "mnist_tracking", "sweep", "--data-dir", str(data_dir), "--methods", "pca",
             "--epochs-scale", "0.05"])
    err_file = tmp_path / "err.log"
    with err_file.open("w") as err:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path,
                                   env={**os.environ, "MLFLOW_EXPERIMENT_ID": fresh_experiment})
    # 240 s: imports of torch, MLflow and Ray on a busy machine; polled often, the late moment is short
    wait_for(lambda: moment(process.pid), 240, moment.__name__, process, err_file, poll_s=0.02)
    ray_processes = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    err = err_file.read_text()
    [parent] = runs_of(fresh_experiment)  # no trial or training run was started
    parent_id, reason = parent.info.run_id, parent.data.tags.get("status_reason", "")
    expected = ("interrupted by SIGTERM before its trials started; run the search again" if command == "tune" else
                f"interrupted (SIGTERM); resume it with --resume {parent_id} (-P resume={parent_id})")
    assert (process.returncode, parent.info.status, reason) == (130, "KILLED", expected), err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"Error: {command if command == 'sweep' else 'search'} {parent_id} {expected}")
    assert "Traceback" not in err
    gone, alive = psutil.wait_procs(ray_processes, timeout=30)  # the Ray it started is stopped, not orphaned
    assert alive == []
    assert MlflowClient().get_run(parent_id).info.end_time is not None


# --------------------------------------------------------------------------- a search under failure (issue 34)

DIVERGING = "batch_size=32; snapshot_points=0; device=cpu; precision=fp32"


def failing_search(data_dir, tmp_path, experiment: str, space: str, *extra: str):
    import os

    args = [sys.executable, "-m", "mnist_tracking", "tune", "--space", space, "--trials", "3", "--max-epochs", "2",
            "--startup-trials", "3", "--ray-cpus", "1", "--max-concurrent", "1", "--compare-top", "0",
            "--data-dir", str(data_dir), "--storage", str(tmp_path / "storage"), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "MLFLOW_EXPERIMENT_ID": experiment})


@pytest.mark.slow
@pytest.mark.ray
def test_trials_that_diverge_before_their_first_report_fail_alone_and_the_search_finishes(on_ray, data_dir, tmp_path,
                                                                                         fresh_experiment):
    """Two of three trials diverge in their first epoch (seeded TPE draws lr 2.6e8 and 6.1e5; the third, 31, trains):
    once, the first of them crashed the whole search (`Trial returned a result which did not include the
    specified metric(s)`), and under fifo a healthy trial was left RUNNING."""
    result = failing_search(data_dir, tmp_path, fresh_experiment, f"lr=loguniform(1e-3,1e9); {DIVERGING}",
                            "--trial-scheduler", "fifo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr
    assert "TensorBoard" not in result.stdout and "Downloading artifacts" not in result.stderr  # Ray's, MLflow's
    runs = runs_of(fresh_experiment)
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    [parent] = [r for r in runs if r.data.tags.get("mnist_tracking.kind") == "tune"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 2
    trials = [r for r in runs if r.data.tags.get("mnist_tracking.kind") == "training"]
    failed = [r for r in trials if r.info.status == "FAILED"]
    assert len(trials) == 3 and len(failed) == 2
    assert all(r.data.tags["status_reason"].startswith("diverged: the ") for r in failed)
    assert all("(running)" not in r.data.tags["mlflow.note.content"] for r in runs)
    assert sum(line.startswith("  trial ") and "FAILED after 0 epoch(s), best val_acc - (diverged: " in line
               for line in result.stdout.splitlines()) == 2


@pytest.mark.slow
@pytest.mark.ray
def test_a_search_where_no_trial_finishes_fails_in_one_line(on_ray, data_dir, tmp_path, fresh_experiment):
    result = failing_search(data_dir, tmp_path, fresh_experiment, f"lr=loguniform(1e5,1e9); {DIVERGING}")
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    runs = runs_of(fresh_experiment)
    [parent] = [r for r in runs if r.data.tags.get("mnist_tracking.kind") == "tune"]
    assert lines[0].startswith(f"Error: search {parent.info.run_id}: no trial finished: ")
    assert parent.info.status == "FAILED" and parent.data.tags["status_reason"].startswith("no trial finished: ")
    assert [r.info.status for r in runs if r.data.tags.get("mnist_tracking.kind") == "training"] == ["FAILED"] * 3


@pytest.mark.parametrize("space", ["device=cuda", "device=choice(cpu,cuda)"])
def test_a_device_the_local_ray_cannot_run_is_refused_before_ray_starts(data_dir, fresh_experiment, space,
                                                                         monkeypatch):
    """Case 2 of issue 34: device=cuda on a CPU machine passed the checks, then every trial failed on Ray."""
    import torch

    from mnist_tracking.search.tune import tune_and_log

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device=cuda runs here")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    settings = TuneConfig(space=f"lr=loguniform(1e-3,1e-1); {space}", data_dir=str(data_dir), trials=2)
    with pytest.raises(UserError, match=r"^the search space's device=cuda cannot run here: this machine has no cuda"):
        tune_and_log(settings, echo=lambda line: None)
    assert runs_of(fresh_experiment) == []  # refused before any run (and before Ray)


def test_a_storage_that_cannot_be_tunes_folder_is_one_line_and_a_folders_mode_is_left_as_it_is(tmp_path):
    """Case 5 of issue 34: an existing file, a path under /proc, a folder others may write."""
    import os
    import stat

    from mnist_tracking.search.tune import prepared_storage

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for path, expected in ((a_file, "cannot be Ray Tune's storage folder (File exists)"),
                           ("/proc/self/tune-storage", "cannot be Ray Tune's storage folder (")):
        with pytest.raises(UserError, match=rf"^--storage {path} {re.escape(expected)}"):
            prepared_storage(str(path))
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UserError, match=r"may be written by others \(mode 0777\): --resume unpickles"):
        prepared_storage(str(shared))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777  # reported, not changed
    fresh = tmp_path / "fresh"
    assert prepared_storage(str(fresh)) == str(fresh) and stat.S_IMODE(fresh.stat().st_mode) == 0o700


STORE_DEATH_BOUND_S = 180  # the bound: the bounded HTTP retries (cli.exits.BOUNDED_HTTP), then one line


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.server
def test_a_tracking_server_that_dies_mid_search_ends_it_in_one_line_and_the_resume_completes(on_ray, data_dir,
                                                                                            tmp_path):
    """Case 3 of issue 34: the command once ended 138 s after the server's death with 6 Ray tracebacks, Ray
    retried each trial against the dead server, and the resume crashed leaving trials RUNNING."""
    import os
    import signal

    from helpers import SUBPROCESS_ENV, free_port, start_server
    from mlflow.tracking import MlflowClient

    folder, port = tmp_path / "server", free_port()
    folder.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(folder, port)
    env = {**os.environ, **SUBPROCESS_ENV, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": "0"}
    client = MlflowClient(tracking_uri=uri)
    out_file, err_file = tmp_path / "out.log", tmp_path / "err.log"
    search = [sys.executable, "-m", "mnist_tracking", "tune", "--trials", "2", "--max-epochs", "8",
              "--trial-scheduler", "fifo", "--max-concurrent", "1", "--ray-cpus", "1", "--space", TEST_SPACE,
              "--startup-trials", "2", "--compare-top", "0", "--data-dir", str(data_dir), "--storage",
              str(tmp_path / "storage")]
    process = None
    try:
        with out_file.open("w") as out, err_file.open("w") as err:
            process = subprocess.Popen(search, cwd=tmp_path, env=env, stdout=out, stderr=err, text=True)

        def a_trial_epoch():
            trials = [r for r in client.search_runs(["0"]) if r.data.tags.get("mnist_tracking.kind") == "training"]
            return any(client.get_metric_history(r.info.run_id, "val_acc") for r in trials)

        wait_for(a_trial_epoch, 900, "a trial's first epoch", process, err_file)
        [parent] = [r for r in client.search_runs(["0"]) if r.data.tags.get("mnist_tracking.kind") == "tune"]
        parent_id = parent.info.run_id
        os.killpg(server.pid, signal.SIGKILL)  # the server goes away mid-search
        server.wait(timeout=60)
        died = time.monotonic()
        process.wait(timeout=STORE_DEATH_BOUND_S + 120)
        took = time.monotonic() - died
        err = err_file.read_text()
        assert process.returncode == 1, err[-3000:]
        assert took < STORE_DEATH_BOUND_S, f"{took:.0f} s after the server died"
        assert "Traceback" not in err, err[-3000:]
        [line] = [line for line in err.splitlines() if line.startswith("Error:")]
        assert line.startswith(f"Error: the tracking store stopped answering during search {parent_id} ") and \
            f"continue the search with --resume {parent_id} " in line, line
        assert "retry" not in (out_file.read_text() + err).lower()  # Ray did not retry a trial against the dead store

        # Back on another port, with the same store: the restored trials' saved configs hold the dead URI, and
        # must log where the resuming command logs (cluster.job_environment).
        port = free_port()
        server = start_server(folder, port)
        uri = f"http://127.0.0.1:{port}"
        env, client = {**env, "MLFLOW_TRACKING_URI": uri}, MlflowClient(tracking_uri=uri)
        resumed = subprocess.run([sys.executable, "-m", "mnist_tracking", "tune", "--resume", parent_id], cwd=tmp_path,
                                 env=env, capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        runs = client.search_runs(["0"])
        assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
        assert client.get_run(parent_id).info.status == "FINISHED"
        trials = [r for r in runs if r.data.tags.get("mnist_tracking.kind") == "training"]
        assert {r.data.tags["mnist_tracking.trial_id"] for r in trials} and all(
            r.info.status in ("FINISHED", "FAILED", "KILLED") and (r.info.status == "FINISHED"
                                                                   or r.data.tags.get("status_reason")) for r in trials)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
