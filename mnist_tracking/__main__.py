"""`python -m mnist_tracking <command>`: the same CLI as `mnist-tracking`."""

from mnist_tracking.cli import main

if __name__ == "__main__":
    main(prog_name="mnist-tracking")
