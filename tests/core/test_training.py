import math

import pytest
import torch
from fakes import FAST

from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.data import load_splits
from mnist_tracking.core.devices import resolve_device, resolve_precision
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.resuming import resumed_config
from mnist_tracking.core.trainer import Trainer, TrainState, record_epoch
from mnist_tracking.core.training import Diverged, evaluate


class Stop(Exception):
    """Ends a fit after a given epoch, as an interruption would."""


def fit(data_dir, stop_after: int | None = None, **overrides):
    config = TrainConfig(data_dir=str(data_dir), **{**FAST, **overrides})
    splits = load_splits(config.dataset, config.data_dir, config.val_fraction, config.seed)
    trainer = Trainer(config, splits, torch.device("cpu"), "fp32")
    results = []

    def on_epoch(result, _):
        results.append(result)
        if result.epoch == stop_after:
            raise Stop

    try:
        state = trainer.fit(on_epoch=on_epoch)
    except Stop:
        state = trainer.state
    return trainer, state, results


def test_training_learns_the_fake_digits(data_dir):
    trainer, state, results = fit(data_dir, epochs=4, lr=0.05)
    assert [r.epoch for r in results] == [1, 2, 3, 4]
    assert results[-1].train_loss < results[0].train_loss
    assert state.best_val_acc >= 0.9  # chance is 0.1
    best = evaluate(trainer.best_model(), trainer.splits.val, torch.device("cpu"))
    assert best.acc == pytest.approx(state.best_val_acc)


def test_same_seed_same_numbers(data_dir):
    _, a, _ = fit(data_dir, seed=7)
    _, b, _ = fit(data_dir, seed=7)
    _, c, _ = fit(data_dir, seed=8)

    def strip(history):
        return [{k: v for k, v in h.items() if k not in ("seconds", "train_seconds")} for h in history]

    assert strip(a.history) == strip(b.history)
    assert strip(a.history) != strip(c.history)


def test_early_stopping_stops_after_patience(data_dir):
    # lr this small learns nothing measurable, so val accuracy stops improving at once.
    _, state, results = fit(data_dir, epochs=10, lr=1e-9, early_stopping=2, scheduler="none")
    assert state.stopped_early
    assert state.epoch == state.best_epoch + 2 < 10
    assert len(results) == state.epoch


def test_plateau_scheduler_reduces_lr(data_dir):
    config = TrainConfig(data_dir=str(data_dir),
                         **{**FAST, "epochs": 6, "lr": 0.01, "scheduler": "plateau", "early_stopping": 0})
    splits = load_splits("mnist", data_dir, 0.2, seed=0)
    # Training on shuffled labels: the network memorises noise and the val loss rises.
    splits.train.labels = splits.train.labels[torch.randperm(len(splits.train),
                                                             generator=torch.Generator().manual_seed(0))]
    results = []
    Trainer(config, splits, torch.device("cpu"), "fp32").fit(lambda result, _: results.append(result))
    reduced = [r for r in results if r.lr_reduced_to is not None]
    assert reduced, f"the plateau scheduler never reduced the lr: val losses {[r.val_loss for r in results]}"
    assert reduced[0].lr_reduced_to == pytest.approx(0.01 * 0.1)
    assert results[-1].lr < results[0].lr


