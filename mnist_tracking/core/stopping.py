"""Ctrl-C and SIGTERM as a flag: the handler records the first signal and returns; code stops at safe points.

The handler never raises. A command checks the flag (`check`) where stopping is safe: every batch of a
training, evaluation or feature loop, every few t-SNE iterations, between the steps of an orchestration.
`check` then raises `Stopped`, and the run it was in ends KILLED in one place (the MLflow layer's
`runs.ended`). The longest wait is one call that cannot be interrupted (a UMAP fit, `torch.export` with
`log_model`: docs/resume.md measures them). SIGKILL stays the hard stop; `--resume-from` and `--resume`
recover from it. This module is the only one that calls `signal.signal` (no MLflow, Ray or click here).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# The first signal's name ("SIGTERM"), or "" before one came. Every later signal is ignored: `mlflow run`
# follows Ctrl-C's SIGINT with a SIGTERM, and nothing may cut short the ending of what the first one stopped.
_received = ""
_listening = False  # our handlers are the process's (`listen`, or inside `listening`)


class Stopped(KeyboardInterrupt):
    """A signal asked the command to stop; raised at a safe point. A KeyboardInterrupt, so that code that
    lets Ctrl-C through lets it through too, and `except Exception` does not swallow it."""


def _record(signum: int, frame) -> None:
    global _received
    _received = _received or signal.Signals(signum).name


def received() -> str:
    """The name of the signal that asked to stop ("SIGINT", "SIGTERM"), or "" when none came."""
    return _received


def check() -> None:
    """A safe point: raise Stopped(the signal's name) once a signal came; otherwise return at once."""
    if _received:
        raise Stopped(_received)


def note(signum: int) -> None:
    """Record a signal that another handler took (Tune's own, on Ctrl-C), as ours would have."""
    _record(signum, None)


def record_before(signum: int):
    """Have the handler now in place for `signum` (Tune's own SIGINT handler) record the signal first, as
    ours would; it then runs as before. Returns that handler, unwrapped."""
    theirs = signal.getsignal(signum)
    if _on_main_thread() and callable(theirs) and not is_ours(theirs):
        signal.signal(signum, lambda s, frame: (_record(s, frame), theirs(s, frame)))
    return theirs


def is_ours(handler) -> bool:
    return handler is _record


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def listen() -> None:
    """Record SIGINT and SIGTERM for the rest of the process (`python -m mnist_tracking`: before the CLI
    is even imported, so that no signal is lost). Elsewhere than on the main thread Python runs no
    handler: nothing to do (a Ray trial, say)."""
    global _listening
    if _on_main_thread():
        for s in SIGNALS:
            signal.signal(s, _record)
        _listening = True


@contextmanager
def listening() -> Iterator[None]:
    """Record SIGINT and SIGTERM for one command run inside another program (a test runner, a notebook), whose
    own handlers come back after it, the flag cleared. In a process that listens already (`listen`), nothing
    changes: a signal recorded while it started is kept."""
    global _received, _listening
    if not _on_main_thread() or _listening:
        yield
        return
    _received = ""  # a new command in a process that did not listen for it: nothing asked it to stop yet
    before = {s: signal.signal(s, _record) for s in SIGNALS}
    _listening = True
    try:
        yield
    finally:
        _listening, _received = False, ""  # the command is over: its signal was answered
        for s, handler in before.items():
            signal.signal(s, handler)


def restore() -> None:
    """Put our handlers back after a library replaced them. `ray.init` installs its own SIGTERM handler
    (`sys.exit`) and, through its C++ core, absl's failure handler, which on a SIGTERM also arms
    `alarm(3)` and aborts the process (exit -6) when it rings. Nothing here uses alarm(): once a
    signal came, a pending one is cancelled."""
    if not (_on_main_thread() and _listening):
        return
    for s in SIGNALS:
        signal.signal(s, _record)
    if _received:
        signal.alarm(0)
