"""Sharding of training samples over ranks and DataLoader workers, and its resume position."""

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from models.sampler import EpochKeyedDataset, StreamBatchSampler, epoch_permutation, stream_position


class IndexDataset(Dataset):
    """Returns (epoch, index, worker id) for each sample, to trace who loaded what."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        worker = get_worker_info()
        return self.epoch, index, -1 if worker is None else worker.id


def load_all_ranks(size, world_size, batch_size, num_steps, num_workers=0, start_sample=0):
    """Run every rank's DataLoader and return [(step, rank, worker, epoch, index)] in load order."""
    records = []
    for rank in range(world_size):
        sampler = StreamBatchSampler(
            size, batch_size=batch_size, world_size=world_size, rank=rank, seed=7,
            num_steps=num_steps, start_sample=start_sample,
        )
        loader = DataLoader(EpochKeyedDataset(IndexDataset(size)), batch_sampler=sampler, num_workers=num_workers)
        for step, (epochs, indices, workers) in enumerate(loader):
            assert len(indices) == batch_size
            for epoch, index, worker in zip(epochs.tolist(), indices.tolist(), workers.tolist(), strict=True):
                records.append((step, rank, worker, epoch, index))
    return records


@pytest.mark.parametrize(
    ("size", "world_size", "batch_size", "num_workers"),
    [(32, 2, 4, 0), (37, 2, 4, 2), (50, 3, 5, 2), (11, 4, 2, 2), (7, 2, 8, 0)],
)
def test_every_sample_once_per_epoch(size, world_size, batch_size, num_workers):
    # Three epochs' worth of steps, rounded up, so partial epochs at both ends are covered.
    num_steps = -(-3 * size // (world_size * batch_size))

    records = load_all_ranks(size, world_size, batch_size, num_steps, num_workers)

    per_epoch = Counter((epoch, index) for _, _, _, epoch, index in records)
    complete_epochs = len(records) // size
    for epoch in range(complete_epochs):
        counts = [per_epoch[(epoch, index)] for index in range(size)]
        assert counts == [1] * size, f"epoch {epoch}: samples seen {counts}"
    # The last, partial epoch repeats nothing.
    assert all(count == 1 for count in per_epoch.values())
    if num_workers:
        assert {worker for _, _, worker, _, _ in records} == set(range(num_workers))


def test_each_step_disjoint_across_ranks():
    records = load_all_ranks(size=37, world_size=3, batch_size=4, num_steps=9)

    for step in range(9):
        keys = [(epoch, index) for s, _, _, epoch, index in records if s == step]
        assert len(keys) == 12
        assert len(set(keys)) == 12


def test_remainder_carries_into_next_epoch():
    # 10 samples, 2 ranks x 3 per step: step 1 takes the last 4 of epoch 0 and 2 of epoch 1.
    records = load_all_ranks(size=10, world_size=2, batch_size=3, num_steps=2)

    step_1 = sorted((epoch, index) for step, _, _, epoch, index in records if step == 1)
    assert [epoch for epoch, _ in step_1] == [0, 0, 0, 0, 1, 1]
    first_of_epoch_1 = epoch_permutation(10, seed=7, epoch=1)[:2].tolist()
    assert sorted(index for epoch, index in step_1 if epoch == 1) == sorted(first_of_epoch_1)


def test_order_is_pure_function_of_seed_and_epoch():
    first = epoch_permutation(100, seed=3, epoch=2)

    assert torch.equal(first, epoch_permutation(100, seed=3, epoch=2))
    assert not torch.equal(first, epoch_permutation(100, seed=3, epoch=1))
    assert not torch.equal(first, epoch_permutation(100, seed=4, epoch=2))
    assert sorted(first.tolist()) == list(range(100))


def test_resume_from_position_continues_stream():
    full = load_all_ranks(size=23, world_size=2, batch_size=3, num_steps=10)
    resumed = load_all_ranks(size=23, world_size=2, batch_size=3, num_steps=6, start_sample=4 * 6)

    full_tail = [(step - 4, rank, epoch, index) for step, rank, _, epoch, index in full if step >= 4]
    assert [(step, rank, epoch, index) for step, rank, _, epoch, index in resumed] == full_tail


def test_epoch_selects_dataset_augmentation():
    dataset = EpochKeyedDataset(IndexDataset(5))

    assert dataset[3] == (0, 3, -1)
    assert dataset[2 * 5 + 4] == (2, 4, -1)


def test_stream_position_names_epoch_and_offset():
    assert stream_position(23, 10) == {"epoch": 2, "offset": 3, "consumed_samples": 23}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"dataset_size": 0}, "dataset is empty"),
        ({"rank": 2}, "rank 2 is outside"),
        ({"batch_size": 0}, "batch_size 0"),
    ],
)
def test_sampler_rejects_invalid_settings(arguments, message):
    settings = {"dataset_size": 10, "batch_size": 2, "world_size": 2, "rank": 0, "seed": 0, "num_steps": 1}

    with pytest.raises(ValueError, match=message):
        StreamBatchSampler(**settings | arguments)