def test_divergence_stops_at_once(data_dir):
    with pytest.raises(Diverged, match="nan|inf"):
        fit(data_dir, epochs=3, lr=1e6, momentum=0.0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_every_optimizer_trains(data_dir, optimizer):
    _, state, _ = fit(data_dir, epochs=1, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3)
    assert math.isfinite(state.best_val_loss)


def resumed_fit(data_dir, first_epochs: int, epochs: int, interrupted: bool, **overrides):
    """A run of `epochs` resumed from one that trained `first_epochs`: a run of `epochs` interrupted
    there, or a finished run of `first_epochs`."""
    first, _, _ = fit(data_dir, epochs=epochs if interrupted else first_epochs,
                      stop_after=first_epochs if interrupted else None, **overrides)
    checkpoint = first.checkpoint()  # before the next Trainer seeds torch's RNG, whose state it holds
    config = TrainConfig(data_dir=str(data_dir), **{**FAST, **overrides, "epochs": epochs})
    resumed = Trainer(config, first.splits, torch.device("cpu"), "fp32")
    resumed.load_checkpoint(checkpoint)
    return resumed.fit()


def assert_same_history(history, expected):
    assert len(history) == len(expected)
    for a, b in zip(history, expected, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("scheduler", ["plateau", "cosine"])
def test_an_interrupted_run_resumes_exactly(data_dir, scheduler):
    _, full_state, _ = fit(data_dir, epochs=3, seed=3, scheduler=scheduler)
    assert_same_history(resumed_fit(data_dir, 2, 3, True, seed=3, scheduler=scheduler).history, full_state.history)


def test_a_finished_plateau_run_resumed_with_more_epochs_continues_exactly(data_dir):
    _, full_state, _ = fit(data_dir, epochs=3, seed=3, scheduler="plateau")
    state = resumed_fit(data_dir, 2, 3, False, seed=3, scheduler="plateau")
    assert_same_history(state.history, full_state.history)


def test_a_cosine_run_resumed_with_more_epochs_follows_the_cosine_of_the_new_total(data_dir):
    # 2 epochs of a 2-epoch cosine end at lr 0; kept as it was, the schedule would stay at 0 (or
    # rise past its end). Stretched to 4 epochs, epochs 3 and 4 get the 4-epoch cosine's lr.
    state = resumed_fit(data_dir, 2, 4, False, lr=0.04, seed=3, scheduler="cosine", early_stopping=0)
    lrs = [entry["lr"] for entry in state.history]
    assert lrs[:2] == pytest.approx([0.04, 0.02])  # the 2-epoch cosine the first run trained with
    assert lrs[2:] == pytest.approx([0.04 * (1 + math.cos(math.pi * e / 4)) / 2 for e in (2, 3)])


def test_config_choices_are_case_insensitive_and_checked():
    assert TrainConfig(optimizer="SGD", activation="ReLU").optimizer == "sgd"
    with pytest.raises(UserError, match="choose one of sgd, adam, adamw"):
        TrainConfig(optimizer="rmsprop")
    for bad in (dict(lr=0), dict(lr=float("nan")), dict(epochs=0), dict(batch_size=0), dict(val_fraction=1.0)):
        with pytest.raises(UserError):
            TrainConfig(**bad)


def test_device_and_precision_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="not available"):
            resolve_device("cuda")


def stopping_epoch(monitor: str, patience: int, val_accs: list[float], val_losses: list[float]) -> int | None:
    """The epoch after which early stopping ends training on these val numbers, or None."""
    state = TrainState()
    for epoch, (acc, loss) in enumerate(zip(val_accs, val_losses, strict=True), start=1):
        record_epoch(state, epoch, acc, loss, monitor, patience)
        if state.stopped_early:
            return epoch
    return None


# As in the first default recipe's real run: the val accuracy stops rising after epoch 4 while the
# val loss still sets a new low every other epoch (so the plateau scheduler never acts either).
ACC_PEAKS_LOSS_FALLS = (
    [0.980, 0.986, 0.989, 0.9925, 0.991, 0.992, 0.9915, 0.992, 0.9912, 0.9921, 0.992, 0.9922],
    [0.060, 0.045, 0.036, 0.0300, 0.031, 0.029, 0.0295, 0.028, 0.0285, 0.027, 0.0275, 0.026],
)
# A real plateau: neither number improves after epoch 3.
PLATEAU = ([0.90, 0.95, 0.97] + [0.96] * 9, [0.30, 0.20, 0.10] + [0.12] * 9)


def test_val_acc_rule_stops_while_the_loss_still_falls_and_the_combined_rule_does_not():
    assert stopping_epoch("val_acc", 5, *ACC_PEAKS_LOSS_FALLS) == 9  # 5 epochs after the best acc (epoch 4)
    assert stopping_epoch("val_acc_or_loss", 5, *ACC_PEAKS_LOSS_FALLS) is None
    assert stopping_epoch("val_loss", 5, *ACC_PEAKS_LOSS_FALLS) is None


@pytest.mark.parametrize("monitor", ["val_acc", "val_loss", "val_acc_or_loss"])
def test_every_rule_still_stops_on_a_plateau(monitor):
    assert stopping_epoch(monitor, 5, *PLATEAU) == 8
    assert stopping_epoch(monitor, 0, *PLATEAU) is None  # 0 = off


def test_best_weights_follow_the_val_accuracy_whatever_the_monitor():
    state = TrainState()
    improved = [record_epoch(state, e, acc, loss, "val_loss", 5) for e, (acc, loss) in
                enumerate(zip([0.5, 0.7, 0.6], [1.0, 0.9, 0.8], strict=True), start=1)]
    assert improved == [True, True, False] and state.best_epoch == 2
    assert state.epochs_without_improvement == 0  # epoch 3 set a new lowest val loss


def test_cosine_scheduler_lowers_the_lr_every_epoch_to_near_zero(data_dir):
    _, state, results = fit(data_dir, epochs=4, lr=0.04, scheduler="cosine", early_stopping=0)
    lrs = [r.lr for r in results]
    assert lrs[0] == pytest.approx(0.04) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] == pytest.approx(0.04 * (1 + math.cos(math.pi * 3 / 4)) / 2)  # half a cosine over 4 epochs


def test_a_run_logged_before_the_monitor_existed_resumes_with_the_val_acc_rule():
    old_params = {k: v for k, v in TrainConfig(epochs=3).to_dict().items() if k != "early_stopping_monitor"}
    checkpoint = {"params": old_params, "epoch": 2, "train_state": {"stopped_early": False}}
    resumed = resumed_config(TrainConfig(epochs=3, resume_from="abc"), checkpoint, "abc")  # the monitor not given
    assert resumed.early_stopping_monitor == "val_acc" and resumed.epochs == 3


@pytest.mark.parametrize("check_every", [1, 4])
def test_a_nan_loss_stops_the_epoch_within_check_every_batches(data_dir, check_every):
    from mnist_tracking.core.training import train_one_epoch

    config = TrainConfig(data_dir=str(data_dir), **FAST)
    splits = load_splits(config.dataset, config.data_dir, config.val_fraction, config.seed)
    trainer = Trainer(config, splits, torch.device("cpu"), "fp32")
    with torch.no_grad():  # poison one weight: every batch's loss is NaN from the first on
        trainer.model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(Diverged, match=f"batch {check_every}\\b"):
        train_one_epoch(trainer.model, splits.train, trainer.optimizer, 8, trainer.shuffle, torch.device("cpu"),
                        check_every=check_every)
