"""`finetune/atmorep`: continue training a pretrained model for one task, then evaluate it."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from data_catalog import Catalog
from flows.common import stage_run
from flows.evaluate import evaluate_and_report, fetch_checkpoint
from flows.params import FinetuneParams
from flows.pretrain import train_and_register, training_overrides
from models.checkpoint import load_model
from models.config import RunConfig
from tasks.registry import resolve_model
from tasks.tracking import TAG_INIT_RUN, client

# Masking used during fine-tuning: only the target task, so every step trains for it.
TASK_MASKING = {
    "forecast": {"bert": 0.0, "forecast": 1.0, "interpolation": 0.0, "downscaling": 0.0, "causal": 0.0},
    "downscaling": {"bert": 0.0, "forecast": 0.0, "interpolation": 0.0, "downscaling": 1.0, "causal": 0.0},
}


def finetune_config(pretrained: RunConfig, params: FinetuneParams) -> RunConfig:
    """Return the pretraining config with the task's masking and fine-tuning defaults.

    Unless given, fine-tuning runs a third of the pretraining steps at half its learning
    rate, with the warm-up shortened to match.
    """
    tree = pretrained.model_dump(mode="json")
    tree["masking"]["weights"] = TASK_MASKING[params.task]
    tree["train"]["max_steps"] = max(1, pretrained.train.max_steps // 3)
    tree["train"]["lr"] = pretrained.train.lr / 2
    tree["train"]["warmup_steps"] = min(pretrained.train.warmup_steps, tree["train"]["max_steps"] // 10)
    for dotted_key, value in training_overrides(params).items():
        section, key = dotted_key.split(".")
        tree[section][key] = value
    return RunConfig.model_validate(tree)


@flow(name="finetune", flow_run_name="atmorep-{params.task}")
def finetune(params: FinetuneParams = FinetuneParams()) -> dict:
    """Fine-tune for forecasting or downscaling, register the model and evaluate it."""
    resolved = resolve_model(params.model_uri)
    checkpoint = fetch_checkpoint(resolved.run_id)
    _, pretrained = load_model(checkpoint)
    config = finetune_config(pretrained, params)

    catalog = Catalog()
    entry = catalog.get(config.train.dataset)

    upstream = params.upstream_run_id or resolved.run_id
    with stage_run("finetune", params, upstream_run_id=upstream, entry=entry) as run:
        client().set_tag(run.run_id, TAG_INIT_RUN, resolved.run_id)
        trained = train_and_register(
            "finetune", config, params, run.run_id, params.registered_name, init_checkpoint=checkpoint
        )

        model, config = load_model(Path(trained["checkpoint"]))
        scores = evaluate_and_report(
            run.run_id,
            model,
            config,
            catalog.open_dataset(entry.name),
            params.window_stride,
            batch_size=8,
            title=f"Fine-tuned {params.task} evaluation",
        )
    return {**trained, **scores}
