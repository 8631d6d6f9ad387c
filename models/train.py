"""Pretraining and fine-tuning entry point, started by torchrun or as a single process.

    torchrun --standalone --nproc_per_node=2 -m models.train \\
        --config CONFIG.json --output-dir DIR [--init-checkpoint CKPT] [--dataset-path PATH.zarr]

Each process trains a DistributedDataParallel replica on its shard of the training samples
(gloo on CPU, nccl on CUDA), as defined by `models.sampler`. The model, data and loss come
from the config's `models.objective.Objective`. Rank 0 alone logs metrics, appends every
step's loss (the mean over ranks) to `DIR/losses.jsonl`, writes `DIR/checkpoint.pt` every
`train.checkpoint_every` steps and at the end, and writes `DIR/done.json` with the final
step and loss.

If `DIR/checkpoint.pt` exists at start, training resumes from it: weights, optimiser,
learning-rate schedule, gradient scaler, every rank's random states and the data loader's
stream position, so a run killed and resumed (by `torchrun --max-restarts` or by starting
it again) repeats the uninterrupted run's losses exactly on CPU. `losses.jsonl` is cut back
to the checkpoint's step on resume.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint as recompute_in_backward
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    capture_rng_state,
    check_checkpoint_config,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from models.config import RunConfig, load_preset
from models.finetune import initialise_from_pretrained
from models.objective import Objective, objective_for
from models.sampler import EpochKeyedDataset, StreamBatchSampler, derive_seed, stream_position
from models.tracking import BUFFER_NAME, NullTracker, Tracker, tracker_from_env

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
DONE_NAME = "done.json"
LOSS_LOG_NAME = "losses.jsonl"

__all__ = ["derive_seed", "run_training", "setup_distributed", "DistributedContext"]


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_s: float = 300.0) -> DistributedContext:
    """Join the torchrun process group from its environment, or run as one process without it.

    A collective that waits longer than `timeout_s` for another rank raises, so a rank
    that hangs or dies cannot block the others forever. A rank that dies is also noticed by
    torchrun's agent, which then stops the other workers.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistributedContext(rank=0, world_size=1, device=device, distributed=False)

    if torch.cuda.is_available():
        # NOTE: only gloo on one CPU node is tested. The nccl, CUDA and multi-node paths
        # have not been run.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # NOTE: torchrun (torch 2.13) hands restarted workers the same store as the failed
        # round, where the dead rank's gloo address is still stored, so the new round's
        # connectFullMesh dials a closed port and fails. A prefix per restart keeps each
        # round's keys apart.
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        world_size = int(os.environ["WORLD_SIZE"])
        agent_store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
        )
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"models.train/restart_{restart}", agent_store),
            rank=int(os.environ["RANK"]),
            world_size=world_size,
            timeout=timeout,
        )
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, distributed=True
    )


def exit_with_launcher() -> None:
    """Make the kernel kill this process when its parent, the torchrun agent, dies (Linux only).

    torchrun starts each worker in a session of its own, so a SIGKILL of torchrun or of its
    process group leaves the workers running, still writing checkpoints into a folder that
    a re-run then shares with them.
    """
    if not sys.platform.startswith("linux"):
        logger.warning("cannot tie this worker to torchrun's lifetime on %s: it may outlive a killed launcher", sys.platform)
        return
    parent = os.getppid()
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG from <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(set_parent_death_signal, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed with errno %d: this worker may outlive a killed torchrun", ctypes.get_errno())
    elif os.getppid() != parent:
        # The launcher died before the signal was armed.
        raise SystemExit(f"torchrun (pid {parent}) exited before this worker started: stopping")


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Return the learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """Build AdamW with weight decay on the weights of linear layers only.

    Biases, layer norms and the position, channel and mask embeddings get no decay. The
    fused implementation runs when every parameter is on the CPU or a CUDA device. On a
    2-core CPU it took a quarter of the time of the default one (torch 2.13, 14 M parameters).
    """
    decay_ids = {id(module.weight) for module in model.modules() if isinstance(module, nn.Linear)}
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if id(p) in decay_ids], "weight_decay": config.train.weight_decay},
        {"params": [p for p in parameters if id(p) not in decay_ids], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") for p in parameters)
    return torch.optim.AdamW(groups, lr=config.train.lr, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, max_steps = config.train.warmup_steps, config.train.max_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, max_steps))


