"""The docs cannot drift: every command README.md and docs/*.md show names entry points, parameters and
options that exist, every parameter table equals MLproject, and the README's first screen holds the
quick start and a picture."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from fakes import REPO

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TYPES = {"float": float, "int": int, "string": str, "path": str}
FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)  # also indented, in a list
INLINE = re.compile(r"`([^`]+)`")
PLACEHOLDER = re.compile(r"<[^<>]*>")  # <training run id>, <command>: any value
# Where a command stops: a shell separator, a comment, the end of a parenthesis in prose.
END = re.compile(r"\s(?:&&|\|\||\||;|#)|[;)]")
OURS = re.compile(r"^(?:mnist-tracking|python -m mnist_tracking|torchrun\b.*?-m mnist_tracking)\s")
ENV_ASSIGNMENT = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")


def mlproject() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


def shown_commands(markdown: str) -> list[tuple[str, bool]]:
    """(command, complete) for every `mlflow run` / `mnist-tracking` / `python -m mnist_tracking`
    command shown: each line of a code block (continuations joined; complete: meant to be run as
    is) and each inline code span that starts with one (often shortened in prose)."""
    found = []
    for block in FENCE.findall(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            for segment in re.split(r"&&|;|\|\||\$\(", line.strip().removeprefix("$ ")):
                found += [(command, True) for command in [command_in(segment)] if command]
    prose = FENCE.sub("", markdown)
    for span in INLINE.findall(prose):
        command = command_in(" ".join(span.split()))
        if command:
            found.append((command, False))
    return found


def command_in(text: str) -> str | None:
    """The command `text` starts with (after environment assignments), up to where it ends."""
    text = ENV_ASSIGNMENT.sub("", text.strip())
    if not (text.startswith("mlflow run") or OURS.match(text + " ")):
        return None
    end = END.search(text)
    return (text[: end.start()] if end else text).strip()


def tokens(command: str) -> list[str]:
    command = PLACEHOLDER.sub("VALUE", command)
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote in prose
        return command.split()


def problems_of(command: str, complete: bool) -> list[str]:
    """What in `command` does not exist: an entry point, a `-P` parameter, a command or an option."""
    words = tokens(command)
    if words[:2] == ["mlflow", "run"]:
        return mlflow_run_problems(words[2:], complete)
    start = words.index("mnist_tracking") + 1 if "mnist_tracking" in words else 1
    return cli_problems(words[start:], complete)


def mlflow_run_problems(words: list[str], complete: bool) -> list[str]:
    from mlflow.cli import cli as mlflow_cli

    options = {opt: p for p in mlflow_cli.commands["run"].params for opt in (*p.opts, *p.secondary_opts)}
    entry_point, params, found, i = "main", [], [], 0
    while i < len(words):
        word = words[i]
        name, _, inline_value = word.partition("=") if word.startswith("--") else (word, "", "")
        if word in ("-e", "--entry-point"):
            entry_point, i = words[i + 1], i + 2
        elif word in ("-P", "--param-list"):
            params.append(words[i + 1].split("=", 1)[0])
            i += 2
        elif word.startswith("-") and name not in options:
            found.append(f"mlflow run has no option {name}")
            i += 1
        elif word.startswith("-"):
            i += 1 if options[name].is_flag or inline_value else 2
        else:
            i += 1  # the project's URI
    spec = mlproject().get(entry_point)
    if spec is None:
        return found + [f"no entry point {entry_point!r} in MLproject"]
    found += [f"entry point {entry_point!r} has no parameter {p!r}" for p in params if p not in spec["parameters"]]
    if complete and "..." not in words:
        found += [f"entry point {entry_point!r} needs -P {p}=" for p, s in spec["parameters"].items()
                  if "default" not in s and p not in params]
    return found


def cli_problems(words: list[str], complete: bool) -> list[str]:
    from mnist_tracking.cli.main import main

    if not words or words[0] in ("--help", "-h"):
        return []
    name, rest = words[0], words[1:]
    if name in ("VALUE", "..."):  # `mnist-tracking <command> --help`, `mnist-tracking ...`
        return []
    command = main.commands.get(name)
    if command is None:
        return [f"mnist-tracking has no command {name!r}"]
    options = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    given = {word.split("=", 1)[0] for word in rest if word.startswith("-")}
    found = [f"mnist-tracking {name} has no option {option}" for option in sorted(given - options)]
    if complete and "..." not in rest and not given & {"--help", "-h"}:
        found += [f"mnist-tracking {name} needs {p.opts[0]}" for p in command.params
                  if p.required and not set(p.opts) & given]
    return found


def all_shown_commands() -> list[tuple[str, str, bool]]:
    return [(path.relative_to(REPO).as_posix(), command, complete)
            for path in DOC_FILES for command, complete in shown_commands(path.read_text())]


def test_the_docs_show_commands_of_every_entry_point():
    shown = all_shown_commands()
    assert len(shown) > 60, len(shown)
    text = " ".join(command for _, command, _ in shown)
    for entry_point in mlproject():
        if entry_point != "main":
            assert f"-e {entry_point}" in text and f"mnist-tracking {entry_point}" in text, entry_point
    assert "mnist-tracking train" in text and "python -m mnist_tracking" in text


def test_every_command_in_the_docs_names_what_exists():
    wrong = [f"{where}: {command}: {problem}" for where, command, complete in all_shown_commands()
             for problem in problems_of(command, complete)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("markdown, problem", [
    ("```bash\nmlflow run . --env-manager local -e project -P run_idd=abc\n```", "has no parameter 'run_idd'"),
    ("```bash\nmlflow run . -e projection -P run_id=abc\n```", "no entry point 'projection'"),
    ("```bash\nmlflow run . -e compare -P split=val\n```", "needs -P run_ids="),
    ("```bash\nmlflow run . --env-manger local\n```", "mlflow run has no option --env-manger"),
    ("Run `mnist-tracking train --learning-rate 0.1` to", "has no option --learning-rate"),
    ("```bash\npip install -e . && mnist-tracking trian --lr 1\n```", "has no command 'trian'"),
    ("```bash\nMLFLOW_TRACKING_URI=x python -m mnist_tracking evolution --methods pca\n```", "needs --run-id"),
    ("```bash\ntorchrun --nproc-per-node 2 -m mnist_tracking train --batch 32\n```", "has no option --batch"),
])
def test_a_command_that_drifted_is_caught(markdown, problem):
    found = [p for command, complete in shown_commands(markdown) for p in problems_of(command, complete)]
    assert any(problem in p for p in found), found


def test_commands_in_prose_and_comments_are_read_as_far_as_they_go():
    markdown = ("Continue with `mlflow run . -P\n  resume_from=<run_id> -P epochs=30` (or not).\n"
                "```bash\nmnist-tracking project --run-id <training run id>   # the same, outside `mlflow run`\n```\n"
                "An `Error: ... only checkpoints written by mnist-tracking can be resumed` is no command.")
    assert shown_commands(markdown) == [("mnist-tracking project --run-id <training run id>", True),
                                        ("mlflow run . -P resume_from=<run_id> -P epochs=30", False)]
    assert not [p for c, complete in shown_commands(markdown) for p in problems_of(c, complete)]


# --------------------------------------------------------------------------- parameter tables

def parameter_tables() -> dict[str, list[list[str]]]:
    """entry point -> the rows of the table marked `<!-- parameters: <entry point> -->`."""
    tables = {}
    for path in DOC_FILES:
        for entry_point, table in re.findall(r"<!-- parameters: (\w+) -->\n((?:\|.*\|\n)+)", path.read_text()):
            assert entry_point not in tables, f"two parameter tables of {entry_point}"
            rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()]
            tables[entry_point] = rows[2:]  # below the header and its separator
    return tables


def test_every_entry_point_has_one_parameter_table():
    assert set(parameter_tables()) == set(mlproject())


@pytest.mark.parametrize("entry_point", list(mlproject()))
def test_parameter_table_equals_mlproject(entry_point):
    spec = mlproject()[entry_point]["parameters"]
    rows = parameter_tables()[entry_point]
    assert [row[0].strip("`") for row in rows] == list(spec), "the table lists MLproject's parameters, in order"
    for name, option, kind, default, *_ in rows:
        name = name.strip("`")
        assert option == f"`--{name.replace('_', '-')}`", name
        assert kind == spec[name]["type"], name
        if "default" not in spec[name]:
            assert default == "(required)", name
        elif spec[name]["default"] == "":
            assert default == '`""`', name
        else:
            convert = TYPES[spec[name]["type"]]
            assert convert(default.strip("`")) == convert(spec[name]["default"]), name


# --------------------------------------------------------------------------- the README's first screen

@pytest.mark.slow
@pytest.mark.browser
def test_the_readme_first_screen_holds_the_quick_start_and_a_picture(tmp_path):
    from helpers import offline_chromium

    offline_chromium().quit()  # skips (fails under CI=true) without chromium and its driver
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_first_screen.py"),
                             "--out", str(tmp_path / "first-screen.png")], capture_output=True, text=True, timeout=300)
    boxes = json.loads(result.stdout)
    assert result.returncode == 0 and not boxes["problems"], boxes
    assert boxes["viewport"] == [1280, 800]
    assert boxes["picture"]["loaded"] and boxes["picture"]["bottom"] <= 800
    assert (tmp_path / "first-screen.png").stat().st_size > 0
