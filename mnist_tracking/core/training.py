"""The training loop's functions: one epoch of training, an evaluation, their results
(they return numbers, never log)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from mnist_tracking.core import stopping
from mnist_tracking.core.config import NUM_CLASSES
from mnist_tracking.core.data import Split, batches
from mnist_tracking.core.model import ConvNet

EVAL_BATCH_SIZE = 1024  # no gradients kept, so evaluation can take larger batches

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")  # the per-epoch metrics, by name

PROGRESS_EVERY = 20  # batches between progress-bar updates (each update syncs the device)


# On a GPU, reading the loss on the host stalls the queue of kernels, so a NaN is looked for
# every this many batches (a diverged training stops within them); on the CPU, every batch.
DIVERGENCE_CHECK_EVERY = 50


class Diverged(Exception):
    """The training loss became NaN or infinite."""


@dataclass
class EvalResult:
    loss: float
    acc: float
    features: np.ndarray | None = None  # (N, 512) float32
    predictions: np.ndarray | None = None  # (N,) int64
    probabilities: np.ndarray | None = None  # (N, 10) float32: the softmax of the logits
    confusion: np.ndarray | None = None  # (10, 10) int64: counts of true digit (rows) x prediction (columns)


@torch.inference_mode()
def evaluate(
    model: ConvNet,
    split: Split,
    device: torch.device,
    precision: str = "fp32",
    with_features: bool = False,
) -> EvalResult:
    """Mean cross-entropy and accuracy over a split; optionally its features, predictions and
    class probabilities."""
    model.eval()
    # Summed where the batches are computed and read once at the end: one host sync, not one a batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long, device=device)  # flat (10 * 10,)
    features, predictions, probabilities = [], [], []
    for images, labels in batches(split, EVAL_BATCH_SIZE):
        stopping.check()  # a safe point: nothing is written here
        images = images.to(device, memory_format=torch.channels_last)
        labels = labels.to(device)
        with _autocast(device, precision):
            feats = model.features(images)  # (B, 1, 28, 28) -> (B, 512)
            logits = model.classify(feats)  # (B, 512) -> (B, 10)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        predicted = logits.argmax(dim=1)
        correct += (predicted == labels).sum()
        confusion += torch.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES * NUM_CLASSES)
        if with_features:
            features.append(feats.float())
            predictions.append(predicted)
            probabilities.append(logits.softmax(dim=1))
    n = len(split)
    result = EvalResult(loss=loss_sum.item() / n, acc=correct.item() / n,
                        confusion=confusion.view(NUM_CLASSES, NUM_CLASSES).cpu().numpy())
    if with_features:  # (N, 512) float32 and (N,) int64 as CPU numpy arrays, copied once
        result.features = torch.cat(features).cpu().numpy().astype(np.float32)
        result.predictions = torch.cat(predictions).cpu().numpy().astype(np.int64)
        result.probabilities = torch.cat(probabilities).cpu().numpy().astype(np.float32)
    return result


def feature_arrays(split: Split, result: EvalResult) -> dict[str, np.ndarray]:
    """The arrays of `features/<split>.npz`: features, labels, predictions, indices, probabilities
    (the softmax output, for confidences; runs logged before it existed lack it)."""
    return {
        "features": result.features,
        "labels": split.labels.numpy().astype(np.int64),
        "predictions": result.predictions,
        "probabilities": result.probabilities,
        "indices": split.indices.numpy().astype(np.int64),
    }


def train_one_epoch(
    model: ConvNet,
    split: Split,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    precision: str = "fp32",
    progress=None,
    shard: tuple[int, int] = (0, 1),
    check_every: int | None = None,
) -> tuple[float, float]:
    """One pass over the shuffled training split; returns (mean loss, accuracy).

    With `shard=(rank, world_size)` each process trains on its part and the returned numbers
    are summed over all processes. A NaN or inf loss raises Diverged within `check_every`
    batches (default: every batch on the CPU, DIVERGENCE_CHECK_EVERY on a GPU).
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    check_every = check_every or (1 if device.type == "cpu" else DIVERGENCE_CHECK_EVERY)
    step = 0
    for step, (images, labels) in enumerate(batches(split, batch_size, generator, shard), start=1):
        stopping.check()  # a safe point: the epoch in progress is dropped, the logged ones stay
        images = images.to(device, memory_format=torch.channels_last, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, precision):
            logits = model(images)  # (B, 1, 28, 28) -> (B, 10)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        if step % check_every == 0 and not torch.isfinite(loss_sum + loss.detach()):
            # A NaN or inf since the last check stays in the running sum: found here at the latest.
            raise Diverged(_divergence(loss, step, check_every))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += len(labels)
        if progress is not None:
            progress.update(len(labels))
            if step % PROGRESS_EVERY == 0:
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}")
    if not torch.isfinite(loss_sum):  # in the batches since the last check
        raise Diverged(_divergence(loss_sum, step, check_every))
    totals = torch.tensor([loss_sum.item(), correct.item(), seen], dtype=torch.float64)
    if shard[1] > 1:
        totals = totals.to(device)
        import torch.distributed as dist

        dist.all_reduce(totals)  # sum over ranks
    loss_total, correct_total, seen_total = totals.tolist()
    seen_total = max(seen_total, 1.0)
    return loss_total / seen_total, correct_total / seen_total


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float  # the learning rate used during this epoch
    seconds: float  # the whole epoch: training pass, validation, scheduler
    train_seconds: float  # the training pass alone
    improved: bool  # a new best val accuracy: its weights are now the best
    lr_reduced_to: float | None = None  # set when the plateau scheduler lowered the lr after it
    val_confusion: np.ndarray | None = None  # (10, 10) counts on the val split; not kept in the history
    snapshot_knn_acc: float | None = None  # set once the epoch's feature snapshot is judged (snapshots on)

    def metrics(self) -> dict[str, float]:
        """The per-epoch metrics, by name."""
        return {k: getattr(self, k) for k in EPOCH_METRICS}

    def history_entry(self) -> dict:
        """What TrainState.history keeps of the epoch (plain numbers: checkpoints load weights_only)."""
        return {k: v for k, v in asdict(self).items() if k not in ("val_confusion", "snapshot_knn_acc")}


def _divergence(loss: torch.Tensor, step: int, check_every: int) -> str:
    if check_every == 1:
        return f"the training loss became {loss.item()} at batch {step}"
    return f"the training loss became {loss.item()} by batch {step} (looked at every {check_every} batches)"


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
