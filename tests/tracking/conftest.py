"""Fixtures of the tracking tests: trainings side by side, built once per module."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def module_experiment():
    import mlflow

    return mlflow.create_experiment(f"reliability-{os.urandom(4).hex()}")


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, data_dir, module_experiment):
    """Two identical 3-epoch trainings and one 2-epoch training, all started at once against the
    same sqlite store; then the 2-epoch run resumed to 3 epochs. {name: run_id}.

    With the plateau scheduler, whose lr does not depend on the number of epochs, so that the
    resumed run must match the 3-epoch one exactly (a cosine run resumed to more epochs follows
    the longer cosine from there: tests/core/test_training.py)."""
    from helpers import start_training

    cwd = tmp_path_factory.mktemp("three-runs")
    processes = {
        name: start_training(data_dir, module_experiment, "--epochs", str(epochs), "--scheduler", "plateau", cwd=cwd)
        for name, epochs in (("full", 3), ("again", 3), ("first_two", 2))
    }
    ids = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        assert "database is locked" not in stderr
        ids[name] = stdout.split("; run ")[1].split()[0]
    resumed = start_training(data_dir, module_experiment, "--epochs", "3", "--resume-from", ids["first_two"], cwd=cwd)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    ids["resumed"] = stdout.split("; run ")[1].split()[0]
    return ids
