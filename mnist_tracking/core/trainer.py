"""The Trainer: model, optimizer, scheduler, early stopping and RNGs of one training, and its checkpoint state."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mnist_tracking.core.config import MIN_BATCH_SIZE, TrainConfig
from mnist_tracking.core.data import Splits
from mnist_tracking.core.devices import world
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.model import ConvNet
from mnist_tracking.core.training import (
    Diverged,
    EpochResult,
    EvalResult,
    evaluate,
    train_one_epoch,
)

PLATEAU_FACTOR = 0.1  # ReduceLROnPlateau: lr *= 0.1 ...

PLATEAU_PATIENCE = 2  # ... after 2 epochs without a lower val loss (seed: 0.01 -> 1e-4 by epoch 27)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params, lr, wd = model.parameters(), config.lr, config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE
        )
    if config.scheduler == "cosine":
        # Stepped once per epoch: lr falls from `lr` to 0 over `epochs` epochs (half a cosine).
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


@dataclass
class TrainState:
    """Where training stands; with the model, optimizer and scheduler it is enough to resume."""

    epoch: int = 0
    best_val_acc: float = -1.0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0  # epochs without progress in what early stopping monitors
    stopped_early: bool = False
    lowest_val_loss: float = math.inf
    history: list[dict] = field(default_factory=list)


def record_epoch(state: TrainState, epoch: int, val_acc: float, val_loss: float, monitor: str, patience: int) -> bool:
    """Update `state` with one epoch's validation numbers; True when it holds the new best weights.

    The best weights are always those of the best val accuracy (ties: the lower val loss);
    `monitor` decides what counts as progress for early stopping (config.EARLY_STOPPING_MONITORS),
    which stops after `patience` epochs without it (0: never).
    """
    improved = val_acc > state.best_val_acc or (val_acc == state.best_val_acc and val_loss < state.best_val_loss)
    lower_loss = val_loss < state.lowest_val_loss
    progress = {"val_acc": improved, "val_loss": lower_loss, "val_acc_or_loss": improved or lower_loss}[monitor]
    if improved:
        state.best_val_acc, state.best_val_loss, state.best_epoch = val_acc, val_loss, epoch
    state.lowest_val_loss = min(state.lowest_val_loss, val_loss)
    state.epochs_without_improvement = 0 if progress else state.epochs_without_improvement + 1
    state.epoch = epoch
    state.stopped_early = bool(patience) and state.epochs_without_improvement >= patience
    return improved


class Trainer:
    """Owns the model, optimizer, scheduler and RNGs of one training; `fit` runs the epochs."""

    def __init__(self, config: TrainConfig, splits: Splits, device: torch.device, precision: str):
        self.config, self.splits, self.device, self.precision = config, splits, device, precision
        # On a GPU the three splits live there as one tensor each (about 200 MB for MNIST); the
        # CPU copies in `splits` stay for what goes to files (labels, indices).
        self.device_splits = splits.to(device)
        torch.manual_seed(config.seed)  # weight init and dropout
        self.model = ConvNet(config.activation, mean=splits.mean, std=splits.std)
        self.model.to(device, memory_format=torch.channels_last)
        self.rank, self.world_size = world()
        self.train_model: nn.Module = self.model
        self.batch_size = config.batch_size
        if self.world_size > 1:
            # The global batch stays `batch_size`: each of the N processes takes 1/N of it.
            self.batch_size = math.ceil(config.batch_size / self.world_size)
            if self.batch_size < MIN_BATCH_SIZE:
                raise UserError(
                    f"batch_size {config.batch_size} over {self.world_size} processes leaves {self.batch_size} image "
                    f"a process (BatchNorm needs {MIN_BATCH_SIZE}); "
                    f"use batch_size >= {MIN_BATCH_SIZE * self.world_size}"
                )
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
            torch.manual_seed(config.seed + self.rank)  # different dropout masks per rank
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.shuffle = torch.Generator().manual_seed(config.seed)  # batch order
        self.state = TrainState()
        self.best_state_dict = copy.deepcopy(self.model.state_dict())

    def fit(self, on_epoch: Callable[[EpochResult, Trainer], None] | None = None, progress_factory=None) -> TrainState:
        """Train until `epochs` or early stopping; after each epoch call `on_epoch(result, self)`."""
        config, state = self.config, self.state
        while state.epoch < config.epochs and not state.stopped_early:
            epoch = state.epoch + 1
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            progress = progress_factory(epoch, len(self.splits.train)) if progress_factory and self.rank == 0 else None
            try:
                train_loss, train_acc = train_one_epoch(
                    self.train_model, self.device_splits.train, self.optimizer, self.batch_size,
                    self.shuffle, self.device, self.precision, progress, (self.rank, self.world_size),
                )
            finally:
                if progress is not None:
                    progress.close()
            train_seconds = time.perf_counter() - started  # train_one_epoch ends reading its sums: synchronised
            val = self._validate()
            if not math.isfinite(val.loss):
                raise Diverged(f"the validation loss became {val.loss} in epoch {epoch}")

            improved = record_epoch(state, epoch, val.acc, val.loss, config.early_stopping_monitor,
                                    config.early_stopping)
            if improved:
                self.best_state_dict = copy.deepcopy(self.model.state_dict())

            lr_reduced_to = None
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(val.loss)
            elif self.scheduler is not None:
                self.scheduler.step()
            new_lr = self.optimizer.param_groups[0]["lr"]
            if config.scheduler == "plateau" and new_lr < lr:
                lr_reduced_to = new_lr
            result = EpochResult(
                epoch, train_loss, train_acc, val.loss, val.acc, lr,
                time.perf_counter() - started, train_seconds, improved, lr_reduced_to, val.confusion,
            )
            state.history.append(result.history_entry())
            if on_epoch is not None:
                on_epoch(result, self)
        return state

    def _validate(self) -> EvalResult:
        """Val loss and accuracy; with several processes rank 0 evaluates and tells the others,
        so that every rank takes the same early-stopping and scheduler decisions."""
        if self.world_size == 1:
            return evaluate(self.model, self.device_splits.val, self.device, self.precision)
        import torch.distributed as dist

        numbers = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.rank == 0:
            val = evaluate(self.model, self.device_splits.val, self.device, self.precision)
            numbers[0], numbers[1] = val.loss, val.acc
        dist.broadcast(numbers, src=0)
        return EvalResult(loss=numbers[0].item(), acc=numbers[1].item())

    def best_model(self) -> ConvNet:
        """A copy of the network with the weights of the best validation accuracy, in eval mode."""
        model = ConvNet(self.config.activation, mean=self.splits.mean, std=self.splits.std)
        model.load_state_dict(self.best_state_dict)
        return model.to(self.device, memory_format=torch.channels_last).eval()

    def best_checkpoint(self) -> dict:
        """`checkpoints/best.pt`: the best weights so far and where they were found."""
        state = self.state
        return {
            "state_dict": _on_cpu(self.best_state_dict),
            "epoch": state.best_epoch,
            "val_acc": state.best_val_acc,
            "val_loss": state.best_val_loss,
            "params": self.config.to_dict(),
        }

    def checkpoint(self) -> dict:
        """The full training state (`checkpoints/last.pt`); loads with weights_only=True."""
        # Every tensor on the CPU, so that a machine without the training's GPU can load it.
        return {
            "state_dict": _on_cpu(self.model.state_dict()),
            "best_state_dict": _on_cpu(self.best_state_dict),
            "optimizer": _on_cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "train_state": asdict(self.state),
            "epoch": self.state.epoch,
            "params": self.config.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state()},
        }

    def load_checkpoint(self, checkpoint: dict) -> None:
        """Continue from `checkpoint()`'s dict: the next `fit` starts at the following epoch."""
        self.model.load_state_dict(checkpoint["state_dict"])
        self.best_state_dict = checkpoint["best_state_dict"]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint.get("scheduler") is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                _stretch_cosine(self.scheduler, self.config.epochs)
        self.state = TrainState(**checkpoint["train_state"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        self.shuffle.set_state(checkpoint["rng"]["shuffle"])


def _stretch_cosine(scheduler: torch.optim.lr_scheduler.CosineAnnealingLR, epochs: int) -> None:
    """A cosine schedule resumed with another number of `epochs`: from the epoch reached, the lr
    follows the half cosine over the new total, as a run started with it would have at that epoch.

    Kept as it was, the schedule would not end at the new last epoch: past its old end the cosine
    rises again, and its step formula (a ratio of the current lr) keeps an lr that reached 0 at 0.
    """
    if scheduler.T_max == epochs:
        return  # the same schedule: an interrupted run continues exactly
    scheduler.T_max = epochs
    done = scheduler.last_epoch
    lrs = [scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * done / epochs)) / 2
           for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def _on_cpu(value):
    """A (nested) dict or list of tensors with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value
