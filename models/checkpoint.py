"""Training checkpoints: atomic save, safe load and configuration compatibility checks.

A checkpoint is a dict with keys `model` (state_dict), `optimizer`, `scheduler`,
`scaler` (gradient scaler state), `step`, `loss`, `config`
(`RunConfig.model_dump(mode="json")`), `rng` (random generator states as tensors and
ints, one entry per rank) and `loader` (the data loader's stream position, see
`models.sampler`). It contains only tensors and plain Python containers, so
`torch.load(weights_only=True)` reads it without unpickling arbitrary objects.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.atmorep import AtmoRep
from models.config import ModelConfig, RunConfig, config_family, validate_run_config

logger = logging.getLogger(__name__)

# ModelConfig fields that may differ between a checkpoint and the model that loads it,
# because they change no parameter shape or meaning.
RELOADABLE_MODEL_FIELDS = frozenset({"dropout", "loss"})


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
    """Return the model inside torch.compile and DistributedDataParallel wrappers, or the model itself.

    The unwrapped model's state_dict keys have no `_orig_mod.` or `module.` prefix.
    """
    model = getattr(model, "_orig_mod", model)
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
    scaler: dict[str, Any] | None = None,
    loader: dict[str, int] | None = None,
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
        "scaler": scaler,
        "loader": loader,
    }
    atomic_write_bytes(path, lambda handle: torch.save(checkpoint, handle))
    logger.info("saved checkpoint at step %d to %s", step, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict with `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location=map_location, weights_only=True)


def _field_mismatches(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[str]:
    """Describe how two `model.fields` lists differ: their names, else each differing setting."""
    saved_names = [field["name"] for field in saved]
    current_names = [field["name"] for field in current]
    if saved_names != current_names:
        return [f"model.fields names: checkpoint {saved_names}, config {current_names}"]
    return [
        f"model.fields[{old['name']}].{key}: checkpoint {old[key]!r}, config {new[key]!r}"
        for old, new in zip(saved, current, strict=True)
        for key in old
        if old[key] != new[key]
    ]


def check_compatible(saved: ModelConfig, current: ModelConfig, source: str | Path) -> None:
    """Raise ValueError naming every model setting that differs between `saved` and `current`.

    Only fields in RELOADABLE_MODEL_FIELDS may differ.
    """
    saved_fields = saved.model_dump(mode="json")
    current_fields = current.model_dump(mode="json")
    mismatches = [
        f"model.{name}: checkpoint {saved_fields[name]!r}, config {current_fields[name]!r}"
        for name in saved_fields
        if name not in RELOADABLE_MODEL_FIELDS | {"fields"} and saved_fields[name] != current_fields[name]
    ]
    mismatches += _field_mismatches(saved_fields["fields"], current_fields["fields"])
    if mismatches:
        raise ValueError(
            f"checkpoint {source} is incompatible with the model config ("
            + "; ".join(mismatches)
            + "): use the checkpoint's model settings or train from scratch"
        )


# Model settings of the masked autoencoder that change no parameter shape, so a checkpoint
# may be loaded with other values, for example to fine-tune with another mask ratio.
RELOADABLE_MAE_FIELDS = frozenset({"mask_ratio", "norm_pix_loss"})


def _settings_mismatches(
    saved: dict[str, Any], current: dict[str, Any], prefix: str, reloadable: frozenset
) -> list[str]:
    return [
        f"{prefix}.{name}: checkpoint {saved.get(name)!r}, config {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if name not in reloadable and saved.get(name) != current.get(name)
    ]


def check_checkpoint_config(saved: dict[str, Any], current: Any, source: str | Path) -> None:
    """Raise ValueError unless a checkpoint's config (a dict) fits the run config `current`.

    The model families must match (see `models.config.validate_run_config`). An AtmoRep
    config is checked by `check_compatible`. For the masked autoencoder and its classifier
    every model setting must match except those in RELOADABLE_MAE_FIELDS, and the
    classifier's head settings must match too.
    """
    saved_family = config_family(saved)
    current_tree = current.model_dump(mode="json")
    current_family = config_family(current_tree)
    if saved_family != current_family:
        raise ValueError(
            f"checkpoint {source} contains a model of family {saved_family}, but the config is for family "
            f"{current_family}: give a checkpoint of a {current_family} model, or train from scratch"
        )
    if current_family == "atmorep":
        check_compatible(ModelConfig.model_validate(saved["model"]), current.model, source)
        return

    mismatches = _settings_mismatches(saved["model"], current_tree["model"], "model", RELOADABLE_MAE_FIELDS)
    if current_family == "mae-classifier":
        mismatches += _settings_mismatches(saved["head"], current_tree["head"], "head", frozenset())
    if mismatches:
        raise ValueError(
            f"checkpoint {source} is incompatible with the model config ("
            + "; ".join(mismatches)
            + "): use the checkpoint's model settings or train from scratch"
        )


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Rebuild the model stored in a checkpoint, in eval mode, with the run's configuration.

    The model class follows the config's family: `AtmoRep` with a `RunConfig`,
    `models.mae.MaskedAutoencoder` or `models.mae_classifier.MAEClassifier` otherwise.
    """
    checkpoint = load_checkpoint(path, map_location)
    config = validate_run_config(checkpoint["config"], source=f"checkpoint {path}")
    if not isinstance(config, RunConfig):
        from models.objective import objective_for

        model = objective_for(config).build_model()
        model.load_state_dict(checkpoint["model"])
        model.to(map_location)
        model.eval()
        return model, config
    if config.model.architecture_version != AtmoRep.ARCHITECTURE_VERSION:
        raise ValueError(
            f"checkpoint {path} contains a model with model.architecture_version "
            f"{config.model.architecture_version} (one transformer over stacked channels, from config "
            f"version 1), which this code cannot load: pretrain a new model"
        )
    model = AtmoRep(config.model)
    model.load_state_dict(checkpoint["model"])
    model.to(map_location)
    model.eval()
    return model, config


def capture_rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Return this process's random states as tensors and ints, which safe loading accepts.

    Covers torch's CPU and CUDA generators, `generator`, numpy's global generator and
    Python's `random`.
    """
    numpy_kind, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(numpy_kind),
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "position": int(numpy_position),
            "has_gauss": int(numpy_has_gauss),
            "gauss": float(numpy_gauss),
        },
        "python": {
            "version": int(python_version),
            "internal": torch.tensor(python_internal, dtype=torch.int64),
            "gauss": python_gauss,
        },
    }


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore the states saved by `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["gauss"],
    ))
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(int(value) for value in python_state["internal"]), python_state["gauss"])
    )
