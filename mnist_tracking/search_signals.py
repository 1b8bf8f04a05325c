"""Our stop flag inside Tune's fit(): handed to Tune's own Ctrl-C handling, which stops the trials and saves the search."""

from __future__ import annotations

import os
import signal
import threading

from ray.tune import Callback

from mnist_tracking import stopping


class StopTune(Callback):
    """Between two steps of Tune's loop (on the driver's main thread), hands a recorded signal to Tune as
    the Ctrl-C it listens for: Tune stops the trials (their runs end KILLED), saves its state for
    --resume and returns from fit() as if it had ended."""

    def __init__(self) -> None:
        self.listening = self.handed = False

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if not self.listening:  # Tune's SIGINT handler is in place now: Tune installs it before its loop
            self.listening = True
            stopping.record_before(signal.SIGINT)  # a Ctrl-C that Tune takes itself is recorded as ours
        if stopping.received() and not self.handed:
            self.handed = True
            signal.raise_signal(signal.SIGINT)


def fit(tuner):
    """Tune's fit() stopped by our flag (a signal before it stops the command here: nothing of Tune's to
    save); our handlers are back after it, since Tune leaves its own in place after a search that ended."""
    stopping.check()
    try:
        return tuner.fit()
    finally:
        tune_listened = threading.current_thread() is threading.main_thread() and not int(
            os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        if tune_listened and stopping.is_ours(signal.getsignal(signal.SIGINT)):
            stopping.note(signal.SIGINT)  # Tune's handler took a Ctrl-C (before our callback ran) and put ours back
        stopping.restore()
