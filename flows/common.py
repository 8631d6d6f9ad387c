"""Wiring shared by the stage flows: one MLflow run per flow run, linked both ways."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from tasks.tracking import StageRun, end_stage_run, log_params, start_stage_run

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
    dataset: str | None = None,
    dataset_digest: str | None = None,
    dataset_version: int | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of a stage for the duration of its flow run.

    The run carries the Prefect flow-run id and the lineage tags, among them the
    dataset's name, content digest and version. It logs `params` verbatim and ends FAILED
    if the block raises. The flow run gets a link artifact to it.
    """
    logger = get_run_logger()
    run = start_stage_run(
        stage,
        experiment=params.experiment,
        parent_run_id=getattr(params, "parent_run_id", None),
        upstream_run_id=upstream_run_id,
        dataset=dataset,
        dataset_digest=dataset_digest,
        dataset_version=dataset_version,
        prefect_flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    log_params(run.run_id, params.model_dump(mode="json"), prefix="params")
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
