"""`python -m mnist_tracking <command>`: the same CLI as `mnist-tracking`."""


def run() -> None:
    """The process: the CLI, its exit status kept whatever moment a signal lands (exits.run_command_line)."""
    from mnist_tracking import stopping

    stopping.listen()  # first, so that a signal even while the CLI is imported ends with status 130
    from mnist_tracking.exits import run_command_line

    run_command_line()


if __name__ == "__main__":
    run()
