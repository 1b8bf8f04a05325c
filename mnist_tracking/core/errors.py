"""The one exception type whose message is shown to users as a one-line error, and how any exception gets one line."""


class UserError(Exception):
    """Bad input or a missing prerequisite: the message says what is wrong and what to do."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


CAUSE_DEPTH = 10  # how far down an exception's causes the database's own error is looked for


def causes(exc: BaseException):
    """The exception, then what it was raised from or during, at most CAUSE_DEPTH of them."""
    cause: BaseException | None = exc
    for _ in range(CAUSE_DEPTH):
        if cause is None:
            return
        yield cause
        cause = cause.__cause__ or cause.__context__


def store_error_line(exc: BaseException) -> str:
    """One line for a store error: the database driver's own words when it wraps one (sqlite3's
    "attempt to write a readonly database", not SQLAlchemy's "(raised as a result of Query-invoked
    autoflush ...)" first line), else the first line."""
    for cause in causes(exc):
        driver = getattr(cause, "orig", None)  # sqlalchemy.exc.DBAPIError: the driver's exception
        if isinstance(driver, BaseException) and str(driver):
            return f"{type(driver).__name__}: {first_line(driver)}"
    return first_line(exc)


# The libraries whose exceptions mean the tracking store (a file, a database, a server) failed.
STORE_MODULES = ("mlflow", "requests", "urllib3", "sqlalchemy")


class StoreUnreachable(Exception):
    """The tracking store stopped answering somewhere this process cannot see (a Ray trial said so)."""


def is_store_error(exc: BaseException) -> bool:
    """Whether an exception comes from the tracking store's side (MLflow, its HTTP client, its database)."""
    return isinstance(exc, StoreUnreachable) or type(exc).__module__.startswith(STORE_MODULES)


def store_cause(exc: BaseException) -> BaseException | None:
    """The store's error that an exception is, or was raised from (a UserError that says so); None if none."""
    return next((cause for cause in causes(exc) if is_store_error(cause)), None)


HTTP_FORBIDDEN = 403


def is_permission_denied(exc: BaseException) -> bool:
    """Whether a store error is a server's refusal of this user (HTTP 403): MLflow's REST client
    says PERMISSION_DENIED, its artifact uploads raise requests' HTTPError with the response."""
    return any(getattr(cause, "error_code", None) == "PERMISSION_DENIED"
               or getattr(getattr(cause, "response", None), "status_code", None) == HTTP_FORBIDDEN
               for cause in causes(exc))
