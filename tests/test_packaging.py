"""The project files agree with each other: MLproject <-> click options, conda.yaml <-> pyproject."""

import subprocess
import sys
import time

import pytest
import tomllib
import yaml
from fakes import REPO

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
        [sys.executable, "-c", "import sys; from mnist_tracking.cli.main import main; "
         "print('torch' in sys.modules, 'mlflow' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.split() == ["False", "False"]
    result = subprocess.run([sys.executable, "-m", "mnist_tracking", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout
    assert time.perf_counter() - started < 5  # generous for a loaded CI machine; the benchmark measures it


def test_every_entry_point_has_its_command():
    from mnist_tracking.cli.main import ENTRY_POINTS, main

    assert sorted(command for command, _ in ENTRY_POINTS.values()) == sorted(main.commands)
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
    missing, modules = [], {}  # modules: the local names of the package's modules the script imports
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_tracking"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                if submodule:
                    modules[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                elif not hasattr(module, alias.name):
                    missing.append(f"{node.module}.{alias.name}")
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if not hasattr(modules[node.value.id], node.attr):
                missing.append(f"{modules[node.value.id].__name__}.{node.attr}")
    assert not missing, missing
