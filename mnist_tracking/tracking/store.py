"""The tracking store made ready once per command: a new sqlite store's schema is created by one process at a time."""
from __future__ import annotations

import fcntl

import mlflow
from mlflow.tracking import MlflowClient

SQLITE_PREFIX = "sqlite:///"


def sqlite_database(uri: str) -> str:
    """The database file of a sqlite tracking URI ("" for any other store or an in-memory one)."""
    if not uri.startswith(SQLITE_PREFIX):
        return ""
    path = uri[len(SQLITE_PREFIX):].split("?", 1)[0]  # sqlite:///mlflow.db is relative, sqlite:////tmp/m.db not
    return "" if path in ("", ":memory:") else path


def ready_store() -> None:
    """Open the tracking store (MLflow creates or upgrades a sqlite store's schema on first use) while holding an
    exclusive flock on its database file. Two commands started at once on a new mlflow.db would otherwise both run
    MLflow's migrations, and the second fails on them ("table _alembic_tmp_params already exists"). The lock is
    the database file itself (sqlite's own locks are POSIX locks, which flock does not see), so nothing is left
    beside it; other stores (a server, PostgreSQL, files) create their schema once, elsewhere."""
    database = sqlite_database(mlflow.get_tracking_uri())
    if not database:
        return
    try:
        handle = open(database, "ab")  # an empty file is a new sqlite database
    except OSError:
        return  # a folder this user cannot write: MLflow's own first call says so
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            MlflowClient().search_experiments(max_results=1)  # the first call creates the store
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
