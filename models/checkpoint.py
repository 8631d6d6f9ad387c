"""Training checkpoints: atomic save, safe load and configuration compatibility checks.

A checkpoint is a dict with keys `model` (state_dict), `optimizer`, `scheduler`, `step`,
`loss`, `config` (`RunConfig.model_dump(mode="json")`) and `rng` (random generator states
as tensors, one entry per rank). It contains only tensors and plain Python containers,
so `torch.load(weights_only=True)` reads it without unpickling arbitrary objects.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.atmorep import AtmoRep
from models.config import ModelConfig, RunConfig

logger = logging.getLogger(__name__)

# ModelConfig fields that may differ between a checkpoint and the model that loads it,
# because they change no parameter shape or meaning.
RELOADABLE_MODEL_FIELDS = frozenset({"dropout"})


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, sync it, then rename it to `path`.

    A crash leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    encoded = (json.dumps(data, indent=2) + "\n").encode()
    atomic_write_bytes(path, lambda handle: handle.write(encoded))


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside a DistributedDataParallel wrapper, or the model itself."""
    return getattr(model, "module", model)


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: RunConfig,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    loss: float | None = None,
    rng: list[dict[str, Any]] | None = None,
) -> None:
    """Write a checkpoint to `path` atomically. The module docstring lists its keys."""
    checkpoint = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "loss": None if loss is None else float(loss),
        "config": config.model_dump(mode="json"),
        "rng": rng,
    }
    atomic_write_bytes(path, lambda handle: torch.save(checkpoint, handle))
    logger.info("saved checkpoint at step %d to %s", step, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict with `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location=map_location, weights_only=True)


def check_compatible(saved: ModelConfig, current: ModelConfig, source: str | Path) -> None:
    """Raise ValueError naming every model setting that differs between `saved` and `current`.

    Only fields in RELOADABLE_MODEL_FIELDS may differ.
    """
    saved_fields = saved.model_dump(mode="json")
    current_fields = current.model_dump(mode="json")
    mismatches = [
        f"model.{name}: checkpoint {saved_fields[name]!r}, config {current_fields[name]!r}"
        for name in saved_fields
        if name not in RELOADABLE_MODEL_FIELDS and saved_fields[name] != current_fields[name]
    ]
    if mismatches:
        raise ValueError(
            f"checkpoint {source} is incompatible with the model config ("
            + "; ".join(mismatches)
            + "): use the checkpoint's model settings or train from scratch"
        )


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[AtmoRep, RunConfig]:
    """Rebuild the model stored in a checkpoint, in eval mode, with the run's configuration."""
    checkpoint = load_checkpoint(path, map_location)
    config = RunConfig.model_validate(checkpoint["config"])
    model = AtmoRep(config.model)
    model.load_state_dict(checkpoint["model"])
    model.to(map_location)
    model.eval()
    return model, config


def capture_rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Return this process's random states as tensors: torch CPU, CUDA devices and `generator`."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore the states saved by `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
