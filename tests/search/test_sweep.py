"""The `sweep` entry point: the seed's three trainings as nested runs, projected and compared."""

import subprocess
import sys
import time
from dataclasses import replace

import mlflow
import numpy as np
import pytest
from helpers import run_in_process
from mlflow.tracking import MlflowClient
from report_checks import check_numbers

from mnist_tracking.core.config import SweepConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.study import SEED_TRAININGS, scaled, trainings
from mnist_tracking.search.sweep import sweep_and_log
from mnist_tracking.search.trial import NODE_TAG, TRIAL_TAG
from mnist_tracking.tracking.runs import PARENT_RUN_TAG

TINY_SCALE = 0.05  # (1) 1 epoch, (2) 20 -> 1 epoch, (3) 50 -> 2 epochs (patience 5 -> 1)


def runs_by_kind(experiment_id):
    runs = MlflowClient().search_runs([experiment_id])
    kinds = {}
    for run in runs:
        kinds.setdefault(run.data.tags.get("mnist_tracking.kind"), []).append(run)
    return kinds


def artifact_names(run_id, path=""):
    return {a.path for a in MlflowClient().list_artifacts(run_id, path)}


def test_seed_trainings_are_the_seeds_settings():
    (one, two, three) = [t.config for t in SEED_TRAININGS]
    assert all(c.optimizer == "sgd" and c.momentum == 0 and c.activation == "relu" and c.batch_size == 128
               for c in (one, two, three))
    assert (one.lr, one.epochs, one.scheduler) == (1e-6, 1, "none")
    assert (two.lr, two.epochs, two.scheduler, two.early_stopping) == (1e-3, 20, "none", 0)
    assert (three.lr, three.epochs, three.scheduler, three.early_stopping) == (0.01, 50, "plateau", 5)


def test_the_comparison_says_what_epochs_scale_made_of_the_epoch_counts():
    from mnist_tracking.core.config import SweepConfig
    from mnist_tracking.core.study import scale_note

    assert scale_note(SweepConfig(epochs_scale=1.0)) == ""
    note = scale_note(SweepConfig(epochs_scale=0.5))
    assert note.startswith("epochs_scale=0.5: ")
    # (2) is labelled "20 epochs" and runs 10; (3) at most 25, stopping after 2 epochs without progress
    assert ("(1) 1 epoch;" in note and "(2) 10 epochs;" in note
            and "(3) 25 epochs at most, early stopping after 2." in note)


def test_epochs_scale_scales_every_epoch_count_but_never_below_one():
    planned = trainings(SweepConfig(data_dir="somewhere", max_samples=300, epochs_scale=0.1))
    assert [t.config.epochs for t in planned] == [1, 2, 5]
    assert [t.config.early_stopping for t in planned] == [0, 0, 1]  # off stays off
    assert all(t.config.data_dir == "somewhere" and t.config.max_samples == 300 for t in planned)
    assert scaled(50, 1.0) == 50 and scaled(3, 0.01) == 1


def test_an_epochs_scale_past_the_epoch_bound_is_refused_before_any_run(data_dir, fresh_experiment):
    """Case 6 of issue 34: `--epochs-scale 1e9` was accepted, printed `Epoch 1/1000000000`."""
    config = SweepConfig(data_dir=str(data_dir), methods="pca", epochs_scale=1e9)
    with pytest.raises(UserError, match=r"^epochs_scale 1e\+09 makes the longest training's 50 epochs 50000000000, "
                                        r"more than 1000; give at most 20$"):
        sweep_and_log(config, echo=lambda line: None)
    assert MlflowClient().search_runs([fresh_experiment]) == []


@pytest.mark.parametrize("params, expected", [
    (dict(epochs_scale=0), "epochs_scale must be a number > 0"),
    (dict(epochs_scale=float("nan")), "epochs_scale must be a number > 0"),
    (dict(methods="pca,isomap"), "unknown method 'isomap'"),
    (dict(max_samples=-1), "max_samples must be at least 0"),
])
def test_bad_sweep_parameters_are_refused(params, expected):
    with pytest.raises(UserError, match=expected):
        SweepConfig(**params)


