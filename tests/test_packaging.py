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
    "entry_point, command", [("main", "train"), ("project", "project"), ("register", "register"), ("sweep", "sweep")]
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
