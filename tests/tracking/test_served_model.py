"""The logged model's code file, served_model.py, stands on its own: a model logged by this package loads and
answers where the package cannot even be imported, so that a model logged before the package moved (or by any
other version) keeps loading and serving."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from fakes import REPO

SERVED_MODEL = REPO / "mnist_tracking" / "tracking" / "served_model.py"

# A process where `import mnist_tracking` fails, as on a machine that never installed it, or after a move.
LOAD_WITHOUT_THE_PACKAGE = """
import sys
sys.modules["mnist_tracking"] = None  # any import of the package now raises ImportError
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
answer = model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32))
probabilities = np.asarray(answer["probabilities"])
assert probabilities.shape == (3, 10), probabilities.shape
print(round(float(probabilities.sum()), 4))
"""


def test_served_model_imports_nothing_from_the_package():
    tree = ast.parse(SERVED_MODEL.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [name for name in imported if name.split(".")[0] == "mnist_tracking"], imported


def test_a_logged_model_loads_and_answers_where_the_package_cannot_be_imported(fresh_experiment, tmp_path):
    import mlflow
    import numpy as np

    from mnist_tracking.core.model import ConvNet
    from mnist_tracking.tracking.training_logs import log_model

    with mlflow.start_run() as run:
        log_model(ConvNet("relu").eval(), np.zeros((2, 1, 28, 28), dtype=np.float32))
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path / "model"))
    assert (Path(local) / "served_model.py").read_bytes() == SERVED_MODEL.read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not this checkout either
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_THE_PACKAGE, local], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip() == "3.0"  # each image's probabilities sum to 1
