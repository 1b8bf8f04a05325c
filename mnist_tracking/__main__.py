"""`python -m mnist_tracking <command>`: the same CLI as `mnist-tracking`."""

import sys
from typing import NoReturn


def run() -> NoReturn:
    """The process: the CLI, and its exit status whatever moment a signal lands (exits.final_status)."""
    from mnist_tracking.core import stopping

    stopping.listen()  # first, so that a signal even while the CLI is imported ends with status 130
    from mnist_tracking.cli.exits import final_status

    try:
        from mnist_tracking.cli.main import main

        main(prog_name="mnist-tracking")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.exit(final_status(code))


if __name__ == "__main__":
    run()
