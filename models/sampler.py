"""Shard training samples over ranks and DataLoader workers, with a resumable position.

The samples form one stream: the permutation of epoch 0, then that of epoch 1, and so on.
Each epoch's permutation is a pure function of (seed, epoch). Optimiser step `s` takes the
next `world_size * batch_size` stream positions, and rank `r` takes the `r`-th block of
`batch_size` of them. So within an epoch every sample goes to exactly one (step, rank)
pair, whatever the world size.

When `world_size * batch_size` does not divide the dataset size, the last step of an
epoch is completed with the first samples of the next epoch's permutation. No sample is
dropped and none repeats within its epoch; only the step boundaries drift across epochs.

The sampler yields keys `epoch * len(dataset) + index`, and `EpochKeyedDataset` decodes
them, so a step that straddles two epochs still gives each sample its own epoch's random
crop. The DataLoader hands each batch of keys to one worker, so every key is loaded once
however many workers there are.

A run's position is the number of stream positions consumed, `consumed_samples`. It is
stored in the checkpoint, and a resumed run starts its sampler there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derive_seed(*values: int) -> int:
    """Derive a 32-bit seed from integers such as (config seed, rank), without the clock."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def epoch_permutation(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the sample order of `epoch`: a permutation of range(dataset_size) seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(dataset_size, generator=generator)


def stream_position(consumed_samples: int, dataset_size: int) -> dict[str, int]:
    """Return the loader position (epoch, offset within the epoch's permutation) of a stream position."""
    epoch, offset = divmod(consumed_samples, dataset_size)
    return {"epoch": epoch, "offset": offset, "consumed_samples": consumed_samples}


class StreamBatchSampler(Sampler[list[int]]):
    """Batch sampler of one rank: `num_steps` batches of epoch-keyed sample indices.

    Batch `k` contains stream positions `start_sample + k * world_size * batch_size + rank *
    batch_size` onwards, `batch_size` of them.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        num_steps: int,
        start_sample: int = 0,
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"the dataset is empty: a sampler needs at least one sample, got size {dataset_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of {world_size} processes")
        if batch_size < 1 or num_steps < 0 or start_sample < 0:
            raise ValueError(
                f"invalid sampler settings: batch_size {batch_size} must be positive, num_steps "
                f"{num_steps} and start_sample {start_sample} non-negative"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.num_steps = num_steps
        self.start_sample = start_sample
        self._permutations: dict[int, torch.Tensor] = {}

    @property
    def samples_per_step(self) -> int:
        """Stream positions consumed by one optimiser step over all ranks."""
        return self.world_size * self.batch_size

    def key(self, position: int) -> int:
        """Return the epoch-keyed sample index at a stream position."""
        epoch, offset = divmod(position, self.dataset_size)
        if epoch not in self._permutations:
            # Keep the current and the next epoch: a batch spans at most those two unless it is
            # larger than the dataset.
            for old in [cached for cached in self._permutations if cached < epoch - 1]:
                del self._permutations[old]
            self._permutations[epoch] = epoch_permutation(self.dataset_size, self.seed, epoch)
        return epoch * self.dataset_size + int(self._permutations[epoch][offset])

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.num_steps):
            first = self.start_sample + step * self.samples_per_step + self.rank * self.batch_size
            yield [self.key(position) for position in range(first, first + self.batch_size)]

    def __len__(self) -> int:
        return self.num_steps


class EpochKeyedDataset(Dataset):
    """View of a map-style dataset indexed by `epoch * len(dataset) + index`.

    Before reading sample `index`, it calls `dataset.set_epoch(epoch)` when the dataset has
    that method, so per-epoch augmentations follow the key, not the process's history.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.size = len(dataset)
        self._set_epoch = getattr(dataset, "set_epoch", None)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), self.size)
        if self._set_epoch is not None:
            self._set_epoch(epoch)
        return self.dataset[index]
