"""Model logging, registration and resolution of model URIs to checkpoints."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE, ErrorCode

from data_catalog import atmorep_home
from tasks.tracking import client

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"
MODELS_PACKAGE = Path(__file__).resolve().parents[1] / "models"

_REGISTERED_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")
_RUN_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-f]{32})(/.*)?$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")

# Attempts at registering one version when another writer blocks the store, and the wait
# before retry n, which is n times this delay.
REGISTER_ATTEMPTS = 5
REGISTER_RETRY_DELAY_S = 2.0


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to the MLflow run that trained it."""

    uri: str
    run_id: str
    name: str | None = None
    version: str | None = None


def log_and_register_model(run_id: str, checkpoint_path: Path, registered_name: str) -> str:
    """Log a training checkpoint and its model to a run and register it as `registered_name`.

    The checkpoint (weights, optimiser, config) is logged under `checkpoint/`. The model is
    logged with the MLflow PyTorch flavour in pickle format with the `models` package
    bundled, so `mlflow.pytorch.load_model` returns an `AtmoRep` instance. Returns the
    new registered version. A run that already has a version of `registered_name`, left by
    an earlier attempt of this task, keeps that version and logs no second model.
    """
    from models.checkpoint import load_model

    model, _ = load_model(checkpoint_path)
    mlflow_client = client()
    mlflow_client.log_artifact(run_id, str(checkpoint_path), artifact_path="checkpoint")

    existing = find_run_version(registered_name, run_id)
    if existing is not None:
        logger.info(
            "Run %s already has version %s of model %s from an earlier attempt, so it is kept",
            run_id, existing, registered_name,
        )
        return existing

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pickle",
            code_paths=[str(MODELS_PACKAGE)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    version = register_version(info.model_uri, registered_name, run_id)
    logger.info("Registered model %s version %s from run %s", registered_name, version, run_id)
    return version


def register_version(model_uri: str, name: str, run_id: str) -> str:
    """Register the logged model `model_uri` of run `run_id` as a new version of `name` and return it.

    Another process that writes the same sqlite store can hold its write lock longer than
    MLflow's 20 s busy timeout, or make SQLite return "database is locked" at once to avoid
    a deadlock. Such an error is retried up to REGISTER_ATTEMPTS times. Before each retry
    the registry is searched for a version of this run, since the failed attempt may have
    committed it. The version is read back before it is returned, and a version that is
    missing or belongs to another run raises RuntimeError.
    """
    for attempt in range(1, REGISTER_ATTEMPTS + 1):
        try:
            version = str(mlflow.register_model(model_uri, name).version)
            break
        except MlflowException as error:
            if not _is_store_contention(error) or attempt == REGISTER_ATTEMPTS:
                raise
            logger.warning(
                "Registering run %s as model %s failed on attempt %d of %d, retrying: %s",
                run_id, name, attempt, REGISTER_ATTEMPTS, error,
            )
        existing = find_run_version(name, run_id)
        if existing is not None:
            version = existing
            break
        time.sleep(REGISTER_RETRY_DELAY_S * attempt)

    check_registered_version(name, version, run_id)
    return version


def find_run_version(name: str, run_id: str) -> str | None:
    """Return the newest version of registered model `name` that run `run_id` created, or None."""
    versions = client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        return None
    return str(max(int(version.version) for version in versions))


def check_registered_version(name: str, version: str, run_id: str) -> None:
    """Raise RuntimeError unless the registry has version `version` of `name`, created by run `run_id`."""
    uri = mlflow.get_registry_uri()
    try:
        stored = client().get_model_version(name, version)
    except MlflowException as error:
        raise RuntimeError(
            f"model {name!r} version {version} of run {run_id} was registered but is not found in the "
            f"registry {uri}: {error}"
        ) from error
    if stored.run_id != run_id:
        raise RuntimeError(
            f"model {name!r} version {version} in the registry {uri} belongs to run {stored.run_id}, "
            f"not to run {run_id} that registered it"
        )


def _is_store_contention(error: MlflowException) -> bool:
    """Return whether `error` reports a write that another writer of the store blocked."""
    message = str(error)
    return (
        error.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE)
        or "database is locked" in message
        or "Model Version creation error" in message
    )


def resolve_model(uri: str) -> ResolvedModel:
    """Resolve `models:/NAME/VERSION`, `models:/NAME/latest`, `models:/NAME@ALIAS`,
    `runs:/RUN_ID/...` or a bare run id to the run that contains the checkpoint."""
    mlflow_client = client()

    registered = _REGISTERED_URI.match(uri)
    if registered:
        name = registered["name"]
        if registered["alias"]:
            version = mlflow_client.get_model_version_by_alias(name, registered["alias"])
        else:
            version = _get_version(name, registered["version"])
        return ResolvedModel(uri=uri, run_id=version.run_id, name=name, version=str(version.version))

    run_id = None
    run_uri = _RUN_URI.match(uri)
    if run_uri:
        run_id = run_uri["run_id"]
    elif _RUN_ID.match(uri):
        run_id = uri
    if run_id is not None:
        try:
            mlflow_client.get_run(run_id)
        except MlflowException as error:
            raise LookupError(
                f"MLflow run {run_id} not found in {mlflow.get_tracking_uri()}: check the run id, "
                "or set MLFLOW_TRACKING_URI to the store that holds it"
            ) from error
        return ResolvedModel(uri=uri, run_id=run_id)
    raise ValueError(
        f"invalid model URI {uri!r}: use models:/NAME/VERSION, models:/NAME/latest, "
        "models:/NAME@ALIAS, runs:/RUN_ID or a 32-character MLflow run id"
    )


def _get_version(name: str, version: str):
    mlflow_client = client()
    versions = mlflow_client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise LookupError(
            f"no registered model named {name!r} in {mlflow.get_tracking_uri()}: run "
            "`atmorep pretrain atmorep` first, or set MLFLOW_TRACKING_URI to the store that holds it"
        )
    if version == "latest":
        return max(versions, key=lambda v: int(v.version))
    for candidate in versions:
        if str(candidate.version) == version:
            return candidate
    known = ", ".join(sorted(str(v.version) for v in versions))
    raise LookupError(f"model {name!r} has no version {version}; known versions: {known}")


def download_checkpoint(run_id: str, destination: Path | None = None) -> Path:
    """Download the training checkpoint of a run and return its local path.

    The default destination is `$ATMOREP_HOME/model-cache/<run id>/`, so repeated
    evaluations of one model reuse one folder instead of leaving copies behind.
    """
    destination = destination or atmorep_home() / "model-cache" / run_id
    destination.mkdir(parents=True, exist_ok=True)
    try:
        local = client().download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(destination))
    except Exception as error:  # MLflow raises several types for a missing artifact.
        raise FileNotFoundError(
            f"run {run_id} has no artifact {CHECKPOINT_ARTIFACT}: it is not a training run "
            "of this pipeline, or its upload failed"
        ) from error
    return Path(local)
