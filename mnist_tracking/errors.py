"""The one exception type whose message is shown to users as a one-line error, and how any exception gets one line."""


class UserError(Exception):
    """Bad input or a missing prerequisite: the message says what is wrong and what to do."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# The libraries whose exceptions mean the tracking store (a file, a database, a server) failed.
STORE_MODULES = ("mlflow", "requests", "urllib3", "sqlalchemy")


def is_store_error(exc: BaseException) -> bool:
    """Whether an exception comes from the tracking store's side (MLflow, its HTTP client, its database)."""
    return type(exc).__module__.startswith(STORE_MODULES)
