"""`pretrain/atmorep`: masked-token pretraining with torchrun, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from data_catalog import Catalog, atmorep_home
from flows.common import stage_run
from flows.params import PretrainParams, TrainingParams
from models.config import RunConfig, load_preset
from tasks.registry import log_and_register_model
from tasks.tracking import find_stage_run, log_metrics, log_params, tracking_uri
from tasks.training import Rendezvous, launch_training

train = task(launch_training, name="torchrun-train")
register = task(log_and_register_model, name="register-model", retries=2, retry_delay_seconds=5)


def training_overrides(params: TrainingParams) -> dict:
    """Return the dotted config overrides for the training settings a user gave."""
    overrides = {
        "train.max_steps": params.max_steps,
        "train.batch_size": params.batch_size,
        "train.lr": params.learning_rate,
        "train.seed": params.seed,
    }
    return {key: value for key, value in overrides.items() if value is not None}


def rendezvous(params: TrainingParams) -> Rendezvous:
    """Return the torchrun rendezvous settings given in the flow parameters."""
    return Rendezvous(
        nnodes=params.nnodes,
        node_rank=params.node_rank,
        backend=params.rdzv_backend,
        endpoint=params.rdzv_endpoint,
        run_id=params.rdzv_id,
        max_restarts=params.max_restarts,
    )


def train_and_register(
    stage: str,
    config: RunConfig,
    params: TrainingParams,
    run_id: str,
    registered_name: str,
    init_checkpoint: Path | None = None,
) -> dict:
    """Train with torchrun into the run's checkpoint folder, then log and register the model."""
    logger = get_run_logger()
    log_params(run_id, config.model_dump(mode="json"), prefix="run_config")

    output_dir = atmorep_home() / "checkpoints" / run_id
    done = train(
        config.model_dump(mode="json"),
        output_dir,
        nproc_per_node=params.nproc_per_node,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri(),
        init_checkpoint=init_checkpoint,
        run_logger=logger,
        rendezvous=rendezvous(params),
    )
    log_metrics(run_id, {f"{stage}/final_loss": done["loss"], f"{stage}/steps": done["step"]})

    version = register(run_id, output_dir / "checkpoint.pt", registered_name)
    model_uri = f"models:/{registered_name}/{version}"
    logger.info("%s finished after %d steps, loss %.4f: %s", stage, done["step"], done["loss"], model_uri)
    return {
        "run_id": run_id,
        "model_uri": model_uri,
        "checkpoint": str(output_dir / "checkpoint.pt"),
        "final_loss": done["loss"],
        "steps": done["step"],
    }


@flow(name="pretrain", flow_run_name="atmorep-{params.dataset}")
def pretrain(params: PretrainParams = PretrainParams()) -> dict:
    """Pretrain an AtmoRep-style model on a catalog dataset and register it.

    Returns the MLflow run id, the registered model URI and the final training loss.
    """
    entry = Catalog().get(params.dataset)
    config = load_preset(params.preset, {"train.dataset": params.dataset, **training_overrides(params)})
    upstream = params.upstream_run_id or find_stage_run("ingest", entry.content_digest)

    with stage_run("pretrain", params, upstream_run_id=upstream, entry=entry) as run:
        return train_and_register("pretrain", config, params, run.run_id, params.register_as)
