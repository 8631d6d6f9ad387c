"""`pretrain/atmorep`: masked-token pretraining with torchrun, tracked in MLflow."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from prefect import flow, get_run_logger, task

from data_catalog import Catalog, atmorep_home
from data_catalog.catalog import DatasetNotFoundError
from data_catalog.schema import DatasetEntry
from flows.common import NETWORK_RETRIES, stage_run
from flows.params import PretrainParams, TrainingParams
from models.config import RunConfig, load_preset
from tasks.registry import log_and_register_model
from models.tracking import BUFFER_NAME
from tasks.tracking import (
    TAG_CHECKPOINT_DIR,
    TAG_CONFIG_DIGEST,
    TAG_DATASET_DIGEST,
    TAG_INIT_RUN,
    TAG_PARENT,
    TAG_RESUMED,
    TAG_WEIGHTS_PARENT,
    CheckpointDirLock,
    CheckpointDirLocked,
    config_digest,
    find_resumable_runs,
    find_stage_run,
    get_run_tags,
    log_metrics,
    log_params,
    set_tags,
    sync_metrics_buffer,
    tracking_uri,
)
from tasks.training import Rendezvous, launch_training

train = task(launch_training, name="torchrun-train")
# Training is not retried by Prefect: torchrun restarts workers, and a new flow run resumes.
register = task(log_and_register_model, name="register-model", **NETWORK_RETRIES)


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
    """Train with torchrun, then log and register the model.

    Training goes into the run's own checkpoint folder, unless an earlier run of the same
    stage with the same config, dataset and initial weights stopped before the end: then
    this run continues that run's checkpoint, becomes its child run, and is tagged
    `atmorep.resumed`.
    """
    logger = get_run_logger()
    config_tree = config.model_dump(mode="json")
    log_params(run_id, config_tree, prefix="run_config")
    tags = get_run_tags(run_id)
    init_run_id = tags.get(TAG_INIT_RUN)
    digest = config_digest(config_tree, tags.get(TAG_DATASET_DIGEST), init_run_id)

    with ExitStack() as stack:
        output_dir, resumed_run_id = claim_checkpoint_dir(stage, digest, run_id, stack)
        lineage_tags = {TAG_CONFIG_DIGEST: digest, TAG_CHECKPOINT_DIR: str(output_dir)}
        if init_run_id:
            lineage_tags[TAG_WEIGHTS_PARENT] = init_run_id
        if resumed_run_id:
            logger.info("Resuming run %s from its checkpoint in %s", resumed_run_id, output_dir)
            lineage_tags.update({TAG_PARENT: resumed_run_id, TAG_RESUMED: "true", TAG_WEIGHTS_PARENT: resumed_run_id})
        set_tags(run_id, lineage_tags)

        done = train(
            config_tree,
            output_dir,
            nproc_per_node=params.nproc_per_node,
            mlflow_run_id=run_id,
            tracking_uri=tracking_uri(),
            init_checkpoint=init_checkpoint,
            run_logger=logger,
            rendezvous=rendezvous(params),
        )
        sync_metrics_buffer(run_id, output_dir / BUFFER_NAME)
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
        "resumed_run_id": resumed_run_id,
    }


def claim_checkpoint_dir(stage: str, digest: str, run_id: str, stack: ExitStack) -> tuple[Path, str | None]:
    """Lock the folder this run trains in and return it with the id of the run it resumes, if any.

    An unfinished run with the same config digest is resumed when no other process holds
    its folder's lock. Otherwise the run trains in `checkpoints/<run id>`, so concurrent
    runs never share a folder.
    """
    for candidate_run_id, folder in find_resumable_runs(stage, digest, exclude_run_id=run_id):
        try:
            stack.enter_context(CheckpointDirLock(folder))
        except CheckpointDirLocked:
            continue
        return folder, candidate_run_id

    output_dir = atmorep_home() / "checkpoints" / run_id
    stack.enter_context(CheckpointDirLock(output_dir))
    return output_dir, None


def check_dataset_fields(config: RunConfig, entry: DatasetEntry, preset: str) -> None:
    """Raise ValueError unless the catalog entry has every field variable of `config` at its levels.

    The check reads only the catalog entry, so a config that cannot train fails before
    any MLflow run or checkpoint folder exists.
    """
    where = f"dataset {entry.name!r} (preset {preset!r})"
    for field in config.model.fields:
        info = entry.variables.get(field.name)
        if info is None:
            raise ValueError(
                f"field variable {field.name!r} not found in {where}, which has {sorted(entry.variables)}: "
                "pass --dataset with a dataset that contains it, or use a preset whose fields it contains"
            )
        if field.levels is None:
            if info.has_levels:
                raise ValueError(
                    f"field {field.name!r} has levels {entry.levels} in {where}: list the levels to use "
                    f"in model.fields[{field.name}].levels"
                )
            continue
        if not info.has_levels:
            raise ValueError(
                f"field {field.name!r} lists levels {field.levels}, but {field.name!r} has no level "
                f"dimension in {where}: remove the levels"
            )
        missing = sorted(set(field.levels) - set(entry.levels or []))
        if missing:
            raise ValueError(
                f"levels {missing} of field {field.name!r} not found in {where}, which has levels {entry.levels}"
            )


def resolve_pretrain_config(params: PretrainParams, catalog: Catalog) -> tuple[RunConfig, DatasetEntry]:
    """Return the run config and its catalog entry: the preset's train.dataset unless params.dataset is given.

    Raises DatasetNotFoundError naming the preset for a dataset missing from the catalog,
    and ValueError (see `check_dataset_fields`) for a dataset without the config's fields.
    """
    overrides = training_overrides(params)
    if params.dataset is not None:
        overrides["train.dataset"] = params.dataset
    config = load_preset(params.preset, overrides)
    try:
        entry = catalog.get(config.train.dataset)
    except DatasetNotFoundError as error:
        raise DatasetNotFoundError(f"{error.args[0]} Requested by preset {params.preset!r}.") from None
    if not isinstance(entry, DatasetEntry):
        raise ValueError(
            f"dataset {entry.name!r} (preset {params.preset!r}) is an image dataset: pretrain atmorep needs an "
            "ERA5 dataset from `atmorep ingest era5`, and image datasets train with `atmorep pretrain mae`"
        )
    check_dataset_fields(config, entry, params.preset)
    return config, entry


@flow(name="pretrain", flow_run_name="atmorep-{params.preset}")
def pretrain(params: PretrainParams = PretrainParams()) -> dict:
    """Pretrain an AtmoRep-style model on a catalog dataset and register it.

    Returns the MLflow run id, the registered model URI and the final training loss.
    """
    config, entry = resolve_pretrain_config(params, Catalog())
    upstream = params.upstream_run_id or find_stage_run("ingest", entry.content_digest)

    with stage_run("pretrain", params, upstream_run_id=upstream, entry=entry) as run:
        return train_and_register("pretrain", config, params, run.run_id, params.register_as)
