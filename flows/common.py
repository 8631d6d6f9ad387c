"""Wiring shared by the stage flows: one MLflow run per flow run, linked both ways."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.runtime import flow_run

from data_catalog import Catalog
from data_catalog.schema import CatalogEntry
from tasks.tracking import (
    TAG_DATASET,
    TAG_DATASET_VERSION,
    TAG_GIT_COMMIT,
    StageRun,
    client,
    end_stage_run,
    get_run_tags,
    log_dataset_input,
    log_params,
    start_stage_run,
)

MLFLOW_UI_URL = os.environ.get("ATMOREP_MLFLOW_UI_URL", "http://127.0.0.1:5000")

# Errors that a bad input raises: retrying cannot help, so they fail the task at once.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, LookupError)


def retry_on_transient_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry network and I/O errors, never errors caused by the input."""
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except (OSError, TimeoutError):
        return True
    except Exception as error:  # noqa: BLE001 - MLflow reports an unreachable server as MlflowException
        return type(error).__name__ == "MlflowException" and "Connection" in str(error)
    return False


# Retry policies per task type, as keyword arguments of `prefect.task`:
# - network: downloads and MLflow uploads, three retries after 5, 10 and 20 s (plus jitter);
# - data: ingestion writes, one retry after 10 s, which resumes from the journal of written regions;
# - training is not retried by Prefect: torchrun restarts its workers (`max_restarts`), and
#   running the flow again resumes from the last checkpoint.
NETWORK_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": [5, 10, 20],
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_transient_error,
}
DATA_RETRIES = {"retries": 1, "retry_delay_seconds": 10, "retry_condition_fn": retry_on_transient_error}


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
    The run logs `params` verbatim, ends FAILED if the block raises an error and KILLED if
    it is cancelled or interrupted. The flow run gets a link artifact to the run and, when
    the block succeeds, a table artifact with its results.
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
    except Exception:
        end_stage_run(run.run_id, status="FAILED")
        raise
    except BaseException:
        # Cancellation (Prefect's TerminationSignal), Ctrl-C or exit: the run was stopped, not broken.
        end_stage_run(run.run_id, status="KILLED")
        raise
    end_stage_run(run.run_id)
    create_summary_artifact(stage, run)


def create_summary_artifact(stage: str, run: StageRun) -> None:
    """Publish the run's tracked results as the flow run's table artifact `<stage>-summary`.

    The table has the MLflow run id, the dataset and version, the git commit, and the
    latest value of every metric.
    """
    tags = get_run_tags(run.run_id)
    rows = [
        {"name": "mlflow run", "value": run.run_id},
        {"name": "dataset", "value": tags.get(TAG_DATASET, "")},
        {"name": "dataset version", "value": tags.get(TAG_DATASET_VERSION, "")},
        {"name": "git commit", "value": tags.get(TAG_GIT_COMMIT, "")},
    ]
    metrics = client().get_run(run.run_id).data.metrics
    rows += [{"name": name, "value": f"{value:.6g}"} for name, value in sorted(metrics.items())]
    create_table_artifact(rows, key=f"{stage.replace('_', '-')}-summary", description=f"Results of the {stage} stage")
