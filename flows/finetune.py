"""`finetune/atmorep`: fine-tune a pretrained model for one task, register it and evaluate it.

The tasks and the freezing modes are described in `models.finetune`.
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr
from prefect import flow, get_run_logger
from pydantic import ValidationError

from data_catalog import Catalog
from flows.common import stage_run
from flows.evaluate import evaluate_and_report, fetch_checkpoint
from flows.params import FinetuneParams
from flows.pretrain import train_and_register, training_overrides
from models.checkpoint import load_model
from models.config import FieldConfig, RunConfig
from models.finetune import (
    finetune_model_config,
    frozen_parameter_names,
    new_parameter_names,
    state_shapes,
    summarise_names,
)
from tasks.evaluate import DEFAULT_DOWNSCALING_FACTORS, check_evaluation_inputs
from tasks.registry import resolve_model
from tasks.tracking import TAG_INIT_RUN, client, log_json_artifact, log_params

# Masking used during fine-tuning: only the target task, so every step trains for it. A new
# field keeps the pretraining mix, because it learns everything the pretrained fields did.
TASK_MASKING = {
    "forecast": {"bert": 0.0, "forecast": 1.0, "interpolation": 0.0, "downscaling": 0.0, "causal": 0.0},
    "downscaling": {"bert": 0.0, "forecast": 0.0, "interpolation": 0.0, "downscaling": 1.0, "causal": 0.0},
}


def new_field_config(pretrained: RunConfig, params: FinetuneParams) -> FieldConfig:
    """Return the field that task new-field appends: the first pretrained field's token grid,
    cross-attending to every pretrained field."""
    if params.new_field in pretrained.model.field_names:
        raise ValueError(
            f"new_field {params.new_field!r} is already in the pretrained model's fields "
            f"{pretrained.model.field_names}: choose a variable the model does not have"
        )
    template = pretrained.model.fields[0]
    return FieldConfig(
        name=params.new_field,
        levels=params.new_field_levels,
        token_shape=template.token_shape,
        num_tokens=template.num_tokens,
        neighbours=pretrained.model.field_names,
    )


def finetune_config(pretrained: RunConfig, params: FinetuneParams) -> RunConfig:
    """Return the fine-tuning run config: the task's architecture and masking, freezing and schedule.

    Unless given, fine-tuning runs a third of the pretraining steps at half its learning
    rate, with the warm-up shortened to match.
    """
    if not isinstance(pretrained, RunConfig):
        raise ValueError(
            f"model {params.model_uri} is not an AtmoRep model ({type(pretrained).__name__}): "
            "finetune/atmorep fine-tunes AtmoRep models only"
        )
    factor = params.downscaling_factor or pretrained.masking.coarsen_factor
    try:
        model = finetune_model_config(
            pretrained.model,
            params.task,
            extra_time_tokens=params.extra_time_tokens,
            downscaling_factor=factor,
            new_field=new_field_config(pretrained, params) if params.task == "new-field" else None,
        )
    except ValidationError as error:
        problems = "; ".join(detail["msg"] for detail in error.errors())
        raise ValueError(
            f"task {params.task} cannot be built on model {params.model_uri}: {problems}"
        ) from error

    tree = pretrained.model_dump(mode="json")
    tree["model"] = model.model_dump(mode="json")
    tree["finetune"] = {
        "task": params.task,
        "freeze": params.freeze,
        "base_model": pretrained.model.model_dump(mode="json"),
    }
    if params.task in TASK_MASKING:
        tree["masking"]["weights"] = TASK_MASKING[params.task]
    if params.task == "forecast":
        tree["masking"]["forecast_tokens"] += params.extra_time_tokens
    if params.task == "downscaling":
        tree["masking"]["coarsen_factor"] = factor

    tree["train"]["max_steps"] = max(1, pretrained.train.max_steps // 3)
    tree["train"]["lr"] = pretrained.train.lr / 2
    tree["train"]["warmup_steps"] = min(pretrained.train.warmup_steps, tree["train"]["max_steps"] // 10)
    for dotted_key, value in training_overrides(params).items():
        section, key = dotted_key.split(".")
        tree[section][key] = value
    return RunConfig.model_validate(tree)


def check_new_field_data(ds: xr.Dataset, params: FinetuneParams, dataset_name: str) -> None:
    """Raise ValueError unless the dataset has the new field's variable at its levels."""
    if params.new_field not in ds.data_vars:
        raise ValueError(
            f"new_field {params.new_field!r} is not a variable of dataset {dataset_name} "
            f"(variables: {sorted(map(str, ds.data_vars))}): choose one of them or ingest it first"
        )
    variable = ds[params.new_field]
    if params.new_field_levels and "level" not in variable.dims:
        raise ValueError(
            f"new_field {params.new_field!r} of dataset {dataset_name} has no levels: leave out new_field_levels"
        )
    if params.new_field_levels:
        missing = sorted(set(params.new_field_levels) - {int(level) for level in variable["level"].values})
        if missing:
            raise ValueError(
                f"new_field_levels {missing} of {params.new_field!r} are not in dataset {dataset_name} "
                f"(levels: {[int(level) for level in variable['level'].values]})"
            )