# Precision, activation checkpointing and compilation


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Return the autocast context for `train.precision`: none for fp32, else bf16 or fp16 matmuls."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Return a gradient scaler, enabled for fp16 only. Disabled, it passes gradients through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def enable_activation_checkpointing(modules: Sequence[nn.Module]) -> None:
    """Make each module recompute its activations in backward instead of storing them.

    The module's forward is wrapped in place, so its parameters and state_dict keys stay
    the same. Dropout masks are replayed because the checkpoint keeps the random state.
    """
    for module in modules:
        forward = module.forward

        def checkpointed_forward(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            return recompute_in_backward(_forward, *args, use_reentrant=False, **kwargs)

        module.forward = checkpointed_forward


def prepare_model(
    model: nn.Module, objective: Objective, config: RunConfig, context: DistributedContext
) -> nn.Module:
    """Apply activation checkpointing, wrap in DistributedDataParallel and compile, as configured.

    Returns the module to train. `model` itself stays unwrapped for checkpoints.
    """
    if config.train.activation_checkpointing:
        modules = objective.checkpoint_modules(model)
        enable_activation_checkpointing(modules)
        logger.info("activation checkpointing on %d modules", len(modules))

    wrapped: nn.Module = model
    if context.distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
    if config.train.compile:
        wrapped = torch.compile(wrapped)
        logger.info("compiling the model with torch.compile")
    return wrapped


# Per-step loss log


class LossLog:
    """`losses.jsonl`: one `{"step": S, "loss": L}` line per optimiser step, written by rank 0.

    Each line is appended with one `write` call and flushed, so a killed run leaves at most
    one incomplete last line, which `truncate` drops.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: Any = None

    def truncate(self, last_step: int) -> None:
        """Keep only the complete lines of steps up to `last_step`, rewriting the file atomically."""
        kept_lines: list[str] = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
                    kept_lines.append(line + "\n")
        encoded = "".join(kept_lines).encode()
        atomic_write_bytes(self.path, lambda handle: handle.write(encoded))

    def append(self, step: int, loss: float) -> None:
        if self.handle is None:
            self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across steps
        self.handle.write(json.dumps({"step": step, "loss": loss}) + "\n")
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def read_losses(path: str | Path) -> list[dict[str, Any]]:
    """Return the records of a `losses.jsonl` file in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Checkpoint state


@dataclass
class TrainingState:
    """Progress restored from or stored in a checkpoint."""

    step: int = 0
    loss: float | None = None
    consumed_samples: int = 0


def gather_rng_states(generator: torch.Generator, context: DistributedContext) -> list[dict[str, Any]]:
    """Collect every rank's random states, indexed by rank. Collective: all ranks must call it."""
    state = capture_rng_state(generator)
    if not context.distributed:
        return [state]
    states: list[Any] = [None] * context.world_size
    dist.all_gather_object(states, state)
    return states


def _restore_loader_position(
    checkpoint: dict[str, Any], step: int, samples_per_step: int, dataset_size: int, source: Path
) -> int:
    """Return the stream position to resume the sampler from, warning when the data order changes."""
    loader = checkpoint.get("loader")
    if not loader:
        logger.warning(
            "checkpoint %s has no data loader position: assuming %d samples per step, so the data "
            "order may differ from the interrupted run", source, samples_per_step,
        )
        return step * samples_per_step
    if loader.get("dataset_size") != dataset_size:
        logger.warning(
            "checkpoint %s was trained on %s samples per epoch, the dataset now has %d: epochs are "
            "reshuffled over the new size, so the data order differs from the interrupted run",
            source, loader.get("dataset_size"), dataset_size,
        )
    if loader.get("samples_per_step") != samples_per_step:
        logger.warning(
            "checkpoint %s took %s samples per step, this run takes %d (another world size or batch "
            "size): resuming from the same sample position", source, loader.get("samples_per_step"), samples_per_step,
        )
    return int(loader["consumed_samples"])


def restore_training_state(
    config: RunConfig,
    output_dir: Path,
    init_checkpoint: str | Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    context: DistributedContext,
    dataset_size: int,
) -> TrainingState:
    """Resume from `output_dir/checkpoint.pt` if present, else load `init_checkpoint` weights, else start fresh.

    Resuming restores weights, optimiser, scheduler, scaler, step, loader position and
    random states, while the learning-rate schedule follows the current `train.max_steps`
    and `train.warmup_steps`. An init checkpoint contributes only model weights, for
    fine-tuning. Both raise ValueError naming the setting when the checkpoint's model
    settings differ from `config.model`.
    """
    samples_per_step = config.train.batch_size * context.world_size
    resume_path = output_dir / CHECKPOINT_NAME
    if resume_path.is_file():
        if init_checkpoint is not None:
            logger.info("ignoring --init-checkpoint %s because %s exists", init_checkpoint, resume_path)
        checkpoint = load_checkpoint(resume_path)
        check_checkpoint_config(checkpoint["config"], config, resume_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        step = int(checkpoint["step"])
        state = TrainingState(
            step=step,
            loss=checkpoint["loss"],
            consumed_samples=_restore_loader_position(
                checkpoint, step, samples_per_step, dataset_size, resume_path
            ),
        )

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
        logger.info(
            "resuming from %s at step %d, data loader position %s",
            resume_path, state.step, stream_position(state.consumed_samples, dataset_size),
        )
        return state

    if init_checkpoint is not None:
        checkpoint = load_checkpoint(init_checkpoint)
        if isinstance(config, RunConfig) and config.finetune is not None:
            # The fine-tuning model may add or extend parameters (models.finetune).
            initialise_from_pretrained(model, checkpoint, config, init_checkpoint)
        else:
            check_checkpoint_config(checkpoint["config"], config, init_checkpoint)
            model.load_state_dict(checkpoint["model"])
            logger.info("initialised model weights from %s (step %s)", init_checkpoint, checkpoint["step"])
    return TrainingState()


# Training loop


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (a tensor, or a tuple, list or dict of them) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    return batch


def build_loader(
    dataset: Dataset, config: RunConfig, context: DistributedContext, state: TrainingState
) -> tuple[DataLoader, StreamBatchSampler]:
    """Build this rank's DataLoader for the remaining steps, starting at `state.consumed_samples`."""
    train = config.train
    sampler = StreamBatchSampler(
        len(dataset),
        batch_size=train.batch_size,
        world_size=context.world_size,
        rank=context.rank,
        seed=train.seed,
        num_steps=train.max_steps - state.step,
        start_sample=state.consumed_samples,
    )
    # Worker seeds are drawn from this generator rather than torch's global one, so creating
    # the loader leaves the global random state (dropout, noise) untouched.
    worker_seeds = torch.Generator().manual_seed(derive_seed(train.seed, context.rank, state.consumed_samples))
    loader = DataLoader(
        EpochKeyedDataset(dataset),
        batch_sampler=sampler,
        num_workers=train.num_workers,
        pin_memory=context.device.type == "cuda",
        generator=worker_seeds,
        prefetch_factor=4 if train.num_workers else None,
    )
    return loader, sampler


def _mean_over_ranks(value: torch.Tensor, context: DistributedContext) -> float:
    """Return the mean of a scalar tensor over all ranks. Collective when distributed."""
    value = value.detach().to(torch.float64).reshape(1)
    if context.distributed:
        dist.all_reduce(value)
    return float(value.item()) / context.world_size


@dataclass
class _Interval:
    """Loss, objective metrics (this rank's) and timing accumulated between two metric logs."""

    loss: float = 0.0
    steps: int = 0
    data_seconds: float = 0.0
    start: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.loss, self.steps, self.data_seconds, self.start = 0.0, 0, 0.0, time.perf_counter()
        self.metrics = {}

    def add_metrics(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + value


def _timed_batches(loader: DataLoader, interval: _Interval) -> Iterator[Any]:
    """Yield the loader's batches, adding the time spent waiting for each to `interval.data_seconds`."""
    iterator = iter(loader)
    while True:
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        interval.data_seconds += time.perf_counter() - started
        yield batch


def train_loop(
    config: RunConfig,
    output_dir: Path,
    objective: Objective,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    dataset: Dataset,
    generator: torch.Generator,
    state: TrainingState,
    context: DistributedContext,
    tracker: Tracker,
    loss_log: LossLog | None = None,
) -> TrainingState:
    """Run optimisation steps from `state.step` to `train.max_steps`, logging and checkpointing."""
    train = config.train
    loader, sampler = build_loader(dataset, config, context, state)
    tokens_per_step = objective.tokens_per_sample() * sampler.samples_per_step

    model.train()
    interval = _Interval()
    interval.reset()
    # disable=None shows the bar only when stderr is a terminal.
    progress = tqdm(total=train.max_steps, initial=state.step, desc="train", disable=None if context.is_main else True)
    for batch in _timed_batches(loader, interval):
        batch = move_to_device(batch, context.device)
        with autocast(train.precision, context.device):
            loss, objective_metrics = objective.loss(model, batch, generator)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if train.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.step += 1
        state.consumed_samples += sampler.samples_per_step
        progress.update(1)

        step_loss = _mean_over_ranks(loss, context)
        if loss_log is not None:
            loss_log.append(state.step, step_loss)
        interval.loss += step_loss
        interval.steps += 1
        interval.add_metrics(objective_metrics)

        last_step = state.step >= train.max_steps
        if state.step % train.log_every == 0 or last_step:
            state.loss = interval.loss / interval.steps
            elapsed = time.perf_counter() - interval.start
            metrics = {
                "train/loss": state.loss,
                "train/lr": scheduler.get_last_lr()[0],
                "train/samples_per_second": interval.steps * sampler.samples_per_step / elapsed,
                "train/tokens_per_second": interval.steps * tokens_per_step / elapsed,
                "train/data_wait_fraction": interval.data_seconds / elapsed,
                **{f"train/{name}": total / interval.steps for name, total in interval.metrics.items()},
            }
            if context.is_main:
                logger.info(
                    "step %d/%d loss %.4f lr %.2e %.1f samples/s, %.0f%% of the time waiting for data",
                    state.step, train.max_steps, state.loss, metrics["train/lr"],
                    metrics["train/samples_per_second"], 100 * metrics["train/data_wait_fraction"],
                )
                tracker.log_metrics(metrics, step=state.step)
            interval.reset()

        if state.step % train.checkpoint_every == 0 or last_step:
            rng_states = gather_rng_states(generator, context)
            if context.is_main:
                position = stream_position(state.consumed_samples, len(dataset))
                save_checkpoint(
                    output_dir / CHECKPOINT_NAME,
                    model=model, config=config, step=state.step, optimizer=optimizer,
                    scheduler=scheduler, loss=state.loss, rng=rng_states, scaler=scaler.state_dict(),
                    loader={
                        **position,
                        "dataset_size": len(dataset),
                        "samples_per_step": sampler.samples_per_step,
                    },
                )
            # Start the next interval's clock after the checkpoint write.
            interval.start = time.perf_counter()
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
    context = context or setup_distributed(config.train.collective_timeout_s)
    output_dir = Path(output_dir)
    torch.set_num_threads(config.train.num_threads or 1)
    objective = objective_for(config)

    # Identical initial weights on every rank, then rank-specific masks and dropout.
    torch.manual_seed(derive_seed(config.train.seed))
    model = objective.build_model().to(context.device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    scaler = build_scaler(config.train.precision, context.device)
    rank_seed = derive_seed(config.train.seed, context.rank)
    torch.manual_seed(rank_seed)
    generator = torch.Generator().manual_seed(rank_seed)

    dataset = objective.open_dataset(dataset_path)
    state = restore_training_state(
        config, output_dir, init_checkpoint, model, optimizer, scheduler, scaler, generator, context, len(dataset)
    )
    loss_log = LossLog(output_dir / LOSS_LOG_NAME) if context.is_main else None
    if context.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "config.json", config.model_dump(mode="json"))
        loss_log.truncate(state.step)

    if state.step < config.train.max_steps:
        tracker = tracker_from_env(output_dir / BUFFER_NAME) if context.is_main else NullTracker()
        wrapped = prepare_model(model, objective, config, context)
        try:
            state = train_loop(
                config, output_dir, objective, wrapped, optimizer, scheduler, scaler, dataset,
                generator, state, context, tracker, loss_log,
            )
        finally:
            tracker.close()
            if loss_log is not None:
                loss_log.close()
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
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_launcher()
    config = load_preset(args.config)
    context = setup_distributed(config.train.collective_timeout_s)
    logging.basicConfig(
        level=logging.INFO if context.is_main else logging.WARNING,
        format=f"%(asctime)s rank {context.rank} %(levelname)s %(name)s: %(message)s",
    )
    run_training(config, args.output_dir, args.init_checkpoint, args.dataset_path, context)
    if context.distributed:
        # All ranks meet first, so no rank closes its gloo connections while rank 0 still
        # writes files. NOTE: without this barrier, one 2-process CPU run ended with SIGABRT
        # on rank 1. Whether the barrier prevents that is unconfirmed.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
