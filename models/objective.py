"""Training objectives: what the training loop builds, reads and minimises.

`models.train` uses only the `Objective` protocol below, so a new model family (another
network, another dataset or loss) plugs into the same distributed loop, checkpointing
and resume logic by implementing it and registering it in `objective_for`.

Contract for exact resume: everything random in `loss` comes from the `generator` it is
given (or from torch's global generator), and everything random in a dataset item depends
only on (config seed, epoch, index), because the loop restores the former from the
checkpoint and replays the latter through `set_epoch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import xarray as xr
from torch import Tensor, nn
from torch.utils.data import Dataset

from models.atmorep import AtmoRep
from models.config import RunConfig
from models.data import FieldDataset
from models.finetune import apply_freeze
from models.losses import ensemble_loss, ensemble_mean_and_spread, masked_mse, masked_token_mean
from models.mae import MAEObjective, MAERunConfig
from models.mae_classifier import ClassifierObjective, ClassifierRunConfig
from models.masking import sample_mask


@runtime_checkable
class EpochDataset(Protocol):
    """A map-style dataset whose random augmentations are selected per epoch."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def set_epoch(self, epoch: int) -> None: ...


class Objective(Protocol):
    """One model family's network, training data and loss."""

    config: RunConfig

    def build_model(self) -> nn.Module:
        """Build a freshly initialised model on the CPU, seeded by the caller."""
        ...

    def open_dataset(self, dataset_path: str | Path | None) -> Dataset:
        """Open the training samples: the Zarr at `dataset_path`, else the catalog entry `train.dataset`."""
        ...

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Return the scalar training loss of one batch and extra metrics to log.

        `batch` is a DataLoader batch already moved to the model's device, and `model` may
        be wrapped in DistributedDataParallel or torch.compile.
        """
        ...

    def checkpoint_modules(self, model: nn.Module) -> Sequence[nn.Module]:
        """Return the submodules (transformer blocks) whose activations may be recomputed in backward."""
        ...

    def tokens_per_sample(self) -> int:
        """Return the number of tokens the model processes per sample, for throughput figures."""
        ...


def open_zarr_or_catalog(config: RunConfig, dataset_path: str | Path | None) -> tuple[xr.Dataset, str]:
    """Open the Zarr at `dataset_path`, else the catalog entry `train.dataset`; return it with its source name."""
    if dataset_path is not None:
        return xr.open_zarr(dataset_path, consolidated=False), str(dataset_path)

    from data_catalog.catalog import Catalog

    return Catalog().open_dataset(config.train.dataset), config.train.dataset


def train_period(ds: xr.Dataset, source: str) -> tuple[str, str]:
    """Return the dataset's `train_period` attribute, raising ValueError when it is missing or malformed."""
    period = ds.attrs.get("train_period")
    if not period or len(period) != 2:
        raise ValueError(
            f"dataset {source} has no valid train_period attribute (got {period!r}): "
            "re-ingest it so that its attrs contain [start, end]"
        )
    return tuple(period)


class AtmoRepObjective:
    """Masked-token reconstruction of multi-field ERA5 windows with the AtmoRep-style model."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def build_model(self) -> AtmoRep:
        """Build the model, with the parameters that fine-tuning freezes set to `requires_grad=False`."""
        model = AtmoRep(self.config.model)
        apply_freeze(model, self.config)
        return model

    def open_dataset(self, dataset_path: str | Path | None) -> FieldDataset:
        ds, source = open_zarr_or_catalog(self.config, dataset_path)
        return FieldDataset(
            ds,
            self.config.model,
            period=train_period(ds, source),
            time_stride=self.config.train.time_stride,
            random_crop=True,
            spatial_stride=self.config.train.spatial_stride,
            seed=self.config.train.seed,
        )

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Mask one batch, predict it and return the mean over fields of `model.loss`.

        batch: (fields: name -> [B, L, T, H, W], time_features [B, T, 5]), see
        `models.data.FieldDataset`. The metrics are `mse` (ensemble mean, averaged over
        fields), and per field `loss/<name>`, `mse/<name>` and, with an ensemble,
        `spread/<name>` (mean ensemble std over the masked tokens), all in normalised units.
        """
        fields, features = batch
        model_config = self.config.model
        token_shapes = {field.name: field.token_shape for field in model_config.fields}
        masked = sample_mask(self.config.masking, fields, token_shapes, generator)
        members = model(masked.inputs, masked.masks, features)

        losses = []
        metrics: dict[str, float] = {}
        for name, target in fields.items():
            mask, token_shape = masked.masks[name], token_shapes[name]
            field_loss = ensemble_loss(model_config.loss, members[name], target, mask, token_shape)
            losses.append(field_loss)
            with torch.no_grad():
                mean, spread = ensemble_mean_and_spread(members[name].float())
                metrics[f"loss/{name}"] = float(field_loss)
                metrics[f"mse/{name}"] = float(masked_mse(mean, target, mask, token_shape))
                if model_config.ensemble_size > 1:
                    metrics[f"spread/{name}"] = float(masked_token_mean(spread, mask, token_shape))
        metrics["mse"] = sum(metrics[f"mse/{name}"] for name in fields) / len(fields)
        return torch.stack(losses).mean(), metrics

    def checkpoint_modules(self, model: nn.Module) -> Sequence[nn.Module]:
        return [block for network in model.fields.values() for block in (*network.encoder, *network.decoder)]

    def tokens_per_sample(self) -> int:
        return sum(
            field.num_levels * field.num_tokens[0] * field.num_tokens[1] * field.num_tokens[2]
            for field in self.config.model.fields
        )


def objective_for(config: Any) -> Objective:
    """Return the objective that trains `config`'s model family (see `models.config.validate_run_config`)."""
    if isinstance(config, MAERunConfig):
        return MAEObjective(config)
    if isinstance(config, ClassifierRunConfig):
        return ClassifierObjective(config)
    if isinstance(config, RunConfig):
        return AtmoRepObjective(config)
    raise TypeError(f"no training objective for a config of type {type(config).__name__}")