def by_label(runs):
    return sorted(runs, key=lambda r: r.data.tags["sweep_label"])  # "(1) …", "(2) …", "(3) …"


def overlapping(runs) -> int:
    """How many pairs of the runs were running at the same time."""
    spans = [(r.info.start_time, r.info.end_time) for r in runs]
    return sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_trains_projects_and_compares_three_nested_runs(on_ray, data_dir, fresh_experiment):
    # Half a CPU a training: all three fit on a local Ray of even one core, so they train side by side.
    config = SweepConfig(data_dir=str(data_dir), methods="pca", epochs_scale=TINY_SCALE, cpus_per_trial=0.5)
    lines = []
    parent_id = sweep_and_log(config, echo=lines.append)

    kinds = runs_by_kind(fresh_experiment)
    [parent] = kinds["sweep"]
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    children = by_label(kinds["training"])
    assert [r.data.tags[PARENT_RUN_TAG] for r in children] == [parent_id] * 3
    assert [r.data.tags["sweep_label"] for r in children] == [t.label for t in SEED_TRAININGS]
    # They ran on the trial runner of `tune`: Ray trials, tagged, and side by side.
    assert len({r.data.tags[TRIAL_TAG] for r in children}) == 3 and all(NODE_TAG in r.data.tags for r in children)
    assert overlapping(children) >= 1, [(r.info.start_time, r.info.end_time) for r in children]
    assert any(line.startswith(f"3 training(s) on Ray ({on_ray}, ") and "0.5 CPU(s) each" in line
               for line in lines), lines
    assert [r.info.status for r in children] == ["FINISHED"] * 3
    assert [float(r.data.params["lr"]) for r in children] == [1e-6, 1e-3, 0.01]
    assert {r.data.params["momentum"] for r in children} == {"0.0"}
    assert [int(r.data.params["epochs"]) for r in children] == [1, 1, 2]

    # Each training has its own projection run, nested under it.
    projections = kinds["projection"]
    assert sorted(p.data.tags[PARENT_RUN_TAG] for p in projections) == sorted(r.info.run_id for r in children)
    assert all("pca_knn_acc" in p.data.metrics for p in projections)

    assert {"comparison.png", "comparison.md"} <= artifact_names(parent_id)
    client = MlflowClient()
    table = client.download_artifacts(parent_id, "comparison.md")
    text = open(table).read()
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [t.label for t in SEED_TRAININGS]
    for row, child in zip(rows, children, strict=True):  # the table holds what the children logged
        assert f"{child.data.metrics['best_val_acc']:.2%}" in row
        assert f"{child.data.metrics['test_acc']:.2%}" in row
        assert row.split(" | ")[10].endswith(" s")  # the training's wall time
    assert parent.data.tags["mlflow.note.content"].count("| (") == 3  # the description shows the table

    # The comparison is `compare`'s, aligned, on the parent: linked views, the table, changed answers.
    assert {"comparison/pca.html", "comparison/pca.png", "comparison/what_moved.json",
            "comparison/what_moved.csv"} <= artifact_names(parent_id, "comparison")
    assert parent.data.tags["compared_run_ids"] == ",".join(r.info.run_id for r in children)
    metrics = parent.data.metrics
    assert {"pair_1_2_fixed", "pair_1_3_broken", "pair_2_3_moved_fraction", "pca_residual_3"} <= set(metrics)
    answers = [line for line in text.splitlines() if line.startswith(f"| 1 → 3: {SEED_TRAININGS[0].label} → ")]
    assert len(answers) == 1 and (f"| {int(metrics['pair_1_3_fixed'])} | {int(metrics['pair_1_3_broken'])} |"
                                  in answers[0])

    # `report` rebuilds the study from these runs: the course report's numbers beside ours, each checked.
    result = run_in_process("report", "--run-id", parent_id)
    assert result.returncode == 0, result.stderr
    report_id = result.stdout.split("/runs/")[-1].split("?")[0]
    assert MlflowClient().get_run(report_id).data.tags["mlflow.parentRunId"] == parent_id
    page = mlflow.artifacts.load_text(f"runs:/{report_id}/report/report.html")
    assert "The study: the course report&#x27;s numbers beside ours" in page
    assert all(training.seed_reported in page for training in SEED_TRAININGS)
    assert page.count("Training model ConvNet with learning rate") == 3 and "comparison.png" in page
    assert check_numbers(page) > 50


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_training_is_recorded_on_its_child_and_a_resume_trains_only_it_again(on_ray, data_dir,
                                                                                     fresh_experiment):
    # A real failure: lr=1e6 diverges within a few batches.
    diverging = replace(SEED_TRAININGS[1], config=replace(SEED_TRAININGS[1].config, lr=1e6, batch_size=16))
    study = (SEED_TRAININGS[0], diverging, SEED_TRAININGS[2])
    config = SweepConfig(data_dir=str(data_dir), methods="pca", epochs_scale=TINY_SCALE)
    lines = []
    with pytest.raises(UserError, match=r"1 of 3 trainings failed: \(2\) lr 1e-3, 20 epochs \(run \w+\): .*diverged"):
        sweep_and_log(config, echo=lines.append, study=study)

    kinds = runs_by_kind(fresh_experiment)
    [old] = kinds["sweep"]
    old_id = old.info.run_id
    assert old.info.status == "FAILED" and "1 of 3 trainings failed" in old.data.tags["status_reason"]
    children = by_label(kinds["training"])
    assert [r.info.status for r in children] == ["FINISHED", "FAILED", "FINISHED"]
    assert "diverged" in children[1].data.tags["status_reason"]
    assert children[1].data.tags[PARENT_RUN_TAG] == old_id
    # The two that finished were projected and compared; the failed one is a row saying so.
    assert len(kinds["projection"]) == 2
    assert {"comparison.png", "comparison.md"} <= artifact_names(old_id)
    text = open(MlflowClient().download_artifacts(old_id, "comparison.md")).read()
    assert "| (2) lr 1e-3, 20 epochs |" in text and "FAILED: " in text
    assert any("(2) lr 1e-3, 20 epochs failed" in line for line in lines)

    # Then its process was killed while a fourth child was running (what `kill -9` leaves in the
    # store: a RUNNING child), and the sweep is resumed with the seed's own trainings.
    client = MlflowClient()
    stale = client.create_run(fresh_experiment, tags={PARENT_RUN_TAG: old_id, "mnist_tracking.kind": "training"})
    before = {r.info.run_id: r for r in runs_by_kind(fresh_experiment)["training"]}
    finished = {r.data.tags["sweep_label"]: r.info.run_id for r in before.values() if r.info.status == "FINISHED"}
    assert len(finished) == 2

    lines = []
    parent_id = sweep_and_log(replace(config, resume=old_id), echo=lines.append)

    kinds = runs_by_kind(fresh_experiment)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["resumed_from"] == old_id
    assert client.get_run(old_id).data.tags["resumed_as"] == parent_id
    children = [r for r in kinds["training"] if r.data.tags[PARENT_RUN_TAG] == parent_id]
    labelled = {r.data.tags["sweep_label"]: r for r in children}
    assert sorted(labelled) == sorted(t.label for t in SEED_TRAININGS) and len(children) == 3
    # (1) and (3) are the same runs as before, moved under the new parent; only (2) was trained again.
    assert {label: labelled[label].info.run_id for label in finished} == finished
    assert labelled[SEED_TRAININGS[1].label].info.run_id not in before
    assert len(kinds["training"]) == len(before) + 1
    assert len(kinds["projection"]) == 3  # two reused, one new
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert sum("Reusing finished run" in line for line in lines) == 2
    text = open(client.download_artifacts(parent_id, "comparison.md")).read()
    assert text.count("| (") == 3 and "FAILED" not in text