def log_parameter_changes(run_id: str, config: RunConfig) -> dict[str, list[str]]:
    """Log the newly initialised and the frozen parameters to the run, as params and as JSON.

    The params `finetune.new_parameters` and `finetune.frozen_parameters` list the
    shortest module prefixes that cover them (see `models.finetune.summarise_names`); the
    artifact `finetune_parameters.json` lists every name.
    """
    names = list(state_shapes(config.model))
    new = new_parameter_names(config.finetune.base_model, config.model)
    frozen = frozen_parameter_names(config.finetune, config.model)
    changes = {
        "new": new,
        "frozen": frozen,
        "new_summary": summarise_names(new, names),
        "frozen_summary": summarise_names(frozen, names),
    }
    log_params(
        run_id,
        {
            "new_parameters": changes["new_summary"],
            "frozen_parameters": changes["frozen_summary"],
            "trainable_tensors": len(names) - len(frozen),
            "frozen_tensors": len(frozen),
        },
        prefix="finetune",
    )
    log_json_artifact(run_id, changes, "finetune_parameters.json")
    return changes


@flow(name="finetune", flow_run_name="atmorep-{params.task}")
def finetune(params: FinetuneParams = FinetuneParams()) -> dict:
    """Fine-tune for one task, register the model and evaluate it on the zero-shot tasks."""
    logger = get_run_logger()
    resolved = resolve_model(params.model_uri)
    checkpoint = fetch_checkpoint(resolved.run_id)
    _, pretrained = load_model(checkpoint)
    config = finetune_config(pretrained, params)

    catalog = Catalog()
    entry = catalog.get(config.train.dataset)
    dataset = catalog.open_dataset(entry.name)
    if params.task == "new-field":
        check_new_field_data(dataset, params, entry.name)
    factors = DEFAULT_DOWNSCALING_FACTORS
    if params.task == "downscaling":
        factors = tuple(sorted({*factors, config.model.downscaling_head}))
    # The evaluation after training must fit too, for example a longer forecast window in a short test period.
    check_evaluation_inputs(config, dataset, downscaling_factors=factors, window_stride=params.window_stride)

    upstream = params.upstream_run_id or resolved.run_id
    with stage_run("finetune", params, upstream_run_id=upstream, entry=entry) as run:
        client().set_tag(run.run_id, TAG_INIT_RUN, resolved.run_id)
        changes = log_parameter_changes(run.run_id, config)
        logger.info(
            "fine-tuning for %s with freeze %s: newly initialised %s, frozen %s",
            params.task, params.freeze, changes["new_summary"] or "none", changes["frozen_summary"] or "none",
        )
        trained = train_and_register(
            "finetune", config, params, run.run_id, params.registered_name, init_checkpoint=checkpoint
        )

        model, config = load_model(Path(trained["checkpoint"]))
        scores = evaluate_and_report(
            run.run_id,
            model,
            config,
            dataset,
            params.window_stride,
            batch_size=8,
            title=f"Fine-tuned {params.task} evaluation",
            downscaling_factors=factors,
        )
    return {**trained, **scores, "new_parameters": changes["new"], "frozen_parameters": changes["frozen"]}
