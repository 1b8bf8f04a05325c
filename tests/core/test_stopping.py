"""Ctrl-C and SIGTERM as a flag: recorded wherever they land (a database write, a finalizer, Tune's setup),
acted on at the next safe point, and the run they cut ended KILLED, whole, in one place."""

import os
import signal
import time
import weakref

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from mnist_tracking.core import stopping
from mnist_tracking.core.stopping import Stopped
from mnist_tracking.tracking.runs import ended

ENDING_S = 5.0  # the run's ending write, after the stop: well under MLflow's 20 s sqlite busy timeout


@pytest.fixture
def listening():
    """This process's SIGINT/SIGTERM handling as a command has it; the test's own handlers after."""
    with stopping.listening():
        yield


@pytest.mark.signals
def test_a_signal_is_recorded_never_raised_and_the_next_safe_point_stops(listening):
    stopping.check()  # nothing came: a safe point returns
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # the handler has run by now, and raised nothing here
    os.kill(os.getpid(), signal.SIGINT)  # a later signal (`mlflow run` follows Ctrl-C with SIGTERM) is ignored
    assert stopping.received() == "SIGTERM"
    with pytest.raises(Stopped, match="^SIGTERM$"):
        stopping.check()
    assert isinstance(Stopped("SIGTERM"), KeyboardInterrupt) and not isinstance(Stopped("x"), Exception)


def test_a_command_run_in_another_program_gives_its_handlers_back():
    before = {s: signal.getsignal(s) for s in stopping.SIGNALS}
    with stopping.listening():
        assert all(stopping.is_ours(signal.getsignal(s)) for s in stopping.SIGNALS)
    assert {s: signal.getsignal(s) for s in stopping.SIGNALS} == before
    assert stopping.received() == ""


SENT: list[str] = []


def sigterm_after_a_select(conn, cursor, statement, *args) -> None:
    """The signal lands just after a SELECT ran, before SQLAlchemy has read its rows: where a raised
    KeyboardInterrupt once left the sqlite lock held and the run RUNNING (`database is locked`)."""
    if statement.lstrip().upper().startswith("SELECT") and not SENT:
        SENT.append(statement)
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("write", ["set_tags", "log_metric"])
@pytest.mark.signals
def test_a_signal_inside_a_database_write_leaves_whole_rows_and_the_run_killed_at_once(listening, fresh_experiment,
                                                                                      write):
    run = mlflow.start_run()
    mlflow.log_param("before", 1)  # the store is connected: what follows is one call in the middle of a run
    SENT.clear()
    event.listen(Engine, "after_cursor_execute", sigterm_after_a_select)
    try:
        with pytest.raises(Stopped), run, ended(run, lambda name, what: (f"interrupted by {name}", what)):
            if write == "set_tags":
                mlflow.set_tags({"a": "1", "b": "2"})
            else:
                mlflow.log_metric("m", 1.0, step=3)
            assert stopping.received() == "SIGTERM"  # it landed inside the write, which went on to its end
            started = time.monotonic()
            stopping.check()  # the next safe point
    finally:
        event.remove(Engine, "after_cursor_execute", sigterm_after_a_select)
    assert SENT  # the signal did land inside the write
    assert time.monotonic() - started < ENDING_S
    ended_run = MlflowClient().get_run(run.info.run_id)
    assert ended_run.info.status == "KILLED"
    assert ended_run.data.tags["status_reason"] == "interrupted by SIGTERM"
    if write == "set_tags":  # the whole write is there, not half of it
        assert {"a", "b"} <= set(ended_run.data.tags)
    else:
        assert [(m.step, m.value) for m in MlflowClient().get_metric_history(run.info.run_id, "m")] == [(3, 1.0)]


class Cache:
    """An object with a weakref callback, as SQLAlchemy's and the standard library's registries have."""


