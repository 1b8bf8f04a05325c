"""Ctrl-C and SIGTERM as one KeyboardInterrupt per process, held back while a critical block writes (no MLflow here)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from mnist_tracking import database_calls

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# The first signal of this process (its number), shared by every handler here: one signal stops
# the command, and every later one is ignored, so that nothing cuts short the ending of its run
# (`mlflow run` sends SIGTERM after Ctrl-C's SIGINT) and no second KeyboardInterrupt can escape
# while the first is handled, or while the process exits.
_received: int | None = None
_done = False  # the command's outcome is decided: every signal is ignored from now on


def received_name() -> str:
    """The name of the signal that stopped the command ("SIGTERM"), or "an interrupt"."""
    return signal.Signals(_received).name if _received else "an interrupt"


def _stop(signum, frame) -> None:
    """The process's handler for SIGINT and SIGTERM outside a training: the first raises, the rest do nothing."""
    global _received
    if _received is not None or _done:
        return
    _received = signum
    raise_interrupt(signum, frame)


def raise_interrupt(signum: int, frame) -> None:
    """Raise KeyboardInterrupt for `signum` at `frame`, where the signal landed; inside a call to the
    tracking database, as that call returns instead (database_calls says why)."""
    interrupt = KeyboardInterrupt(signal.Signals(signum).name)
    call = database_calls.outermost_database_call(frame)
    if call is None or not database_calls.raise_as_it_returns(call, interrupt):
        raise interrupt


def listen() -> None:
    """Turn SIGINT and SIGTERM into one KeyboardInterrupt (the first; later ones are ignored)."""
    global _received, _done
    if threading.current_thread() is not threading.main_thread():
        return
    _received, _done = None, False
    for s in SIGNALS:
        signal.signal(s, _stop)


def ignore_from_now() -> None:
    """The outcome is decided (the command ended or its interrupt is being reported): ignore every signal."""
    global _done
    _done = True


class Interrupts:
    """Turns Ctrl-C (SIGINT) and SIGTERM into KeyboardInterrupt, except inside `critical()`.

    A signal that arrives while an epoch's metrics and checkpoints are being written waits
    until they are all in the store, so a killed run never holds half an epoch or a cut file.
    Outside the main thread signals cannot be handled, and this does nothing.
    """

    SIGNALS = SIGNALS

    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._previous: dict = {}

    @property
    def received(self) -> int | None:
        return _received

    def __enter__(self) -> "Interrupts":
        global _received, _done
        if threading.current_thread() is threading.main_thread():
            database_calls.count_connections()
            _received, _done = None, False  # a new training: no signal has stopped it yet
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        # The previous handlers see the same `_received`: after a signal, ours ignore any other.
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        global _received
        if _received is not None or _done:
            return  # already stopping: a second signal must not cut short the ending of the run
        _received = signum
        if self._depth:
            self._pending = True
        else:
            raise_interrupt(signum, frame)

    @property
    def name(self) -> str:
        return received_name()

    def hold(self) -> None:
        """Start a critical block (see `critical`); `release` ends it."""
        self._depth += 1

    def release(self) -> None:
        """End a critical block: a signal held during it is raised now, once no block is left."""
        self._depth -= 1
        if self._pending and not self._depth:
            self._pending = False
            raise KeyboardInterrupt(self.name)

    @contextmanager
    def critical(self):
        self.hold()
        try:
            yield
        except BaseException:
            self._depth -= 1  # the block's own error goes on; a held signal waits for the next release
            raise
        self.release()
