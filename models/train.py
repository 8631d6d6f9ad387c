"""Pretraining and fine-tuning entry point, started by torchrun or as a single process.

    torchrun --standalone --nproc_per_node=2 -m models.train \\
        --config CONFIG.json --output-dir DIR [--init-checkpoint CKPT] [--dataset-path PATH.zarr]

Each process trains a DistributedDataParallel replica on its shard of the windows of the
dataset's training period (gloo on CPU, nccl on CUDA). Rank 0 logs metrics, writes
`DIR/checkpoint.pt` every `train.checkpoint_every` steps and at the end, and writes
`DIR/done.json` with the final step and loss. If `DIR/checkpoint.pt` exists at start,
training resumes from it, including optimizer, scheduler and random states.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xarray as xr
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from models.atmorep import AtmoRep
from models.checkpoint import (
    atomic_write_json,
    capture_rng_state,
    check_compatible,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from models.config import ModelConfig, RunConfig
from models.data import WindowDataset
from models.masking import masked_mse, sample_mask
from models.tracking import Tracker, tracker_from_env

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
DONE_NAME = "done.json"


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistributedContext:
    """Join the torchrun process group from its environment, or run as one process without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistributedContext(rank=0, world_size=1, device=device, distributed=False)

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, distributed=True
    )


def derive_seed(*values: int) -> int:
    """Derive a 32-bit seed from integers such as (config seed, rank), without the clock."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def open_training_dataset(config: RunConfig, dataset_path: str | Path | None) -> WindowDataset:
    """Open the dataset (a Zarr path, else the catalog entry `train.dataset`) restricted to its train_period."""
    if dataset_path is not None:
        source = str(dataset_path)
        ds = xr.open_zarr(dataset_path)
    else:
        from data_catalog.catalog import Catalog

        source = config.train.dataset
        ds = Catalog().open_dataset(config.train.dataset)

    period = ds.attrs.get("train_period")
    if not period or len(period) != 2:
        raise ValueError(
            f"dataset {source} has no valid train_period attribute (got {period!r}): "
            "re-ingest it so that its attrs contain [start, end]"
        )
    return WindowDataset(
        ds,
        variables=config.model.variables,
        period=tuple(period),
        sample_shape=config.model.sample_shape,
        time_stride=config.train.time_stride,
        levels=config.model.levels,
        random_crop=True,
        spatial_stride=config.train.spatial_stride,
        seed=config.train.seed,
    )


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weights of linear layers only.

    Biases, layer norms and the position, channel and mask embeddings get no decay.
    """
    decay_ids = {id(module.weight) for module in model.modules() if isinstance(module, nn.Linear)}
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if id(p) in decay_ids], "weight_decay": config.train.weight_decay},
        {"params": [p for p in parameters if id(p) not in decay_ids], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.train.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, max_steps = config.train.warmup_steps, config.train.max_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, max_steps))
