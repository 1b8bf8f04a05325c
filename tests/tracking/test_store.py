"""The tracking store made ready once: commands started together on a new sqlite store."""

import subprocess
import sys

import pytest

from mnist_tracking.tracking.store import sqlite_database

COMMANDS_AT_ONCE = 4
# What each process does first: open the store as every command does (cli.exits.user_errors), then use it.
OPEN_THE_STORE = ("from mnist_tracking.tracking.store import ready_store; ready_store(); "
                  "from mlflow.tracking import MlflowClient; print(len(MlflowClient().search_experiments()))")


@pytest.mark.parametrize("uri, database", [
    ("sqlite:///mlflow.db", "mlflow.db"),
    ("sqlite:////tmp/stores/m.db", "/tmp/stores/m.db"),
    ("sqlite:///m.db?timeout=20", "m.db"),
    ("sqlite:///:memory:", ""),
    ("http://127.0.0.1:5000", ""),
    ("postgresql://u@127.0.0.1/db", ""),
])
def test_the_database_of_a_sqlite_store_is_found_relative_or_absolute(uri, database):
    assert sqlite_database(uri) == database


def test_commands_started_together_on_a_new_sqlite_store_create_it_once(tmp_path):
    # Without the lock, two of these fail in MLflow's migrations ("table _alembic_tmp_params already exists").
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'new.db'}", "PATH": "/usr/bin:/bin"}
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_THE_STORE], env=env, cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(COMMANDS_AT_ONCE)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0] * COMMANDS_AT_ONCE, [err[-1500:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["1"] * COMMANDS_AT_ONCE  # the Default experiment, once
