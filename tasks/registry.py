"""Model logging, registration and resolution of model URIs to checkpoints."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException

from data_catalog import atmorep_home
from tasks.tracking import client

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"
MODELS_PACKAGE = Path(__file__).resolve().parents[1] / "models"

_REGISTERED_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")
_RUN_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-f]{32})(/.*)?$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


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
    new registered version.
    """
    from models.checkpoint import load_model

    model, _ = load_model(checkpoint_path)
    mlflow_client = client()
    mlflow_client.log_artifact(run_id, str(checkpoint_path), artifact_path="checkpoint")

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pickle",
            code_paths=[str(MODELS_PACKAGE)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            registered_model_name=registered_name,
        )
    version = str(info.registered_model_version)
    logger.info("Registered model %s version %s from run %s", registered_name, version, run_id)
    return version


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
