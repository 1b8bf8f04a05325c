"""The registry lock: registrations one at a time per store, a wait that is said and bounded."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import mlflow

from mnist_tracking.core import stopping
from mnist_tracking.core.errors import UserError

LOCK_SUFFIX = ".registry.lock"  # beside a sqlite store's database file

ADVISORY_LOCK_KEY = 0x6D6E6973  # PostgreSQL advisory lock id of mnist-tracking's registrations ("mnis")

# How long a registration waits for another one to release the registry lock before it gives up:
# a registration holds it for a few store calls (seconds); longer means a stuck or very slow one.
REGISTRY_LOCK_WAIT_S = 120
REGISTRY_LOCK_POLL_S = 0.5  # how often a waiting registration tries the lock again


def sqlite_lock_file(database: str) -> str:
    """What registrations on a sqlite store lock: a file beside its database when the folder is ours
    (`mlflow.db.registry.lock`, git-ignored), else the database file itself, so that nothing is left
    in a folder we do not own (flock: sqlite's own locks are POSIX locks, which flock does not see)."""
    folder = os.path.dirname(os.path.abspath(database))
    if os.stat(folder).st_uid == os.getuid() and os.access(folder, os.W_OK):
        return f"{database}{LOCK_SUFFIX}"
    return database


def lock_wait_over(where: str) -> UserError:
    return UserError(
        f"another registration has held the registry lock ({where}) for over {REGISTRY_LOCK_WAIT_S} s; "
        "wait for it to finish (or stop it), then register again"
    )


def wait_for(try_lock: Callable[[], bool], where: str, echo: Callable[[str], None]) -> None:
    """Take a lock with `try_lock` (True when taken), saying once that it waits for another registration,
    and giving up with a one-line UserError after REGISTRY_LOCK_WAIT_S."""
    if try_lock():
        return
    echo(f"Waiting for another registration to finish (the registry lock: {where}); "
         f"giving up after {REGISTRY_LOCK_WAIT_S} s")
    deadline = time.monotonic() + REGISTRY_LOCK_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(REGISTRY_LOCK_POLL_S)
        stopping.check()  # a safe point: nothing is held yet
        if try_lock():
            return
    raise lock_wait_over(where)


@contextmanager
def registry_lock(echo: Callable[[str], None] = print) -> Iterator[None]:
    """Held while registering: the read-compare-write of the alias (and the first creation of the
    registered model) must not interleave with another registration's, or the last writer wins
    even with the worse model. A sqlite store: an exclusive file lock beside its database file;
    PostgreSQL: a transaction-independent advisory lock; a tracking server's REST API offers no
    lock, so there nothing is held (README: register from one place at a time). Waiting for
    another registration is said, and bounded (REGISTRY_LOCK_WAIT_S)."""
    uri = mlflow.get_registry_uri()
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme == "sqlite":
        import fcntl

        database = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not database or database == ":memory:":
            yield
            return
        path = sqlite_lock_file(database)
        try:
            handle = open(path, "a" if path != database else "rb")  # closed below, releasing the lock
        except OSError as exc:  # a store (or folder) we may not open: one line, not a traceback
            raise UserError(
                f"cannot open the registry lock {path}: {exc.strerror}; registering writes the tracking store: "
                f"register as a user who may write {os.path.dirname(path) or '.'}, or check MLFLOW_TRACKING_URI"
            ) from None
        with handle:

            def try_lock() -> bool:
                try:  # released when the file closes, also if the process dies
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                return True

            wait_for(try_lock, path, echo)
            yield
    elif scheme == "postgresql":
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as connection:
            take = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
            wait_for(lambda: bool(connection.execute(take, {"key": ADVISORY_LOCK_KEY}).scalar()),
                     f"PostgreSQL advisory lock {ADVISORY_LOCK_KEY}", echo)
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
        engine.dispose()
    else:
        yield