@pytest.mark.signals
def test_a_sigterm_that_lands_in_a_finalizer_still_stops_the_command(listening, capsys):
    """A finalizer (a weakref callback, run by the garbage collector inside any code) drops what is raised in
    it: a sweep SIGTERMed while `import ray` collected garbage once trained on to its end and exited 0."""
    ran = []

    def finalizer(ref) -> None:
        ran.append("finalizer")
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before os.kill returns: inside the finalizer
        ran.append("after the signal")

    cache = Cache()
    ref = weakref.ref(cache, finalizer)
    del cache
    assert ran == ["finalizer", "after the signal"] and ref() is None
    with pytest.raises(Stopped, match="^SIGTERM$"):
        stopping.check()
    assert "Exception ignored" not in capsys.readouterr().err


def test_an_error_ends_the_run_failed_with_its_line(fresh_experiment):
    with pytest.raises(ValueError), mlflow.start_run() as run, ended(run, lambda name, what: ("", "")):
        raise ValueError("bad value\nmore")
    failed = MlflowClient().get_run(run.info.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["status_reason"] == "ValueError: bad value"


# --------------------------------------------------------------------------- Tune


TUNE_SETUP_S = 0.5  # Tune's fit() sets itself up (seconds on a busy machine) before it installs its handler
STEP_S = 0.05
STEPS = 200


class SlowStartingTuner:
    """Tune's fit() as our flag meets it: setup first, then Tune's own SIGINT handler (Ray's real
    `_setup_signal_catching`), then its loop, which calls our callback before each step and ends once
    that handler saw a Ctrl-C."""

    def __init__(self, signum: int, before_setup: bool = True) -> None:
        from mnist_tracking.search.engine import StopTune

        self.signum, self.before_setup, self.callback = signum, before_setup, StopTune()
        self.steps = 0
        self.stopped_by_tune = False

    def fit(self) -> list:
        from ray.tune.tune import _setup_signal_catching

        if self.before_setup:
            os.kill(os.getpid(), self.signum)  # lands during the setup, before Tune listens
            time.sleep(TUNE_SETUP_S)
        interrupted = _setup_signal_catching()
        if not self.before_setup:
            os.kill(os.getpid(), self.signum)  # straight to Tune's handler, before its loop's first step
        while not interrupted.is_set() and self.steps < STEPS:  # `while not runner.is_finished() and not ...`
            self.callback.on_step_begin(self.steps, [])
            self.steps += 1
            time.sleep(STEP_S)
        self.stopped_by_tune = interrupted.is_set()
        return ["results"]


@pytest.mark.signals
def test_a_signal_before_fit_stops_the_command_there(listening):
    from mnist_tracking.search.engine import fit

    tuner = SlowStartingTuner(signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Stopped):  # nothing of Tune's to save yet
        fit(tuner)
    assert tuner.steps == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_before_tune_listens_stops_the_search_the_way_tune_stops_it(listening, signum):
    from mnist_tracking.search.engine import fit

    tuner = SlowStartingTuner(signum)
    results = fit(tuner)  # the signal comes inside fit(), before Tune's handler is in place
    assert tuner.stopped_by_tune, f"{signal.Signals(signum).name} before Tune listened was lost: the search ran on"
    assert tuner.steps <= 2  # handed to Tune at its loop's first step
    assert results == ["results"]  # fit() returned as Tune returns after a stop, not cut short
    assert stopping.received() == signal.Signals(signum).name
    assert all(stopping.is_ours(signal.getsignal(s)) for s in stopping.SIGNALS)  # ours are back after fit()


@pytest.mark.signals
def test_a_ctrl_c_that_tune_takes_itself_is_recorded_as_ours(listening):
    from mnist_tracking.search.engine import fit

    tuner = SlowStartingTuner(signal.SIGINT, before_setup=False)
    fit(tuner)
    assert tuner.stopped_by_tune and tuner.steps == 0
    assert stopping.received() == "SIGINT"
    assert stopping.is_ours(signal.getsignal(signal.SIGINT))
