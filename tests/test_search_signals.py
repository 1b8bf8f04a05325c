"""Ctrl-C and SIGTERM inside Tune's fit() before Tune listens: noted, then handed to Tune's own stop."""

import os
import signal
import threading
import time

import pytest

from mnist_tracking.search_signals import interrupts_stop_the_search

TUNE_SETUP_S = 0.5  # Tune's fit() sets itself up (seconds on a busy machine) before it installs its handler
WAIT_S = 10.0


class SlowStartingTuner:
    """Tune's fit() as our handler meets it: setup first, then Tune's own SIGINT handler (Ray's real
    `_setup_signal_catching`), then its loop, which ends early once that handler saw a Ctrl-C."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.stopped_by_tune = False
        self.handler_during_setup = None

    def fit(self) -> list:
        from ray.tune.tune import _setup_signal_catching

        os.kill(os.getpid(), self.signum)  # lands during the setup, before Tune listens
        time.sleep(TUNE_SETUP_S)
        self.handler_during_setup = signal.getsignal(signal.SIGINT)
        interrupted = _setup_signal_catching()
        self.stopped_by_tune = interrupted.wait(WAIT_S)  # the trials' loop: `while not interrupted.is_set()`
        return ["results"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_before_tune_listens_stops_the_search_the_way_tune_stops_it(signum):
    assert threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    tuner = SlowStartingTuner(signum)
    with interrupts_stop_the_search() as interruption:
        started = time.monotonic()
        results = interruption.fit(tuner)
        took = time.monotonic() - started
        assert tuner.handler_during_setup == interruption.handle  # the signal came while ours was in place
        # Tune's handler got it: the search stopped (and saved) as on Ctrl-C, instead of training on.
        assert tuner.stopped_by_tune, f"{signal.Signals(signum).name} before Tune listened was lost: the search ran on"
        assert took < TUNE_SETUP_S + WAIT_S / 2
        assert results == ["results"]  # fit() returned as Tune returns after a stop, not cut short
        assert interruption.received == signal.Signals(signum).name
        assert signal.getsignal(signal.SIGINT) == interruption.handle  # Tune put ours back
    assert {s: signal.getsignal(s) for s in before} == before
    assert [t.name for t in threading.enumerate() if t.name == "hand-signal-to-tune"] == []
