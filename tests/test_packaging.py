"""The project files agree with each other: MLproject <-> click options, conda.yaml <-> pyproject."""

import subprocess
import sys
import time

import pytest
import tomllib
import yaml
from conftest import REPO

CLICK_TYPES = {"float": float, "int": int, "string": str, "path": str}
CLICK_TYPE_NAMES = {"float": "float", "int": "integer", "string": "text", "path": "text"}


def mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_conda_env_lists_the_same_dependencies_as_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(pyproject)


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


# The pure layers: computing, drawing and reading files, never talking to MLflow (the modules
# named for runs, and commands/, do that). Their imports are followed through the package, lazy ones inside functions too.
PURE_MODULES = ("model", "data", "training", "trainer", "embedding", "plots", "views", "evolution_view", "sprites",
                "projector", "study", "config", "parameters", "resumption", "ranking", "reports", "stopping",
                "digits", "errors", "snapshots", "evolution", "alignment", "devices", "comparison", "linked_view")


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


COMMANDS = sorted(path.stem for path in (REPO / "mnist_tracking" / "commands").glob("*.py") if path.stem != "__init__")


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_import_no_other_command(command):
    """Each commands/<entry point>.py is a leaf: what several commands share lives outside commands/."""
    imported = imported_modules(f"commands.{command}")
    others = sorted(name for name in imported if name.startswith("mnist_tracking.commands") or name == "commands")
    assert not others, f"commands/{command}.py imports {others}"


def test_every_entry_point_has_its_command_module():
    from mnist_tracking.config import ENTRY_POINTS

    assert sorted(command for command, _ in ENTRY_POINTS.values()) == COMMANDS
    assert sorted(ENTRY_POINTS) == sorted(mlproject()["entry_points"])


BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_every_benchmark_script_imports_and_names_only_what_the_package_has(script):
    """The benchmarks import the package lazily, inside their functions: each name they import from
    it (anywhere in the file) must exist, so that a moved function breaks this test, not a long run."""
    import ast
    import importlib
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # top level only: nothing runs
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_tracking"):
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{alias.name}" for alias in node.names if not hasattr(module, alias.name)
                        and importlib.util.find_spec(f"{node.module}.{alias.name}") is None]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in {
                "evolution", "embedding", "views", "plots", "sprites", "evolution_view", "comparison", "snapshots"}:
            module = importlib.import_module(f"mnist_tracking.{node.value.id}")
            if not hasattr(module, node.attr):
                missing.append(f"mnist_tracking.{node.value.id}.{node.attr}")
    assert not missing, missing