def test_cli_sweep_refuses_bad_input_in_one_line_without_a_run(fresh_experiment):
    from helpers import invoke

    result = invoke("sweep", "--epochs-scale", "-1")
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: epochs_scale must be a number > 0 (1 = the course report's epochs), got -1.0"
    ]
    assert MlflowClient().search_runs([fresh_experiment]) == []


@pytest.mark.slow
@pytest.mark.ray
def test_cli_sweep_asking_more_cpus_than_ray_has_fails_in_one_line_instead_of_waiting(on_ray, tmp_path, data_dir,
                                                                                     fresh_experiment):
    from helpers import env_for, one_error_line

    result = subprocess.run([sys.executable, "-m", "mnist_tracking", "sweep", "--data-dir", str(data_dir),
                             "--cpus-per-trial", "4096"], cwd=tmp_path, env=env_for(fresh_experiment),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert line.startswith("Error: cpus_per_trial 4096 is more than any node of the Ray cluster has (the largest has ")
    assert line.endswith("): no training could start; give at most " + line.split("the largest has ")[1].split(" ")[0])
    [parent] = runs_by_kind(fresh_experiment)["sweep"]
    assert parent.info.status == "FAILED" and parent.data.tags["status_reason"] == line.removeprefix("Error: ")
    assert "training" not in runs_by_kind(fresh_experiment)  # nothing trained, nothing left RUNNING


@pytest.mark.slow
@pytest.mark.ray
def test_the_sweep_entry_point_logs_into_mlflow_runs_run(on_ray, data_dir, fresh_experiment):
    from helpers import as_mlflow_run

    # all three side by side, passed through MLproject
    result, _ = as_mlflow_run("sweep", fresh_experiment, data_dir=data_dir, methods="pca", epochs_scale=TINY_SCALE,
                              cpus_per_trial=0.5)
    assert result.returncode == 0, result.stderr[-3000:]
    kinds = runs_by_kind(fresh_experiment)
    [parent] = kinds["sweep"]  # the run `mlflow run` created is the parent: no extra run
    assert parent.info.status == "FINISHED" and parent.info.run_name == "seed-study"
    assert len(kinds["training"]) == 3 and len(kinds["projection"]) == 3
    assert {r.data.tags[PARENT_RUN_TAG] for r in kinds["training"]} == {parent.info.run_id}
    assert parent.data.params["cpus_per_trial"] == "0.5" and f"3 training(s) on Ray ({on_ray}, " in result.stdout
    png = MlflowClient().download_artifacts(parent.info.run_id, "comparison.png")
    from PIL import Image

    assert np.asarray(Image.open(png)).shape[0] > 500  # three rows of panels
    assert "View the sweep: http://127.0.0.1:5000/#/experiments/" in result.stdout


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.signals
def test_resume_refuses_a_sweep_still_run_by_a_live_process(tmp_path, data_dir, fresh_experiment):
    from helpers import STARTUP_TIMEOUT_S, cli_command, env_for, wait_until

    args = ["--data-dir", str(data_dir), "--methods", "pca", "--epochs-scale", str(TINY_SCALE)]
    process = subprocess.Popen(cli_command("sweep", *args), cwd=tmp_path, env=env_for(fresh_experiment),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def tagged():
            return [r for r in runs_by_kind(fresh_experiment).get("sweep", [])
                    if "mnist_tracking.process" in r.data.tags]

        wait_until(tagged, process, STARTUP_TIMEOUT_S, "the sweep's run")
        [live] = runs_by_kind(fresh_experiment)["sweep"]
        assert live.data.tags["mnist_tracking.process"].endswith(f":{process.pid}")
        config = SweepConfig(data_dir=str(data_dir), methods="pca", epochs_scale=TINY_SCALE, resume=live.info.run_id)
        with pytest.raises(UserError) as error:
            sweep_and_log(config, echo=lambda line: None)
    finally:
        process.terminate()
        process.communicate(timeout=STARTUP_TIMEOUT_S)
    assert str(error.value) == (
        f"sweep {live.info.run_id} is still RUNNING (process {process.pid} on "
        f"{live.data.tags['mnist_tracking.process'].rsplit(':', 1)[0]}); "
        "resuming it now would fork it: stop it first (Ctrl-C or SIGTERM end it KILLED), then resume it")
    assert len(runs_by_kind(fresh_experiment)["sweep"]) == 1  # the refusal started no run
    assert MlflowClient().get_run(live.info.run_id).info.status != "RUNNING"  # SIGTERM ended it


@pytest.mark.slow
@pytest.mark.ray
def test_resume_refuses_what_is_not_a_like_sweep_and_names_the_newest_resume(on_ray, data_dir, fresh_experiment):
    config = SweepConfig(data_dir=str(data_dir), methods="pca", epochs_scale=TINY_SCALE)
    quiet = dict(echo=lambda line: None, study=SEED_TRAININGS[:1])
    first = sweep_and_log(config, **quiet)
    child = runs_by_kind(fresh_experiment)["training"][0].info.run_id
    before = len(MlflowClient().search_runs([fresh_experiment]))  # parent, training, projection, evolution
    with pytest.raises(UserError, match=rf"^run {child} \(.*\) is not a sweep; pass the id of a seed-study"):
        sweep_and_log(replace(config, resume=child), **quiet)
    with pytest.raises(UserError, match=rf"^sweep {first} ran with methods=pca, epochs_scale=0.05; "
                                        r"resume it with the same"):
        sweep_and_log(replace(config, resume=first, methods="tsne", epochs_scale=1.0), **quiet)
    assert len(MlflowClient().search_runs([fresh_experiment])) == before  # no run was started by the refusals

    second = sweep_and_log(replace(config, resume=first), **quiet)
    before = len(MlflowClient().search_runs([fresh_experiment]))
    with pytest.raises(UserError) as error:
        sweep_and_log(replace(config, resume=first), **quiet)
    assert str(error.value) == (
        f"sweep {first} was already resumed as {second}, which holds its finished trainings now; resume the newest "
        f"of that line instead: --resume {second} (-P resume={second})")
    assert len(MlflowClient().search_runs([fresh_experiment])) == before  # nothing started, nothing moved
    third = sweep_and_log(replace(config, resume=second), **quiet)  # the newest resumes soundly
    assert MlflowClient().get_run(third).data.tags["resumed_from"] == second


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.signals
def test_sigterm_ends_the_sweep_and_the_trainings_it_cut_killed(tmp_path, data_dir, fresh_experiment):
    import signal

    from helpers import STARTUP_TIMEOUT_S, cli_command, env_for

    client = MlflowClient()
    # (2) trains 20 epochs: it is still training when the signal comes. Files, not pipes: Ray's
    # workers print every epoch, and a full pipe would stall the sweep.
    out_file, err_file = tmp_path / "out.log", tmp_path / "err.log"
    with out_file.open("w") as out, err_file.open("w") as err:
        process = subprocess.Popen(cli_command("sweep", "--data-dir", str(data_dir), "--methods", "pca"), cwd=tmp_path,
                                   env=env_for(fresh_experiment), stdout=out, stderr=err, text=True)

    def an_epoch_logged():
        return any(client.get_metric_history(r.info.run_id, "val_acc")
                   for r in runs_by_kind(fresh_experiment).get("training", []))

    try:
        deadline = time.monotonic() + 3 * STARTUP_TIMEOUT_S  # Ray and its workers start slowly on a busy machine
        while not an_epoch_logged():
            assert process.poll() is None and time.monotonic() < deadline, err_file.read_text()[-2000:]
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STARTUP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err_file.read_text()[-2000:]
    kinds = runs_by_kind(fresh_experiment)
    [parent] = kinds["sweep"]
    parent_id = parent.info.run_id
    assert parent.info.status == "KILLED" and f"--resume {parent_id}" in parent.data.tags["status_reason"]
    assert "Tuner.restore" not in err_file.read_text()  # Ray's advice names a folder the sweep deletes
    assert err_file.read_text().strip().splitlines()[-1].startswith(
        f"Error: sweep {parent_id} interrupted (by SIGTERM during its trainings); resume it with --resume {parent_id}")
    assert [r.info.run_id for r in MlflowClient().search_runs([fresh_experiment]) if r.info.status == "RUNNING"] == []
    cut = [r for r in kinds["training"] if r.info.status == "KILLED"]
    assert cut and all(r.data.tags["status_reason"].startswith("interrupted by SIGTERM after epoch") for r in cut)
    assert "projection" not in kinds  # nothing was projected after the interruption
