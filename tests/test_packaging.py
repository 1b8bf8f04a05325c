"""The project files agree with each other: MLproject <-> click options, conda.yaml <-> pyproject."""

import re
import subprocess
import sys
import time
import tomllib

import pytest
import yaml

from conftest import REPO
from mnist_tracking.cli import main as cli

CLICK_TYPES = {"float": float, "int": int, "string": str, "path": str}
CLICK_TYPE_NAMES = {"float": "float", "int": "integer", "string": "text", "path": "text"}


def mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_conda_env_lists_the_same_dependencies_as_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(pyproject)


@pytest.mark.parametrize(
    "entry_point, command",
    [("main", "train"), ("project", "project"), ("evolution", "evolution"), ("compare", "compare"), ("register", "register"),
     ("sweep", "sweep")],
)
def test_mlproject_parameters_mirror_the_click_options(entry_point, command):
    spec = mlproject()["entry_points"][entry_point]
    options = {p.name: p for p in cli.commands[command].params}
    assert set(spec["parameters"]) == set(options)
    for name, parameter in spec["parameters"].items():
        option = options[name]
        assert option.opts == [f"--{name.replace('_', '-')}"]
        assert option.type.name == CLICK_TYPE_NAMES[parameter["type"]], name
        if "default" in parameter:
            assert CLICK_TYPES[parameter["type"]](parameter["default"]) == option.default, name
        else:  # required in MLproject (no default) <-> a required option
            assert option.required, name
        # The command passes every parameter to its option.
        assert re.search(rf"--{name.replace('_', '-')} \{{{name}\}}", spec["command"]), name


def test_help_answers_fast_without_heavy_imports():
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from mnist_tracking.cli import main; "
         "print('torch' in sys.modules, 'mlflow' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.split() == ["False", "False"]
    result = subprocess.run([sys.executable, "-m", "mnist_tracking", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout
    assert time.perf_counter() - started < 5  # generous for a loaded CI machine; the benchmark measures it


# The pure layers: computing, drawing and reading files, never talking to MLflow (runs.py and
# commands/ do that). Their imports are followed through the package, lazy ones inside functions too.
PURE_MODULES = ("model", "data", "training", "embedding", "plots", "views", "projector", "study", "config",
                "reports", "interrupts", "digits", "errors", "snapshots", "evolution", "alignment", "devices",
                "comparison", "linked_view")


def imported_modules(module: str) -> set[str]:
    """Every module `mnist_tracking.<module>` imports anywhere in its source (top level or in functions)."""
    import ast

    path = REPO / "mnist_tracking" / (module.replace(".", "/") + ".py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "mnist_tracking":  # from mnist_tracking import plots, views
                names |= {f"mnist_tracking.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_never_import_mlflow(module):
    seen, todo, offenders = set(), [module], []
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imported_modules(current):
            if name.split(".")[0] == "mlflow":
                offenders.append(f"mnist_tracking.{current} imports {name}")
            elif name.startswith("mnist_tracking."):
                todo.append(name.removeprefix("mnist_tracking."))
    assert not offenders, offenders


def entry_point_defaults() -> dict[str, tuple[str, dict]]:
    """entry point -> (click command, the defaults of the code it calls, by parameter name)."""
    import dataclasses
    import inspect

    from mnist_tracking.commands.register import register
    from mnist_tracking.config import CompareConfig, EvolutionConfig, ProjectConfig, SweepConfig, TrainConfig

    def of_dataclass(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.init and f.default is not dataclasses.MISSING}

    return {
        "main": ("train", of_dataclass(TrainConfig)),
        "project": ("project", of_dataclass(ProjectConfig)),
        "evolution": ("evolution", of_dataclass(EvolutionConfig)),
        "compare": ("compare", of_dataclass(CompareConfig)),
        "register": ("register", {name: p.default for name, p in inspect.signature(register).parameters.items()
                                  if name != "echo"}),
        "sweep": ("sweep", of_dataclass(SweepConfig)),
    }


@pytest.mark.parametrize("entry_point", ["main", "project", "evolution", "compare", "register", "sweep"])
def test_defaults_agree_in_mlproject_the_cli_and_the_code(entry_point):
    command, code_defaults = entry_point_defaults()[entry_point]
    spec = mlproject()["entry_points"][entry_point]["parameters"]
    options = {p.name: p for p in cli.commands[command].params}
    assert set(options) == set(spec)
    for name, option in options.items():
        if option.required:  # run_id of project: no default anywhere
            assert name not in code_defaults and "default" not in spec[name], name
            continue
        assert name in code_defaults, f"{entry_point}: --{name} has no default in the code it calls"
        assert option.default == code_defaults[name], (name, option.default, code_defaults[name])
        assert CLICK_TYPES[spec[name]["type"]](spec[name]["default"]) == code_defaults[name], name
