"""How a command ends: bad input and failures as one `Error:` line, the exit codes, the `mlflow run` run ended too."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys

import click

from mnist_tracking.core import stopping

EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
# A tracking server that stops answering: MLflow retries each call 7 times with backoff factor 2
# and a 120 s timeout, so one call can hang for many minutes and a training for far longer.
# Bounded here: 4 retries waiting 1, 2, 4, 8 s, and 30 s for an answer.
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file size limit


SQL_ERROR_LOGGER = "mlflow.store.db.utils"  # MLflow's logger of "SQLAlchemy database error ..." with a traceback

SIGNAL_NAMES = ("", "SIGINT", "SIGTERM")  # a Stopped that says no more than which signal it was

_answered = False  # a command ran to its end (its outcome, an interruption included, is decided)


def final_status(code: int) -> int:
    """The process's exit status once the CLI returned `code`: EXIT_INTERRUPTED, with one line, for a signal that
    no command answered (it came while the CLI was imported, or `--help` written). A signal after the command's
    end is ignored: its outcome stands."""
    if stopping.received() and not _answered:
        click.echo(f"Error: interrupted by {stopping.received()} before the command started or as it ended; no run "
                   "was left RUNNING by it", err=True)
        return EXIT_INTERRUPTED
    return code


def interrupted(exc: KeyboardInterrupt, command: str) -> str:
    """The one line of a stop: the run's own (which was ended KILLED), else what was interrupted."""
    if str(exc) not in SIGNAL_NAMES:
        return str(exc)
    return (f"interrupted by {stopping.received() or 'SIGINT'} during `{command}`, before it started a run or after "
            "it ended one")


class OneLineErrors(click.Group):
    """Click's own errors (`--lr abc`, an unknown option) as one `Error:` line without the usage
    block, like UserError, and failing the run `mlflow run` created for the command."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `mnist-tracking` alone: the help, as usual
                exc.show()
                sys.exit(exc.exit_code)
            message = exc.format_message()
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                message = f"{message.rstrip('.')}; see {exc.ctx.command_path} --help"
                if os.environ.get("MLFLOW_RUN_ID"):
                    from mnist_tracking.tracking.runs import end_mlflow_run_command_run

                    end_mlflow_run_command_run(message, command=exc.ctx.command.name)
            click.echo(f"Error: {message}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def user_errors(command):
    """Show UserError as one line (no traceback), exit non-zero, and fail a pending `mlflow run` run."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        global _answered
        from mnist_tracking.core.errors import UserError

        # MLflow logs every database error with its traceback and SQL before raising it; the one
        # line below names the database's own reason (errors.store_error_line) instead.
        logging.getLogger(SQL_ERROR_LOGGER).setLevel(logging.CRITICAL)
        with stopping.listening():  # Ctrl-C and SIGTERM stop the command at its next safe point
            try:
                from mnist_tracking.tracking.links import check_tracking_server

                stopping.check()  # a signal while the process started
                check_tracking_server()  # every entry point: an unreachable server fails at once
                from mnist_tracking.tracking.store import ready_store

                ready_store()  # a new sqlite store is created by one command at a time
                return command(*args, **kwargs)
            except UserError as exc:
                message = str(exc)
            except KeyboardInterrupt as exc:  # stopping.Stopped: the run it cut was ended KILLED, and says so
                message = interrupted(exc, command.__name__)
                from mnist_tracking.tracking.runs import end_mlflow_run_command_run

                end_mlflow_run_command_run(message, "KILLED", command.__name__, kwargs)
                click.echo(f"Error: {message}", err=True)
                sys.exit(EXIT_INTERRUPTED)
            except Exception as exc:  # the disk, the store or the network: still one line, with the cause
                from mnist_tracking.core.errors import is_store_error, store_error_line

                if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                    # e.g. `[Errno 28] No space left on device` while an artifact is copied into the store
                    message = (f"cannot write {exc.filename or 'to the tracking store'}: {exc.strerror}; free some "
                               "space (what was logged before it, every finished epoch's checkpoints included, is "
                               "kept), then run the command again (a training: --resume-from the run it names)")
                elif is_store_error(exc):
                    message = (f"tracking store error ({type(exc).__name__}): {store_error_line(exc)}; check "
                               "MLFLOW_TRACKING_URI, and that this user may write the store")
                else:
                    raise
            finally:
                _answered = True
        from mnist_tracking.tracking.runs import end_mlflow_run_command_run

        end_mlflow_run_command_run(message, "FAILED", command.__name__, kwargs)
        raise click.ClickException(message)

    return wrapper
