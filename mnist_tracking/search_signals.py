"""Ctrl-C and SIGTERM around Ray and Tune: held while Ray starts, noted until Tune listens, then Tune's own stop."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@contextmanager
def signals_held_while_ray_starts() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while ray.init runs, then hand the first to this process's handler.

    A signal that raises inside ray.init can be swallowed by Ray (the search then runs as if none
    came) or leave its processes half started (the command aborts as it exits); and ray.init puts
    its own SIGTERM handler in place of ours (`sys.exit(15)`: the run would end FAILED without a
    reason, the command with no line). So the signal is only noted until Ray has started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    noted: list[int] = []
    ours = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    rays = getattr(ray_utils, "set_sigterm_handler", None)
    ray_utils.set_sigterm_handler = lambda handler: None  # ray.init's own handler, not installed: ours stays
    try:
        yield
    except SystemExit as exc:  # a Ray that installed its handler anyway (another version), on a SIGTERM
        if exc.code != signal.SIGTERM:
            raise
        noted.append(signal.SIGTERM)
    finally:
        if rays is not None:
            ray_utils.set_sigterm_handler = rays
        for s, handler in ours.items():
            signal.signal(s, handler)
    if noted:
        # Late in ray.init Ray's C++ core installs absl's failure-signal handler, which logs a SIGTERM,
        # passes it on (to the lambda above) and arms alarm(3), whose end aborts the process (exit -6)
        # however the command ends. Nothing here uses alarm(): the pending one is cancelled.
        signal.alarm(0)
        signal.raise_signal(noted[0])  # delivered now, to our handler


TUNE_WATCH_S = 0.05  # how often fit() is checked for Tune's own SIGINT handler (Tune's setup takes seconds)


@dataclass
class Interruption:
    """Ctrl-C and SIGTERM during a search. Tune's fit() installs its own SIGINT handler, which stops
    the trials, saves the search's state (for --resume) and returns from fit() as if it had ended,
    after putting back the handler it found (ours): `received` says what happened. Tune installs
    it only after its setup, seconds into fit(): a signal before that is noted, then handed to it."""

    received: str = ""  # the first signal's name, once one came
    tune_listens: bool = False  # inside fit(), once Tune's SIGINT handler was seen in place (never outside it)
    # handle() (main thread) and _hand_to_tune (a thread) agree on whether Tune listens and what was noted
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        with self._lock:
            if not self.tune_listens:
                # Only noted, never raised inside Ray's or Tune's code (which may swallow it, or abort as the
                # process exits): before fit() `during_fit` acts on it; inside fit(), before Tune listens,
                # `_hand_to_tune` passes it on; after fit() the runs are accounted for, then ended.
                self.received = self.received or name
                return
        tune_stopping = signal.getsignal(signal.SIGINT) == self.handle  # Tune caught a Ctrl-C
        if signum == signal.SIGINT and (self.received or tune_stopping):
            self.received = self.received or name
            raise KeyboardInterrupt(name)  # a second Ctrl-C skips Tune's saving (as Tune says)
        if self.received or tune_stopping:
            self.received = self.received or "SIGINT"
            return  # `mlflow run` sends SIGTERM after Ctrl-C: the search is already being stopped
        self.received = name
        signal.raise_signal(signal.SIGINT)  # SIGTERM: stop the search the way Tune stops it on Ctrl-C

    def fit(self, tuner):
        """Tune's fit() under this handling: its results, or [] when a second Ctrl-C cut it short (Tune
        then skips saving its state); either way the driver accounts for every run afterwards."""
        with self.during_fit():
            try:
                return tuner.fit()
            except KeyboardInterrupt:
                return []

    @contextmanager
    def during_fit(self) -> Iterator[None]:
        """Around Tune's fit(); a signal noted before it (while Ray started, say) stops here instead."""
        if self.received:
            raise KeyboardInterrupt(self.received)
        done = threading.Event()
        watcher = threading.Thread(target=self._hand_to_tune, args=(done,), name="hand-signal-to-tune", daemon=True)
        if threading.current_thread() is threading.main_thread():  # elsewhere no handler of ours or Tune's runs
            watcher.start()
        try:
            yield
        finally:
            done.set()
            if watcher.is_alive():
                watcher.join()
            self.tune_listens = False
            if signal.getsignal(signal.SIGINT) == self.handle:  # Tune's handler put ours back: it caught a Ctrl-C
                self.received = self.received or "SIGINT"
            elif threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, self.handle)  # Tune's stays installed after a search that ended

    def _hand_to_tune(self, done: threading.Event) -> None:
        """Until fit() ends: wait for Tune's SIGINT handler, then pass it a signal noted before it was
        in place, so that Tune stops the trials and saves its state as it does on Ctrl-C."""
        while not done.wait(TUNE_WATCH_S):
            with self._lock:
                if signal.getsignal(signal.SIGINT) != self.handle:
                    self.tune_listens = True
                    if self.received:
                        # to the main thread, where Python runs handlers: a wait there is cut short (EINTR)
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    return


@contextmanager
def interrupts_stop_the_search() -> Iterator[Interruption]:
    """Install our SIGINT/SIGTERM handler (kept across ray.init by `ray_session`); restores the
    previous handlers at the end. Before and after fit() a signal is only noted (`received`): before,
    `during_fit` raises KeyboardInterrupt (nothing of Tune's to save); during, Tune stops the trials."""
    interruption = Interruption()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, interruption.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interruption
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
