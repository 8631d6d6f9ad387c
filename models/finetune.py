"""Fine-tuning surgery on a pretrained AtmoRep model: new architecture, weight transfer, freezing.

Three tasks change the pretrained architecture (`base`) in one intended way each:

- `forecast`: every field gets `extra_time_tokens` more time tokens and the forecast
  covers them too, so the model predicts further ahead than pretraining did. The time
  position table of each field grows from nT to nT + extra rows: the pretrained rows are
  kept and each new row continues the difference of the last two rows linearly.
- `downscaling`: every field gets a `models.atmorep.DownscalingHead` for one coarsening
  factor. It starts at zero, so the fine-tuned model begins as the pretrained one.
- `new-field`: a field is appended after the pretrained ones with its own embeddings,
  encoder, decoder and ensemble tail, freshly initialised, and cross-attends to the
  pretrained fields in every encoder block. The pretrained fields keep their neighbours,
  so their predictions do not depend on the new field.

Freezing (`FinetuneConfig.freeze`) acts on pretrained parameters only, grouped by name in
`parameter_group`: `all` freezes every pretrained parameter, `encoders` the embeddings and
encoder blocks, `none` nothing. Newly initialised and extended parameters always train.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.atmorep import AtmoRep
from models.checkpoint import check_compatible
from models.config import FieldConfig, FinetuneConfig, ModelConfig, RunConfig

logger = logging.getLogger(__name__)

# Parameter name parts (after `fields.<name>.`) that belong to a field's embedding and
# encoder. Everything else (decoder blocks, norm, ensemble heads, downscaling head)
# belongs to the decoding side.
ENCODER_PARTS = frozenset({
    "token_embedding",
    "level_embedding",
    "time_position",
    "latitude_position",
    "longitude_position",
    "time_feature_embedding",
    "mask_embedding",
    "encoder",
})


def parameter_group(name: str) -> str:
    """Return `encoder` or `decoder` for a state_dict name such as `fields.u.encoder.0.mlp.0.weight`."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "fields":
        raise ValueError(f"parameter {name!r} is not part of a field network (fields.<name>.<module>...)")
    return "encoder" if parts[2] in ENCODER_PARTS else "decoder"


# Building the fine-tuning architecture


def finetune_model_config(
    base: ModelConfig,
    task: str,
    *,
    extra_time_tokens: int = 0,
    downscaling_factor: int | None = None,
    new_field: FieldConfig | None = None,
) -> ModelConfig:
    """Return the model config of fine-tuning `base` for `task` (see the module docstring).

    Raises ValueError when the task's setting is missing or does not fit `base`.
    """
    tree = base.model_dump(mode="json")
    if task == "forecast":
        if extra_time_tokens < 0:
            raise ValueError(f"extra_time_tokens must be at least 0, got {extra_time_tokens}")
        for field in tree["fields"]:
            field["num_tokens"][0] += extra_time_tokens
    elif task == "downscaling":
        if downscaling_factor is None:
            raise ValueError("task downscaling needs a downscaling factor")
        tree["downscaling_head"] = downscaling_factor
    elif task == "new-field":
        if new_field is None:
            raise ValueError("task new-field needs the new field's configuration")
        if new_field.name in base.field_names:
            raise ValueError(
                f"field {new_field.name!r} is already in the pretrained model's fields {base.field_names}: "
                "choose a variable the model does not have"
            )
        tree["fields"].append(new_field.model_dump(mode="json"))
    else:
        raise ValueError(f"unknown fine-tuning task {task!r}: use forecast, downscaling or new-field")
    return ModelConfig.model_validate(tree)


def check_intended_changes(base: ModelConfig, model: ModelConfig, task: str, source: str | Path) -> None:
    """Raise ValueError unless `model` differs from `base` only in the way `task` intends.

    The model is reduced to what the pretrained part must look like, then compared with
    `models.checkpoint.check_compatible`, whose message names every differing setting.
    """
    tree = model.model_dump(mode="json")
    base_tree = base.model_dump(mode="json")
    if task == "forecast":
        if model.time_tokens < base.time_tokens:
            raise ValueError(
                f"forecast fine-tuning of {source} has {model.time_tokens} time tokens, fewer than the "
                f"pretrained {base.time_tokens}: a longer lead needs as many time tokens or more"
            )
        for field in tree["fields"]:
            field["num_tokens"][0] = base.time_tokens
    elif task == "downscaling":
        if model.downscaling_head is None:
            raise ValueError(f"downscaling fine-tuning of {source} needs model.downscaling_head to be set")
        tree["downscaling_head"] = base_tree["downscaling_head"]
    elif task == "new-field":
        added = model.field_names[len(base.fields):]
        if not added:
            raise ValueError(f"new-field fine-tuning of {source} adds no field to {base.field_names}")
        tree["fields"] = tree["fields"][: len(base.fields)]
    check_compatible(base, ModelConfig.model_validate(tree), source)


# Parameters: which are new, which train


