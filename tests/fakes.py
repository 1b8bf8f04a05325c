"""What the tests are built on: this checkout's paths, and tiny fake MNIST-layout IDX files the tests write
themselves."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny but learnable: each digit is a bright square at its own place, plus noise.
N_TRAIN, N_TEST = 400, 120
FAST = dict(epochs=2, batch_size=32, max_samples=0, device="cpu", precision="fp32")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file as torchvision reads it: magic (0, 0, dtype=0x08 ubyte, ndim), sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images and (n,) labels; class k lights a 6x6 square at its own place."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, k in enumerate(labels):
        row, col = 3 + 8 * (k // 4), 3 + 6 * (k % 4)
        images[i, row : row + 6, col : col + 6] = rng.integers(180, 256, size=(6, 6))
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_fake_dataset(root: Path, folder: str = "MNIST", n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root
