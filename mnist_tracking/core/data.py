"""Reading MNIST-family datasets with torchvision, splitting them and batching from memory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_tracking.core.config import DATASETS, MIN_BATCH_SIZE
from mnist_tracking.core.errors import UserError

# Our names for torchvision's MNIST family; each class reads <root>/<ClassName>/raw/*-ubyte.
PIXEL_MAX = 255.0  # IDX images are uint8
# The four IDX files torchvision reads for each dataset of the family (train and test set).
RAW_FILES = tuple(
    f"{prefix}-{kind}-idx{ndim}-ubyte" for prefix in ("train", "t10k") for kind, ndim in (("images", 3), ("labels", 1))
)


@dataclass
class Split:
    """One split held in memory: pixel intensities in [0, 1] and labels."""

    images: torch.Tensor  # (N, 1, 28, 28) float32
    labels: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # (N,) int64: positions in the source file (train or test set)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        """The split held on `device` (a GPU: batches are then cut there, no copy per batch)."""
        return Split(self.images.to(device), self.labels.to(device), self.indices.to(device))


@dataclass(frozen=True)
class Fold:
    """One fold of a K-fold cross-validation over the training file (`evaluate --folds K`): its images are held
    out, and the training's own train and val splits are carved from the other K - 1 folds, as `main` carves them
    from the whole file."""

    number: int  # 0 .. folds - 1
    folds: int
    seed: int  # of the stratified assignment of images to folds (the training keeps its own seed)

    def positions(self, labels: torch.Tensor) -> torch.Tensor:
        """(n_heldout,) sorted positions of this fold among labels (n,): stratified, so every fold holds each
        digit in the file's proportion."""
        from sklearn.model_selection import StratifiedKFold

        folds = StratifiedKFold(n_splits=self.folds, shuffle=True, random_state=self.seed)
        _, heldout = list(folds.split(np.zeros(len(labels)), labels.numpy()))[self.number]
        return torch.from_numpy(np.sort(heldout)).long()


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    mean: float  # pixel mean and std of the training split, for the model's standardisation
    std: float
    source: str  # where the files were read from
    heldout: Split | None = None  # a fold's held-out images (Fold), predicted after its training

    def to(self, device: torch.device) -> Splits:
        """All three splits on `device`; on the CPU this is the same object (no copy)."""
        if device.type == "cpu":
            return self
        return Splits(self.train.to(device), self.val.to(device), self.test.to(device), self.mean, self.std,
                      self.source, self.heldout.to(device) if self.heldout is not None else None)


def raw_folder(dataset: str, data_dir: str | Path) -> Path:
    return Path(data_dir) / DATASETS[dataset] / "raw"


def _read(dataset: str, data_dir: str | Path, train: bool, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 28, 28) uint8 images and (N,) int64 labels of one torchvision file pair."""
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[dataset])
    raw = raw_folder(dataset, data_dir)
    missing_before = [p for p in (raw, raw.parent, Path(data_dir)) if not p.exists()]
    try:
        ds = cls(root=str(data_dir), train=train, download=download)
    except (RuntimeError, OSError, ValueError, AssertionError) as exc:
        for folder in missing_before:  # leave no empty folders behind from a failed download
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        reason = str(exc).strip().splitlines()[0].rstrip(":") if str(exc).strip() else type(exc).__name__
        if not any(raw.glob("*-ubyte")) or "download" in reason.lower():
            names = ", ".join(RAW_FILES)
            raise UserError(
                f"{dataset} is not in {raw} and could not be downloaded ({reason}); "
                f"put {names} there, or pass --data-dir (-P data_dir=) a folder that has them"
            ) from exc
        raise UserError(
            f"could not read {dataset} from {raw}: {reason}; the files look truncated or "
            f"corrupt: delete them to download again, or copy intact ones there"
        ) from exc
    images, labels = ds.data, ds.targets
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(
            f"the {dataset} files in {raw} do not match: {tuple(images.shape)} images and "
            f"{len(labels)} labels; replace them with an intact set"
        )
    return images, labels.long()


def thumbnails(dataset: str, data_dir: str | Path, train: bool, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, 28, 28) uint8 images at `indices` of the train or test file (never downloaded).

    `labels` (n,) are the run's labels of those points: the file must hold the same ones there,
    else it is not the data the run was trained on. UserError when the images cannot be had.
    """
    raw = raw_folder(dataset, data_dir)
    missing = [name for name in RAW_FILES if not (raw / name).is_file()]
    if missing:
        raise UserError(f"{dataset} is not in {raw} (no {', '.join(missing)})")
    images, file_labels = _read(dataset, data_dir, train, download=False)
    images, file_labels = images.numpy(), file_labels.numpy()
    if len(indices) and (indices.min() < 0 or indices.max() >= len(images)):
        raise UserError(f"the {dataset} files in {raw} have {len(images):,} images, fewer than this run's indices need")
    if not np.array_equal(file_labels[indices], labels):
        raise UserError(f"the {dataset} files in {raw} do not hold this run's images "
                        "(the labels at its indices differ)")
    return images[indices]


