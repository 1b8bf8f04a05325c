"""Ctrl-C and SIGTERM as KeyboardInterrupt, held back while a critical block writes (no MLflow here)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Interrupts:
    """Turns Ctrl-C (SIGINT) and SIGTERM into KeyboardInterrupt, except inside `critical()`.

    A signal that arrives while an epoch's metrics and checkpoints are being written waits
    until they are all in the store, so a killed run never holds half an epoch or a cut file.
    Outside the main thread signals cannot be handled, and this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None  # the last signal number
        self._depth = 0
        self._pending = False
        self._previous: dict = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            # Already stopping: a second signal (`mlflow run` sends SIGTERM after Ctrl-C's
            # SIGINT) must not cut short the ending of the run.
            return
        self.received = signum
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "an interrupt"

    @contextmanager
    def critical(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._pending and not self._depth:
            self._pending = False
            raise KeyboardInterrupt(self.name)
