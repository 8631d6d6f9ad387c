"""MLflow bookkeeping shared by every stage: stores, stage runs, lineage tags, models.

Every stage of the pipeline writes one MLflow run. Runs are created through
`MlflowClient` with explicit run ids rather than the fluent active-run stack, so that
nested Prefect flows and the torchrun subprocess can all write to the run they were
given. The lineage of a run is stored as tags (see `LINEAGE_TAGS`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, RunStatus

from data_catalog import atmorep_home
from data_catalog.workspace import package_versions as installed_versions

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "atmorep"
REPO_ROOT = Path(__file__).resolve().parents[1]

TAG_STAGE = "atmorep.stage"
TAG_UPSTREAM = "atmorep.upstream_run_id"
TAG_DATASET = "atmorep.dataset"
TAG_DATASET_DIGEST = "atmorep.dataset_digest"
TAG_DATASET_VERSION = "atmorep.dataset_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "atmorep.git_dirty"
TAG_PREFECT_FLOW_RUN = "atmorep.prefect_flow_run_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_INIT_RUN = "atmorep.init_run_id"
LINEAGE_TAGS = (TAG_STAGE, TAG_UPSTREAM, TAG_DATASET, TAG_DATASET_DIGEST, TAG_DATASET_VERSION, TAG_GIT_COMMIT)

TRACKED_PACKAGES = (
    "atmorep-pipeline", "torch", "mlflow", "prefect", "xarray", "zarr", "dask",
    "cfgrib", "eccodes", "numpy",
)


def tracking_uri() -> str:
    """Return the MLflow tracking URI: `MLFLOW_TRACKING_URI`, else sqlite under ATMOREP_HOME."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    return f"sqlite:///{atmorep_home() / 'mlflow.db'}"


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def client() -> MlflowClient:
    """Point the fluent API and a new client at `tracking_uri()`."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Return the id of experiment `name`, creating it if missing.

    With a local store the artifacts go to `$ATMOREP_HOME/mlartifacts`. A tracking server
    chooses its own artifact location.
    """
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id

    artifact_location = None
    if _is_local_store(tracking_uri()):
        artifact_location = (atmorep_home() / "mlartifacts").as_uri()
    return mlflow_client.create_experiment(name, artifact_location=artifact_location)


def code_version() -> tuple[str | None, bool | None]:
    """Return the git commit of the checkout this code runs from and whether it is dirty.

    Returns `(None, None)` outside a git checkout, for example in an installed wheel.
    """
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, dirty


def package_versions() -> dict[str, str]:
    """Return the installed version of each package that decides a result."""
    return installed_versions(TRACKED_PACKAGES)


@dataclass(frozen=True)
class StageRun:
    """An MLflow run that records one pipeline stage."""

    run_id: str
    experiment_id: str
    stage: str


def start_stage_run(
    stage: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    upstream_run_id: str | None = None,
    dataset: str | None = None,
    dataset_digest: str | None = None,
    dataset_version: int | None = None,
    prefect_flow_run_id: str | None = None,
    params: dict[str, Any] | None = None,
) -> StageRun:
    """Create the MLflow run of one stage with its lineage tags, parameters and versions.

    `dataset_digest` is the content digest of the catalog entry, and `dataset_version`
    its version. The run stays open (status RUNNING) until `end_stage_run`.
    """
    experiment_id = ensure_experiment(experiment)
    commit, dirty = code_version()
    tags = {
        TAG_STAGE: stage,
        TAG_UPSTREAM: upstream_run_id,
        TAG_DATASET: dataset,
        TAG_DATASET_DIGEST: dataset_digest,
        TAG_DATASET_VERSION: None if dataset_version is None else str(dataset_version),
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: None if dirty is None else str(dirty).lower(),
        TAG_PREFECT_FLOW_RUN: prefect_flow_run_id,
        TAG_PARENT: parent_run_id,
    }
    tags.update({f"atmorep.version.{name}": version for name, version in package_versions().items()})
    tags = {key: value for key, value in tags.items() if value is not None}

    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=stage)
    if params:
        log_params(run.info.run_id, params)
    logger.info("MLflow run %s started for stage %s", run.info.run_id, stage)
    return StageRun(run_id=run.info.run_id, experiment_id=experiment_id, stage=stage)


def end_stage_run(run_id: str, failed: bool = False) -> None:
    """Mark the run FINISHED, or FAILED when `failed`."""
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    client().set_terminated(run_id, status=status)


def log_params(run_id: str, params: dict[str, Any], prefix: str = "") -> None:
    """Log a nested mapping as flat MLflow params (`a.b.c`) and the whole as `config.json`."""
    flat: dict[str, str] = {}

    def flatten(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for child_key, child in value.items():
                flatten(child, f"{key}.{child_key}" if key else str(child_key))
        else:
            flat[key] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

    flatten(params, prefix)
    mlflow_client = client()
    for key, value in flat.items():
        mlflow_client.log_param(run_id, key, value[:6000])
    log_json_artifact(run_id, params, f"{prefix or 'config'}.json")


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log a mapping of metric name to value at one step."""
    mlflow_client = client()
    for name, value in metrics.items():
        mlflow_client.log_metric(run_id, name, float(value), step=step)


def log_json_artifact(run_id: str, payload: Any, file_name: str, artifact_path: str | None = None) -> None:
    """Write `payload` as JSON and log it as an artifact of the run."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / file_name
        path.write_text(json.dumps(payload, indent=2, default=str))
        client().log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_dataset_input(run_id: str, name: str, zarr_path: Path, digest: str, context: str) -> None:
    """Record the dataset a run read, by name, location and content digest (`mlflow.log_input`).

    `digest` is the catalog entry's content digest. MLflow has no Zarr dataset type, so
    the dataset is a metadata-only `MetaDataset`. Its digest field accepts at most 36
    characters (`MAX_DATASET_DIGEST_SIZE` in MLflow 3.17), so it gets the first 36 hex
    digits, and the full digest is in the run's `atmorep.dataset_digest` tag.
    """
    with warnings.catch_warnings():
        # Two registered local sources both accept a path; MLflow picks the local one.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(zarr_path))
    dataset = MetaDataset(source=source, name=name, digest=digest[:36])
    dataset_input = DatasetInput(
        dataset=dataset._to_mlflow_entity(),
        tags=[InputTag(key="mlflow.data.context", value=context)],
    )
    client().log_inputs(run_id, datasets=[dataset_input])


def get_run_tags(run_id: str) -> dict[str, str]:
    """Return the tags of a run."""
    return dict(client().get_run(run_id).data.tags)


def find_stage_run(stage: str, dataset_digest: str) -> str | None:
    """Return the id of the newest finished run of `stage` on the dataset with this content digest.

    It matches the full digest in the `atmorep.dataset_digest` tag that `start_stage_run` sets.
    """
    runs = client().search_runs(
        experiment_ids=[experiment.experiment_id for experiment in client().search_experiments()],
        filter_string=(
            f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_DATASET_DIGEST}` = '{dataset_digest}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None
