"""A SIGTERM where a KeyboardInterrupt raised at once would do harm or be lost: inside MLflow's database call (sqlite),
inside a finalizer; and where it is raised at once."""

import os
import signal
import time
import traceback
import weakref

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from mnist_tracking import database_calls, interrupts

ENDING_S = 5.0  # the run's ending write, after the interrupt: well under MLflow's 20 s sqlite busy timeout


@pytest.fixture
def listening():
    """This process's SIGINT/SIGTERM handling as a command has it; the test's own handlers after."""
    before = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    interrupts.listen()
    database_calls.count_connections()
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def sigterm_after_a_select(conn, cursor, statement, *args) -> None:
    """The signal lands just after a SELECT ran, before SQLAlchemy has read its rows."""
    if statement.lstrip().upper().startswith("SELECT"):
        event.remove(Engine, "after_cursor_execute", sigterm_after_a_select)
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("write", ["set_tags", "log_metric"])
def test_sigterm_inside_a_database_call_waits_for_it_and_the_run_ends_killed_at_once(listening, fresh_experiment, write):
    run = mlflow.start_run()
    mlflow.log_param("before", 1)  # the store is connected: what follows is one call in the middle of a run
    event.listen(Engine, "after_cursor_execute", sigterm_after_a_select)
    try:
        with pytest.raises(KeyboardInterrupt) as interrupted:
            if write == "set_tags":
                mlflow.set_tags({"a": "1", "b": "2"})
            else:
                mlflow.log_metric("m", 1.0, step=3)
    finally:
        if event.contains(Engine, "after_cursor_execute", sigterm_after_a_select):
            event.remove(Engine, "after_cursor_execute", sigterm_after_a_select)
    assert str(interrupted.value) == "SIGTERM"
    frames = traceback.extract_tb(interrupted.tb)
    assert not any("sqlalchemy" in f.filename for f in frames), "raised inside SQLAlchemy: " + frames[-1].filename
    started = time.monotonic()
    mlflow.set_tag("status_reason", "interrupted by SIGTERM")  # what killed_on_interrupt and the trainer write
    mlflow.end_run("KILLED")
    assert time.monotonic() - started < ENDING_S
    ended = MlflowClient().get_run(run.info.run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["status_reason"] == "interrupted by SIGTERM"
    # MLflow's call is one store call or several (set_tags: a batch each for params, tags, metrics);
    # the store call the signal landed in wrote all of its rows or none
    if write == "set_tags":
        assert {"a", "b"} & set(ended.data.tags) in (set(), {"a", "b"})
    else:
        assert [(m.step, m.value) for m in MlflowClient().get_metric_history(run.info.run_id, "m")] in ([], [(3, 1.0)])

def test_a_signal_outside_a_database_call_is_raised_where_it_lands(listening):
    with pytest.raises(KeyboardInterrupt) as interrupted:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(ENDING_S)  # the handler runs here, at once
    names = [f.name for f in traceback.extract_tb(interrupted.tb)]
    assert names[:2] == ["test_a_signal_outside_a_database_call_is_raised_where_it_lands", "_stop"], names


class Cache:
    """An object with a weakref callback, as SQLAlchemy's and the standard library's registries have."""


def test_a_sigterm_that_lands_in_a_finalizer_still_stops_the_command(listening, capsys):
    """Python drops an exception raised in a weakref callback ("Exception ignored in ..."): a sweep
    SIGTERMed while `import ray` collected garbage once trained on to its end and exited 0."""
    ran = []

    def finalizer(ref) -> None:  # called by Python when the object goes, inside whatever code runs then
        ran.append("finalizer")
        os.kill(os.getpid(), signal.SIGTERM)  # os.kill runs the handler before it returns: inside the finalizer
        ran.append("after the signal")  # not reached: the KeyboardInterrupt was raised above, and dropped

    cache = Cache()
    ref = weakref.ref(cache, finalizer)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        del cache  # the finalizer runs; its KeyboardInterrupt is dropped, the signal delivered again
        time.sleep(ENDING_S)  # ... and raised here, in the command's own code
    assert ran == ["finalizer"] and ref() is None
    assert str(interrupted.value) == "SIGTERM" and interrupts.received_name() == "SIGTERM"
    names = [f.name for f in traceback.extract_tb(interrupted.tb)]
    assert names[0] == "test_a_sigterm_that_lands_in_a_finalizer_still_stops_the_command" and "finalizer" not in names
    assert "Exception ignored" not in capsys.readouterr().err
