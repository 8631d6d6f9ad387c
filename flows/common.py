"""Wiring shared by the stage flows: one MLflow run per flow run, linked both ways."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from data_catalog import Catalog
from data_catalog.schema import CatalogEntry
from tasks.tracking import StageRun, end_stage_run, log_dataset_input, log_params, start_stage_run

MLFLOW_UI_URL = os.environ.get("ATMOREP_MLFLOW_UI_URL", "http://127.0.0.1:5000")


def mlflow_run_url(stage_run: StageRun) -> str:
    """Return the address of a run in the MLflow UI started by `make ui`."""
    return f"{MLFLOW_UI_URL}/#/experiments/{stage_run.experiment_id}/runs/{stage_run.run_id}"


@contextmanager
def stage_run(
    stage: str,
    params,
    *,
    upstream_run_id: str | None = None,
    entry: CatalogEntry | None = None,
    dataset_context: str = "training",
) -> Iterator[StageRun]:
    """Open the MLflow run of a stage for the duration of its flow run.

    The run carries the Prefect flow-run id and the lineage tags. With a catalog `entry`,
    the tags include the dataset's name, content digest and version, and the dataset is
    logged as the run's input with `dataset_context` (ingest, training or evaluation).
    The run logs `params` verbatim and ends FAILED if the block raises. The flow run gets
    a link artifact to it.
    """
    logger = get_run_logger()
    run = start_stage_run(
        stage,
        experiment=params.experiment,
        parent_run_id=getattr(params, "parent_run_id", None),
        upstream_run_id=upstream_run_id,
        dataset=entry.name if entry else None,
        dataset_digest=entry.content_digest if entry else None,
        dataset_version=entry.version if entry else None,
        prefect_flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    log_params(run.run_id, params.model_dump(mode="json"), prefix="params")
    if entry is not None:
        zarr_path = Catalog().resolve_zarr_path(entry)
        log_dataset_input(run.run_id, entry.name, zarr_path, entry.content_digest, context=dataset_context)
    create_link_artifact(
        mlflow_run_url(run),
        link_text=f"MLflow run {run.run_id}",
        key=f"mlflow-{stage.replace('_', '-')}",
        description=f"MLflow run of the {stage} stage",
    )
    logger.info("MLflow run %s (%s)", run.run_id, mlflow_run_url(run))

    try:
        yield run
    except BaseException:
        end_stage_run(run.run_id, failed=True)
        raise
    end_stage_run(run.run_id)
