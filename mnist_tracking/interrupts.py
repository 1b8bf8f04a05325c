"""Ctrl-C and SIGTERM as one KeyboardInterrupt per process, held back while a critical block writes (no MLflow here)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager

from mnist_tracking import database_calls

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# The first signal of this process (its number), shared by every handler here: one signal stops
# the command, and every later one is ignored, so that nothing cuts short the ending of its run
# (`mlflow run` sends SIGTERM after Ctrl-C's SIGINT) and no second KeyboardInterrupt can escape
# while the first is handled, or while the process exits.
_received: int | None = None
_done = False  # the command's outcome is decided: every signal is ignored from now on
_dropped = False  # Python dropped our interrupt (it landed in a finalizer): the signal comes again
_in_hook = False  # inside _redeliver_dropped
_hook_before = sys.unraisablehook  # what reports every other exception Python has to drop
DELIVERER = "deliver-dropped-signal"
DELIVER_AGAIN_S = 0.05  # a delivery that lands in a finalizer again is dropped again: the next one follows


def received_name() -> str:
    """The name of the signal that stopped the command ("SIGTERM"), or "an interrupt"."""
    return signal.Signals(_received).name if _received else "an interrupt"


def _acts_on(signum: int) -> bool:
    """Whether a signal stops the command: the first, or the one delivered again after Python dropped
    its interrupt (`_redeliver_dropped`); every other one is ignored."""
    global _received, _dropped
    if _done:
        return False
    if _received is None:
        _received = signum
        return True
    if _dropped and not _in_hook:
        _dropped = False
        return True
    return False


def _stop(signum, frame) -> None:
    """The process's handler for SIGINT and SIGTERM outside a training: the first raises, the rest do nothing."""
    if _acts_on(signum):
        raise_interrupt(_received, frame)


def _redeliver_dropped(unraisable) -> None:
    """sys.unraisablehook. An exception raised in a finalizer (a weakref callback, `__del__`, the
    garbage collector's work, which run inside any code) is dropped by Python with "Exception
    ignored in ...": our interrupt landing there was lost, and the command ran on to its end. The
    signal is delivered again instead, until it is raised in the command's own code."""
    global _dropped, _in_hook
    ours = isinstance(unraisable.exc_value, KeyboardInterrupt) and _received is not None and not _done
    if not (ours and threading.current_thread() is threading.main_thread()):
        _hook_before(unraisable)
        return
    _in_hook = True  # a signal now would be raised in this hook, and dropped without calling it again
    try:
        _dropped = True
        # a deliverer of each drop: one that is just ending might not send again; extra signals are ignored
        threading.Thread(target=_deliver_while_dropped, args=(_received,), name=DELIVERER, daemon=True).start()
    finally:
        _in_hook = False


def _deliver_while_dropped(signum: int) -> None:
    """Send `signum` to the main thread (where Python runs handlers) until one of ours raised it."""
    while _dropped and not _done:
        signal.pthread_kill(threading.main_thread().ident, signum)
        time.sleep(DELIVER_AGAIN_S)


def _new_command() -> None:
    """A new command or training: no signal has stopped it yet; our interrupts dropped in a finalizer come again."""
    global _received, _done, _dropped, _hook_before
    _received, _done, _dropped = None, False, False
    if sys.unraisablehook is not _redeliver_dropped:
        _hook_before = sys.unraisablehook
        sys.unraisablehook = _redeliver_dropped


def raise_interrupt(signum: int, frame) -> None:
    """Raise KeyboardInterrupt for `signum` at `frame`, where the signal landed; inside a call to the
    tracking database, as that call returns instead (database_calls says why)."""
    interrupt = KeyboardInterrupt(signal.Signals(signum).name)
    call = database_calls.outermost_database_call(frame)
    if call is None or not database_calls.raise_as_it_returns(call, interrupt):
        raise interrupt


def listen() -> None:
    """Turn SIGINT and SIGTERM into one KeyboardInterrupt (the first; later ones are ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _new_command()
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
        if threading.current_thread() is threading.main_thread():
            database_calls.count_connections()
            _new_command()
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        # The previous handlers see the same `_received`: after a signal, ours ignore any other.
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if not _acts_on(signum):
            return  # already stopping: a second signal must not cut short the ending of the run
        if self._depth:
            self._pending = True
        else:
            raise_interrupt(_received, frame)

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
