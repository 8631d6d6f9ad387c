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
from models.config import ModelConfig, RunConfig, load_preset
from models.data import WindowDataset
from models.masking import masked_mse, sample_mask
from models.tracking import NullTracker, Tracker, tracker_from_env

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
        ds = xr.open_zarr(dataset_path, consolidated=False)
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
    """Return the learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """Build AdamW with weight decay on the weights of linear layers only.

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


@dataclass
class TrainingState:
    """Progress restored from or stored in a checkpoint."""

    step: int = 0
    loss: float | None = None


def gather_rng_states(generator: torch.Generator, context: DistributedContext) -> list[dict[str, Any]]:
    """Collect every rank's random states, indexed by rank. Collective: all ranks must call it."""
    state = capture_rng_state(generator)
    if not context.distributed:
        return [state]
    states: list[Any] = [None] * context.world_size
    dist.all_gather_object(states, state)
    return states


def restore_training_state(
    config: RunConfig,
    output_dir: Path,
    init_checkpoint: str | Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    context: DistributedContext,
) -> TrainingState:
    """Resume from `output_dir/checkpoint.pt` if present, else load `init_checkpoint` weights, else start fresh.

    Resuming restores weights, optimizer, scheduler, step and random states, while the
    learning-rate schedule follows the current `train.max_steps` and `train.warmup_steps`.
    An init checkpoint contributes only model weights, for fine-tuning. Both raise ValueError when
    the checkpoint's model settings differ from `config.model`.
    """
    resume_path = output_dir / CHECKPOINT_NAME
    if resume_path.is_file():
        if init_checkpoint is not None:
            logger.info("ignoring --init-checkpoint %s because %s exists", init_checkpoint, resume_path)
        checkpoint = load_checkpoint(resume_path)
        check_compatible(ModelConfig.model_validate(checkpoint["config"]["model"]), config.model, resume_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = TrainingState(step=int(checkpoint["step"]), loss=checkpoint["loss"])

        rng_states = checkpoint.get("rng") or []
        if len(rng_states) == context.world_size:
            restore_rng_state(rng_states[context.rank], generator)
        else:
            logger.warning(
                "checkpoint %s stores random states of %d ranks, this run has %d: reseeding from "
                "(seed, rank, step), so masks and dropout differ from an uninterrupted run",
                resume_path, len(rng_states), context.world_size,
            )
            seed = derive_seed(config.train.seed, context.rank, state.step)
            torch.manual_seed(seed)
            generator.manual_seed(seed)
        logger.info("resuming from %s at step %d", resume_path, state.step)
        return state

    if init_checkpoint is not None:
        checkpoint = load_checkpoint(init_checkpoint)
        check_compatible(ModelConfig.model_validate(checkpoint["config"]["model"]), config.model, init_checkpoint)
        model.load_state_dict(checkpoint["model"])
        logger.info("initialised model weights from %s (step %s)", init_checkpoint, checkpoint["step"])
    return TrainingState()


def _mean_over_ranks(value: float, context: DistributedContext) -> float:
    if not context.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size


def train_loop(
    config: RunConfig,
    output_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    dataset: WindowDataset,
    generator: torch.Generator,
    state: TrainingState,
    context: DistributedContext,
    tracker: Tracker,
) -> TrainingState:
    """Run optimisation steps from `state.step` to `train.max_steps`, logging and checkpointing."""
    train = config.train
    token_shape = config.model.token_shape
    sampler = DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=train.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // train.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size {train.batch_size} exceeds the {len(sampler)} windows per rank: "
            "reduce the batch size or the number of processes"
        )

    model.train()
    interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
    # disable=None shows the bar only when stderr is a terminal.
    show_progress = None if context.is_main else True
    progress = tqdm(total=train.max_steps, initial=state.step, desc="train", disable=show_progress)
    while state.step < train.max_steps:
        # Skipping the batches already seen this epoch makes a resumed run see the same data.
        epoch, seen_batches = divmod(state.step, steps_per_epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        indices = list(sampler)[seen_batches * train.batch_size : steps_per_epoch * train.batch_size]
        loader = DataLoader(dataset, batch_size=train.batch_size, sampler=indices, drop_last=True)

        for x, features in loader:
            x = x.to(context.device)
            features = features.to(context.device)
            masked = sample_mask(config.masking, x, token_shape, generator)
            prediction = model(masked.inputs, masked.mask, features)
            loss = masked_mse(prediction, x, masked.mask, token_shape)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            scheduler.step()
            state.step += 1
            progress.update(1)
            interval_loss += float(loss.detach())
            interval_steps += 1

            last_step = state.step >= train.max_steps
            if state.step % train.log_every == 0 or last_step:
                state.loss = _mean_over_ranks(interval_loss / interval_steps, context)
                elapsed = time.perf_counter() - interval_start
                metrics = {
                    "train/loss": state.loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/samples_per_second": interval_steps * train.batch_size * context.world_size / elapsed,
                }
                if context.is_main:
                    logger.info(
                        "step %d/%d loss %.4f lr %.2e %.1f samples/s",
                        state.step, train.max_steps, state.loss, metrics["train/lr"],
                        metrics["train/samples_per_second"],
                    )
                    tracker.log_metrics(metrics, step=state.step)
                interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()

            if state.step % train.checkpoint_every == 0 or last_step:
                rng_states = gather_rng_states(generator, context)
                if context.is_main:
                    save_checkpoint(
                        output_dir / CHECKPOINT_NAME,
                        model=model, config=config, step=state.step, optimizer=optimizer,
                        scheduler=scheduler, loss=state.loss, rng=rng_states,
                    )
                # Start the next interval's clock after the checkpoint write.
                interval_start = time.perf_counter()
            if last_step:
                break
    progress.close()
    return state


def run_training(
    config: RunConfig,
    output_dir: str | Path,
    init_checkpoint: str | Path | None = None,
    dataset_path: str | Path | None = None,
    context: DistributedContext | None = None,
) -> TrainingState:
    """Train `config` in this process (one rank of a torchrun job, or alone) and return the final state."""
    context = context or setup_distributed()
    output_dir = Path(output_dir)
    torch.set_num_threads(config.train.num_threads or 1)

    # Identical initial weights on every rank, then rank-specific masks and dropout.
    torch.manual_seed(derive_seed(config.train.seed))
    model = AtmoRep(config.model).to(context.device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    rank_seed = derive_seed(config.train.seed, context.rank)
    torch.manual_seed(rank_seed)
    generator = torch.Generator().manual_seed(rank_seed)

    state = restore_training_state(
        config, output_dir, init_checkpoint, model, optimizer, scheduler, generator, context
    )
    if context.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "config.json", config.model_dump(mode="json"))

    if state.step < config.train.max_steps:
        dataset = open_training_dataset(config, dataset_path)
        tracker = tracker_from_env() if context.is_main else NullTracker()
        wrapped: nn.Module = model
        if context.distributed:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=device_ids)
        try:
            state = train_loop(
                config, output_dir, wrapped, optimizer, scheduler, dataset, generator, state, context, tracker
            )
        finally:
            tracker.close()
    else:
        logger.info("checkpoint is already at step %d of %d: nothing to train", state.step, config.train.max_steps)

    if context.is_main:
        atomic_write_json(
            output_dir / DONE_NAME,
            {"step": state.step, "loss": state.loss, "checkpoint": str(output_dir / CHECKPOINT_NAME)},
        )
    return state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="run configuration file (JSON or YAML)")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for checkpoint.pt and done.json")
    parser.add_argument(
        "--init-checkpoint", type=Path, default=None,
        help="checkpoint whose model weights initialise the model for fine-tuning, ignored when resuming",
    )
    parser.add_argument(
        "--dataset-path", type=Path, default=None,
        help="normalised Zarr dataset to train on instead of the catalog entry train.dataset",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    context = setup_distributed()
    logging.basicConfig(
        level=logging.INFO if context.is_main else logging.WARNING,
        format=f"%(asctime)s rank {context.rank} %(levelname)s %(name)s: %(message)s",
    )
    config = load_preset(args.config)
    run_training(config, args.output_dir, args.init_checkpoint, args.dataset_path, context)
    if context.distributed:
        # All ranks meet first, so no rank closes its gloo connections while rank 0 still
        # writes files. NOTE: without this barrier, one 2-process CPU run ended with SIGABRT
        # on rank 1. Whether the barrier prevents that is unconfirmed.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
