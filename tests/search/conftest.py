"""Ray for the searches and sweeps of the tests: one head per test worker, joined through RAY_ADDRESS."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_head(tracking_store) -> str:
    """One local Ray head (127.0.0.1, its own free ports: each pytest-xdist worker has its own) for the whole
    session, stopped at its end: the searches and sweeps that only need a Ray to run on join it instead of
    starting and stopping a head each (seconds every time). Each command still gives its Ray job its own
    tracking store and checkpoint cache (cluster.job_environment), as it would on a user's running cluster.
    The tests of how a command starts, signals and stops its own head do not use it."""
    from mnist_tracking.search.cluster import local_head

    with local_head(None, None) as address:
        yield address


@pytest.fixture
def on_ray(ray_head, monkeypatch) -> str:
    """This test's commands, in this process and in the processes it starts, join the session's Ray."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    return ray_head