def state_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Return the state_dict shapes of the model `config` describes, built on the meta device."""
    with torch.device("meta"):
        model = AtmoRep(config)
    return {name: value.shape for name, value in model.state_dict().items()}


def new_parameter_names(base: ModelConfig, model: ModelConfig) -> list[str]:
    """Return the parameters of `model` that `base` lacks or that have another shape there.

    These are initialised fresh (or extended, for time positions) and always train.
    """
    base_shapes = state_shapes(base)
    return [name for name, shape in state_shapes(model).items() if base_shapes.get(name) != shape]


def frozen_parameter_names(finetune: FinetuneConfig, model: ModelConfig) -> list[str]:
    """Return the parameters of `model` that fine-tuning with `finetune` keeps fixed."""
    if finetune.freeze == "none":
        return []
    new = set(new_parameter_names(finetune.base_model, model))
    pretrained = [name for name in state_shapes(model) if name not in new]
    if finetune.freeze == "all":
        return pretrained
    return [name for name in pretrained if parameter_group(name) == "encoder"]


def apply_freeze(model: nn.Module, config: RunConfig) -> list[str]:
    """Set `requires_grad = False` on the parameters `config.finetune` freezes; return their names.

    Raises ValueError when nothing would be left to train.
    """
    if config.finetune is None:
        return []
    frozen = set(frozen_parameter_names(config.finetune, config.model))
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
        trainable += name not in frozen
    if trainable == 0:
        raise ValueError(
            f"freeze {config.finetune.freeze!r} leaves no parameter to train for task {config.finetune.task!r}: "
            "choose freeze encoders or none, or a task that adds parameters"
        )
    logger.info(
        "fine-tuning %s with freeze %s: %d of %d parameter tensors frozen",
        config.finetune.task, config.finetune.freeze, len(frozen), trainable + len(frozen),
    )
    return sorted(frozen)


def summarise_names(names: Iterable[str], all_names: Iterable[str]) -> list[str]:
    """Shorten parameter names to the shortest module prefixes that contain only listed names.

    For example every parameter of a new field q becomes `fields.q`.
    """
    listed = set(names)
    everything = list(all_names)
    summary: list[str] = []
    for name in everything:
        if name not in listed:
            continue
        parts = name.split(".")
        for length in range(1, len(parts) + 1):
            prefix = ".".join(parts[:length])
            under = [other for other in everything if other == prefix or other.startswith(prefix + ".")]
            if all(other in listed for other in under):
                break
        if prefix not in summary:
            summary.append(prefix)
    return summary


# Loading the pretrained weights


def extend_time_positions(table: Tensor, rows: int) -> Tensor:
    """Extend a time position table [nT, D] to [rows, D].

    The pretrained rows are kept, and row nT - 1 + k is row nT - 1 plus k times the
    difference of the last two rows (a linear continuation). With a single row, new rows
    repeat it.
    """
    n_time = table.shape[0]
    if rows < n_time:
        raise ValueError(f"cannot shrink a time position table of {n_time} rows to {rows}")
    step = table[-1] - table[-2] if n_time > 1 else torch.zeros_like(table[-1])
    offsets = torch.arange(1, rows - n_time + 1, dtype=table.dtype, device=table.device)[:, None]
    return torch.cat([table, table[-1] + offsets * step], dim=0)


def initialise_from_pretrained(
    model: nn.Module, checkpoint: Mapping[str, Any], config: RunConfig, source: str | Path
) -> list[str]:
    """Load a pretrained checkpoint into the fine-tuning `model`; return the newly initialised names.

    The checkpoint's model must equal `config.finetune.base_model` and `config.model` may
    differ from it only as the task intends. Otherwise ValueError names the setting.
    Parameters present in both with the same shape are copied, time position tables are
    extended, and the rest keep `model`'s fresh initialisation.
    """
    finetune = config.finetune
    saved = ModelConfig.model_validate(checkpoint["config"]["model"])
    check_compatible(saved, finetune.base_model, source)
    check_intended_changes(finetune.base_model, config.model, finetune.task, source)

    pretrained = checkpoint["model"]
    state = model.state_dict()
    new, extended = [], []
    for name, value in state.items():
        if name not in pretrained:
            new.append(name)
        elif pretrained[name].shape == value.shape:
            state[name] = pretrained[name]
        elif name.endswith(".time_position"):
            state[name] = extend_time_positions(pretrained[name], value.shape[0])
            extended.append(name)
        else:
            raise ValueError(
                f"parameter {name} of checkpoint {source} has shape {tuple(pretrained[name].shape)}, "
                f"the fine-tuning model needs {tuple(value.shape)}: fine-tune from the checkpoint's own model"
            )
    unused = sorted(set(pretrained) - set(state))
    if unused:
        raise ValueError(
            f"checkpoint {source} has {len(unused)} parameters that the fine-tuning model lacks, such as "
            f"{unused[:5]}: fine-tune from the checkpoint's own model"
        )
    model.load_state_dict(state)

    logger.info(
        "initialised %s from %s (step %s): %d tensors copied, time positions extended for %s, "
        "newly initialised: %s",
        finetune.task, source, checkpoint.get("step"), len(state) - len(new) - len(extended),
        extended or "none", summarise_names(new, state) or "none",
    )
    return new + extended
