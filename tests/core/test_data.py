from __future__ import annotations

import pytest
import torch
from fakes import N_TEST, N_TRAIN, write_fake_dataset
from helpers import (
    TINY,
    invoke,
    one_error_line,
    runs_of,
)

from mnist_tracking.core.data import Split, batches, load_splits
from mnist_tracking.core.errors import UserError


def test_split_sizes_and_disjoint(data_dir):
    splits = load_splits("mnist", data_dir, val_fraction=0.2, seed=42)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (N_TRAIN * 0.8, N_TRAIN * 0.2, N_TEST)
    train, val = set(splits.train.indices.tolist()), set(splits.val.indices.tolist())
    assert not train & val and len(train | val) == N_TRAIN
    assert splits.train.images.shape == (320, 1, 28, 28) and splits.train.images.dtype == torch.float32
    assert 0.0 <= splits.train.images.min() and splits.train.images.max() <= 1.0
    assert splits.train.labels.dtype == torch.int64


def test_split_is_seeded(data_dir):
    a = load_splits("mnist", data_dir, 0.2, seed=1)
    b = load_splits("mnist", data_dir, 0.2, seed=1)
    c = load_splits("mnist", data_dir, 0.2, seed=2)
    assert torch.equal(a.val.indices, b.val.indices)
    assert not torch.equal(a.val.indices, c.val.indices)


def test_max_samples_takes_the_first_images(data_dir):
    splits = load_splits("mnist", data_dir, 0.25, seed=0, max_samples=100)
    assert len(splits.train) + len(splits.val) == 100
    assert int(torch.cat([splits.train.indices, splits.val.indices]).max()) < 100


def test_other_datasets_read_their_own_folder(data_dir):
    splits = load_splits("fashion-mnist", data_dir, 0.2, seed=0)
    assert "FashionMNIST" in splits.source


def test_batches_cover_the_split_once(data_dir):
    split = load_splits("mnist", data_dir, 0.2, seed=0).val
    ordered = torch.cat([y for _, y in batches(split, 7)])
    assert torch.equal(ordered, split.labels)
    shuffled = torch.cat([y for _, y in batches(split, 7, torch.Generator().manual_seed(0))])
    assert sorted(shuffled.tolist()) == sorted(split.labels.tolist())
    assert not torch.equal(shuffled, split.labels)


def test_missing_files_offline_say_where_to_put_them(tmp_path):
    # No network here: torchvision's download fails, and the error names the folder.
    with pytest.raises(UserError) as err:
        load_splits("mnist", tmp_path / "empty", 0.2, seed=0)
    message = str(err.value)
    assert str(tmp_path / "empty" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "\n" not in message
    assert not (tmp_path / "empty").exists(), "a failed download must not leave empty folders"


def test_truncated_file_is_a_clear_error(tmp_path):
    write_fake_dataset(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_splits("mnist", tmp_path, 0.2, seed=0)


def test_labels_of_another_file_are_a_clear_error(tmp_path):
    write_fake_dataset(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "train-labels-idx1-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(UserError, match="do not match"):
        load_splits("mnist", tmp_path, 0.2, seed=0)


@pytest.mark.parametrize("damage", ["truncated", "labels_of_another_file"])
def test_corrupt_idx_files_are_one_line_and_leave_no_run(tmp_path, fresh_experiment, damage):
    raw = write_fake_dataset(tmp_path) / "MNIST" / "raw"
    if damage == "truncated":  # a download cut in half
        images = raw / "train-images-idx3-ubyte"
        images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
        expected = "truncated or corrupt"
    else:
        (raw / "train-labels-idx1-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
        expected = "do not match"
    result = invoke("train", "--data-dir", str(tmp_path), *TINY)
    assert result.exit_code != 0
    line = one_error_line(result.stderr)
    assert expected in line and str(raw) in line
    assert runs_of(fresh_experiment) == []


@pytest.mark.parametrize("n, batch_size", [(33, 32), (65, 32), (5, 4), (32, 32)])
def test_no_training_batch_holds_one_image_and_none_is_skipped(n, batch_size):
    split = Split(torch.arange(n).float().view(n, 1, 1, 1), torch.arange(n), torch.arange(n))
    sizes, seen = [], []
    for _images, labels in batches(split, batch_size, torch.Generator().manual_seed(0)):
        sizes.append(len(labels))
        seen.extend(labels.tolist())
    assert min(sizes) >= 2 and sorted(seen) == list(range(n))  # every image once, none alone
