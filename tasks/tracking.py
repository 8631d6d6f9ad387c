"""MLflow bookkeeping shared by every stage: stores, stage runs, lineage tags, models.

Every stage of the pipeline writes one MLflow run. Runs are created through
`MlflowClient` with explicit run ids rather than the fluent active-run stack, so that
nested Prefect flows and the torchrun subprocess can all write to the run they were
given. The lineage of a run is stored as tags (see `LINEAGE_TAGS`).
"""

from __future__ import annotations

import fcntl
import hashlib
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
import sqlalchemy
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
# The run whose weights this run started from: the pretraining run of a fine-tuning run,
# or the interrupted run that a resumed run continues.
TAG_WEIGHTS_PARENT = "atmorep.parent_run_id"
TAG_RESUMED = "atmorep.resumed"
TAG_CONFIG_DIGEST = "atmorep.config_digest"
TAG_CHECKPOINT_DIR = "atmorep.checkpoint_dir"
TAG_VERSION_PREFIX = "atmorep.version."
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
    """Point the fluent API and a new client at `tracking_uri()`, creating a new sqlite store first.

    The registry URI is set with the tracking URI. `mlflow.set_registry_uri` also stores
    it in this process's globals and in `MLFLOW_REGISTRY_URI`, and an `MlflowClient`
    built with only `tracking_uri` takes its registry from there. So a caller that reads
    models from another store must pass `registry_uri` as well.
    """
    uri = tracking_uri()
    initialise_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# sqlite stores that this process has opened through `initialise_sqlite_store`.
_INITIALISED_STORES: set[str] = set()


def initialise_sqlite_store(uri: str) -> None:
    """Create the tables of the sqlite store at `uri` once, under a file lock beside the database.

    MLflow 3.17 creates and migrates the tables of a new sqlite file when a process first
    opens it, without a lock between processes. Two processes that open one new file at
    the same time both run the migrations, and one of them fails, for example with
    "duplicate column name: step". Holding `<database>.lock` while the first process opens
    the store makes the others wait and then find the tables in place. Other URIs are left
    to their server.
    """
    if uri in _INITIALISED_STORES or not uri.startswith("sqlite:"):
        return
    database = sqlalchemy.engine.make_url(uri).database
    if not database or database == ":memory:":
        return

    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(f"{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        # Opening the tracking and the registry store creates and checks their tables.
        store = MlflowClient(tracking_uri=uri, registry_uri=uri)
        store.search_experiments(max_results=1)
        store.search_registered_models(max_results=1)
    finally:
        os.close(descriptor)
    _INITIALISED_STORES.add(uri)


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
    tags.update({f"{TAG_VERSION_PREFIX}{name}": version for name, version in package_versions().items()})
    tags = {key: value for key, value in tags.items() if value is not None}

    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=stage)
    if params:
        log_params(run.info.run_id, params)
    logger.info("MLflow run %s started for stage %s", run.info.run_id, stage)
    return StageRun(run_id=run.info.run_id, experiment_id=experiment_id, stage=stage)


def end_stage_run(run_id: str, failed: bool = False, status: str | None = None) -> None:
    """Mark the run FINISHED, or FAILED when `failed`, or with `status` (FINISHED, FAILED or KILLED)."""
    status = status or ("FAILED" if failed else "FINISHED")
    client().set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


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


def sync_metrics_buffer(run_id: str, buffer_path: Path) -> int:
    """Send the metrics that training left in its buffer file while MLflow was unreachable.

    Returns the number of metrics sent. A failure is logged and keeps the file, so that a
    later call can send them; it never raises.
    """
    from models.tracking import sync_buffer

    try:
        sent = sync_buffer(client(), run_id, buffer_path)
    except Exception as error:  # noqa: BLE001 - a tracking outage must not fail a finished training
        logger.warning("metrics buffered in %s not sent to run %s, kept for a later sync: %s", buffer_path, run_id, error)
        return 0
    if sent:
        logger.info("sent %d metrics that training buffered in %s to run %s", sent, buffer_path, run_id)
    return sent


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    """Set several tags of a run."""
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


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


def config_digest(config: dict[str, Any], dataset_digest: str | None, init_run_id: str | None = None) -> str:
    """Return the sha256 that identifies a training attempt: its config, dataset content and initial weights.

    Two runs with the same digest train the same steps, so one can resume the other's checkpoint.
    """
    payload = json.dumps(
        {"config": config, "dataset_digest": dataset_digest, "init_run_id": init_run_id}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def find_resumable_runs(stage: str, digest: str, exclude_run_id: str) -> list[tuple[str, Path]]:
    """Return the unfinished runs of `stage` with config digest `digest` and a checkpoint, newest first.

    A run qualifies when it did not finish (FAILED, KILLED, or RUNNING after its process
    died) and its checkpoint folder has `checkpoint.pt` but no `done.json`. Whether another
    process still trains in the folder is decided by `lock_checkpoint_dir`.
    """
    mlflow_client = client()
    runs = mlflow_client.search_runs(
        experiment_ids=[experiment.experiment_id for experiment in mlflow_client.search_experiments()],
        filter_string=(
            f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_CONFIG_DIGEST}` = '{digest}' "
            "and attributes.status != 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
    )
    found = []
    for run in runs:
        folder = run.data.tags.get(TAG_CHECKPOINT_DIR)
        if run.info.run_id == exclude_run_id or not folder:
            continue
        folder = Path(folder)
        if (folder / "checkpoint.pt").is_file() and not (folder / "done.json").exists():
            found.append((run.info.run_id, folder))
    return found


class CheckpointDirLocked(RuntimeError):
    """Another process trains in this checkpoint folder."""


class CheckpointDirLock:
    """An exclusive `flock` on `DIR/.lock` for as long as one process trains in `DIR`.

    The kernel releases the lock when its process dies, so a folder whose trainer crashed
    can be locked again at once. Raises CheckpointDirLocked when another process holds it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self.descriptor: int | None = None

    def __enter__(self) -> "CheckpointDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise CheckpointDirLocked(f"checkpoint folder {self.path.parent} is in use by another training") from None
        self.descriptor = descriptor
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.descriptor is not None:
            fcntl.flock(self.descriptor, fcntl.LOCK_UN)
            os.close(self.descriptor)
            self.descriptor = None
