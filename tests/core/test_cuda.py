"""The CUDA path of the pure layer (no MLflow): run by benchmarks/gpu_check.py on a GPU machine,
skipped elsewhere. What leaves the GPU must be plain CPU data: features, predictions, checkpoints."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from fakes import FAST

from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.data import load_splits
from mnist_tracking.core.devices import resolve_device, resolve_precision
from mnist_tracking.core.trainer import Trainer
from mnist_tracking.core.training import Diverged, evaluate, feature_arrays

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py runs these)"),
]


def cuda_trainer(data_dir, **overrides) -> Trainer:
    config = TrainConfig(data_dir=str(data_dir), **{**FAST, "device": "auto", "precision": "auto", **overrides})
    device = resolve_device(config.device)
    splits = load_splits(config.dataset, config.data_dir, config.val_fraction, config.seed)
    return Trainer(config, splits, device, resolve_precision(config.precision, device))


def test_auto_resolves_to_cuda_and_bf16_and_learns(data_dir):
    trainer = cuda_trainer(data_dir, epochs=4, lr=0.05)
    assert trainer.device.type == "cuda"
    assert trainer.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    state = trainer.fit()
    assert state.best_val_acc >= 0.9  # chance is 0.1


def test_the_splits_live_on_the_gpu_and_the_cpu_copies_stay(data_dir):
    trainer = cuda_trainer(data_dir, epochs=1)
    for name in ("train", "val", "test"):
        assert getattr(trainer.device_splits, name).images.is_cuda
        assert not getattr(trainer.splits, name).images.is_cuda  # labels and indices for the feature files


def test_features_and_predictions_come_back_as_cpu_numpy(data_dir):
    trainer = cuda_trainer(data_dir, epochs=1)
    trainer.fit()
    result = evaluate(trainer.best_model(), trainer.device_splits.test, trainer.device, trainer.precision,
                      with_features=True)
    arrays = feature_arrays(trainer.splits.test, result)
    assert arrays["features"].dtype == np.float32 and arrays["features"].shape == (len(trainer.splits.test), 512)
    assert arrays["predictions"].dtype == np.int64 and isinstance(arrays["predictions"], np.ndarray)
    assert np.isfinite(arrays["features"]).all()
    assert 0.0 <= result.acc <= 1.0 and np.isfinite(result.loss)


def test_checkpoints_load_on_a_machine_without_a_gpu(data_dir, tmp_path):
    trainer = cuda_trainer(data_dir, epochs=1)
    trainer.fit()
    for name, checkpoint in (("last", trainer.checkpoint()), ("best", trainer.best_checkpoint())):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        (tmp_path / f"{name}.pt").write_bytes(buffer.getvalue())
    # A process that sees no GPU, loading without map_location, as a CPU-only user would.
    code = (
        "import sys, torch\n"
        "for name in ('last', 'best'):\n"
        "    c = torch.load(sys.argv[1] + f'/{name}.pt', weights_only=True)\n"
        "    tensors = [t for t in c['state_dict'].values()]\n"
        "    assert all(t.device.type == 'cpu' for t in tensors), name\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_nan_stops_training_on_the_gpu_too(data_dir):
    trainer = cuda_trainer(data_dir, epochs=2, lr=1e6, momentum=0.0)
    with pytest.raises(Diverged):
        trainer.fit()


def test_resume_on_the_gpu_continues_exactly(data_dir):
    straight = cuda_trainer(data_dir, epochs=2, precision="fp32")
    straight.fit()
    first = cuda_trainer(data_dir, epochs=1, precision="fp32")
    first.fit()
    second = cuda_trainer(data_dir, epochs=2, precision="fp32")
    second.load_checkpoint(first.checkpoint())
    second.fit()
    a, b = straight.state.history[-1], second.state.history[-1]
    # cuDNN's convolution backward is not bitwise deterministic: close, not equal (the CPU test is exact)
    assert b["epoch"] == 2 and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
