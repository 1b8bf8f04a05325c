"""A Ctrl-C or SIGTERM that lands inside a call to the tracking database is raised as that call returns, never inside SQLAlchemy."""

from __future__ import annotations

import sys
import threading
from types import FrameType

# A KeyboardInterrupt raised inside SQLAlchemy (say, just after a SELECT ran and before its rows were
# read) can leave that connection holding the database's lock: with sqlite, the run's ending write
# (KILLED, and why) then waits for MLflow's busy timeout (20 s) and fails with "database is locked",
# leaving the run RUNNING. Code of these modules holds a connection; the interrupt waits for it.
DATABASE_CODE = "sqlalchemy"  # in a module's name: SQLAlchemy itself and MLflow's sqlalchemy_store modules

_in_use = 0  # database connections the main thread has checked out of SQLAlchemy's pools
_counting = False


def count_connections() -> None:
    """Count the main thread's checked-out database connections, from here on (once per process)."""
    global _counting
    if _counting:
        return
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    event.listen(Pool, "checkout", lambda *args: _add(1))
    event.listen(Pool, "checkin", lambda *args: _add(-1))
    _counting = True


def _add(change: int) -> None:
    global _in_use
    if threading.current_thread() is threading.main_thread():
        _in_use = max(0, _in_use + change)


def outermost_database_call(frame: FrameType | None) -> FrameType | None:
    """The outermost frame of database code in the stack at `frame` while a connection is in use
    (the interrupt must wait until it returns), or None when it may be raised at `frame`."""
    if not _in_use:
        return None  # between calls, or while a store is still connecting (MLflow retries for minutes)
    outermost = None
    while frame is not None:
        if DATABASE_CODE in frame.f_globals.get("__name__", ""):
            outermost = frame
        frame = frame.f_back
    return outermost


def raise_as_it_returns(call: FrameType, exc: BaseException) -> bool:
    """Raise `exc` in the caller of `call`'s frame as it returns (as pdb steps out of a frame); False
    when another tracer (a debugger, coverage) is active, which this must not replace."""
    if sys.gettrace() is not None:
        return False

    def on_event(frame: FrameType, event: str, arg) -> object:
        if event == "return":  # the call's own `finally` and `with` blocks have run: its connection is back
            sys.settrace(None)
            raise exc
        return on_event

    call.f_trace_lines = False
    call.f_trace = on_event
    sys.settrace(_untraced)  # turns tracing on for this thread, so that `call.f_trace` sees its return
    return True


def _untraced(frame: FrameType, event: str, arg) -> None:
    return None  # no other frame is traced