def _split(images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> Split:
    # (n, 28, 28) uint8 -> (n, 1, 28, 28) float32 in [0, 1]
    x = images[positions].unsqueeze(1).float().div_(PIXEL_MAX)
    return Split(images=x.contiguous(), labels=labels[positions], indices=positions.long())


def load_splits(
    dataset: str,
    data_dir: str | Path,
    val_fraction: float,
    seed: int,
    max_samples: int = 0,
    fold: Fold | None = None,
) -> Splits:
    """Read train and test files; split train into train/val with a seeded permutation (with a `fold`: what is
    left of train once the fold is held out)."""
    train_images, train_labels = _read(dataset, data_dir, train=True)
    test_images, test_labels = _read(dataset, data_dir, train=False)
    n = len(train_labels) if max_samples <= 0 else min(max_samples, len(train_labels))
    pool, heldout = torch.arange(n), None
    if fold is not None:
        heldout = fold.positions(train_labels[:n])
        kept = torch.ones(n, dtype=torch.bool)
        kept[heldout] = False
        pool = pool[kept]
        n = len(pool)

    permutation = pool[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < MIN_BATCH_SIZE:  # BatchNorm cannot train on fewer images than a batch of two
        raise UserError(
            f"val_fraction={val_fraction} of {n} images leaves {n - n_val} training and {n_val} val images; "
            f"use more images (max_samples) or a val_fraction nearer 0.5"
        )
    # Sorted positions keep the in-memory order of the file, which makes indices easy to read.
    val_pos, _ = permutation[:n_val].sort()
    train_pos, _ = permutation[n_val:].sort()

    train = _split(train_images, train_labels, train_pos)
    return Splits(
        train=train,
        val=_split(train_images, train_labels, val_pos),
        test=_split(test_images, test_labels, torch.arange(len(test_labels))),
        mean=train.images.mean().item(),
        std=train.images.std().item(),
        source=str(raw_folder(dataset, data_dir).resolve()),
        heldout=_split(train_images, train_labels, heldout) if heldout is not None else None,
    )


def batches(
    split: Split,
    batch_size: int,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches by indexing the in-memory tensors.

    With a generator the order is shuffled (training), and no batch holds a single image (one
    left over joins the last batch); without, it is the split's order.
    `shard=(rank, world_size)` gives each process of a distributed training its own part of
    the shuffled order; every rank draws the same permutation from the same seed.
    """
    n = len(split)
    rank, world_size = shard
    if generator is None and world_size == 1:
        for start in range(0, n, batch_size):
            yield split.images[start : start + batch_size], split.labels[start : start + batch_size]
        return
    # The permutation is drawn on the CPU (the same order on every device for one seed), then
    # moved once per epoch to where the split is: each batch is an index there, no host round trip.
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    # Equal shards, so every rank runs the same number of steps (DDP's collectives need it).
    order = order[: n - n % world_size][rank::world_size].to(split.images.device)
    starts = list(range(0, len(order), batch_size))
    if generator is not None and len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()  # training: a last batch of one image joins the one before (BatchNorm cannot train on one)
    for start, end in zip(starts, [*starts[1:], len(order)], strict=True):
        idx = order[start:end]
        yield split.images[idx], split.labels[idx]
