"""`ingest/imagenet`: an ImageNet-style image folder to a uint8 Zarr dataset in the catalog."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task

from data_catalog import Catalog
from data_catalog.workspace import DATA_MIRROR_ENV
from flows.caching import IMAGENET_CACHE_POLICY, run_data_task
from flows.common import DATA_RETRIES, stage_run
from flows.params import IngestImagenetParams
from tasks.imagenet import ingest_imagenet, save_image_grid
from tasks.tracking import client, log_json_artifact, log_metrics

SAMPLE_PREFIX = "sample:"
# Image samples are folders, which data_catalog/samples.yaml cannot list (it hashes single
# files), so they are found only in the data mirror, at these relative paths.
IMAGE_SAMPLES = {"imagenet-sample": "images/imagenet-sample"}
GRID_IMAGES = 16


def resolve_image_source(source: str) -> Path:
    """Return the folder of `source`: a folder path, or `sample:NAME` inside `$ATMOREP_DATA_MIRROR`."""
    if not source.startswith(SAMPLE_PREFIX):
        return Path(source).expanduser()

    name = source.removeprefix(SAMPLE_PREFIX)
    if name not in IMAGE_SAMPLES:
        raise LookupError(f"image sample {name!r} not found (known image samples: {', '.join(sorted(IMAGE_SAMPLES))})")
    mirror = os.environ.get(DATA_MIRROR_ENV)
    if not mirror:
        raise RuntimeError(
            f"image sample {name!r} has no public download. Set {DATA_MIRROR_ENV} to a folder that "
            f"contains {IMAGE_SAMPLES[name]}, or give the path of an image folder."
        )
    folder = Path(mirror).expanduser() / IMAGE_SAMPLES[name]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image sample {name!r} not found at {folder}. {DATA_MIRROR_ENV}={mirror} must be a folder "
            f"that contains {IMAGE_SAMPLES[name]}."
        )
    return folder


# The cache key covers the recipe inputs and the digest of the folder's files (see
# flows.caching). On a cache miss, ingest_imagenet still reuses a finished dataset by its
# recipe digest and resumes a partial one.
ingest_folder = task(ingest_imagenet, name="ingest-imagenet", cache_policy=IMAGENET_CACHE_POLICY, **DATA_RETRIES)


@flow(name="ingest", flow_run_name="imagenet-{params.name}")
def ingest(params: IngestImagenetParams = IngestImagenetParams()) -> dict:
    """Decode, resize and store the images of a folder as Zarr and publish them in the catalog.

    Returns the catalog entry as a dict, with the class table replaced by its length
    (`class_count`) and the MLflow run id under `run_id`. The full entry is logged to
    MLflow as `catalog_entry.json`.
    """
    logger = get_run_logger()
    folder = resolve_image_source(params.source)
    logger.info("Ingesting images of %s as %s", folder, params.name)

    result, cached = run_data_task(
        ingest_folder,
        Catalog(),
        params.name,
        source=folder,
        size=params.size,
        crop_fraction=params.crop_fraction,
        layout=params.layout,
        chunk_images=params.chunk_images,
        workers=params.workers,
    )
    entry = result.entry
    reused = result.reused or cached
    if cached:
        logger.info("Dataset %s version %d taken from the Prefect cache of an earlier run", entry.name, entry.version)
    elif result.reused:
        logger.info(
            "Dataset %s version %d with recipe digest %s exists already: reused",
            entry.name, entry.version, entry.digest[:12],
        )
    if result.resumed_chunks and not cached:
        logger.info("Resumed after %d chunks written by an earlier run", result.resumed_chunks)
    for skipped in result.skipped:
        logger.warning("Skipped image %s: %s", skipped.path, skipped.error)

    with stage_run("ingest", params, entry=entry, dataset_context="ingest") as run:
        record = entry.model_dump(mode="json")
        log_json_artifact(run.run_id, record, "catalog_entry.json")
        with tempfile.TemporaryDirectory() as folder_name:
            grid = save_image_grid(result.zarr_path, Path(folder_name) / "images.png", count=GRID_IMAGES)
            client().log_artifact(run.run_id, str(grid), artifact_path="plots")
        log_metrics(run.run_id, _image_metrics(record))
        resumed_chunks = 0 if cached else result.resumed_chunks
        log_metrics(run.run_id, {"reused": float(reused), "resumed_chunks": float(resumed_chunks)})

    summary = {key: value for key, value in record.items() if key != "classes"}
    return {**summary, "class_count": len(entry.classes), "run_id": run.run_id}


def _image_metrics(record: dict) -> dict[str, float]:
    """Return the counts and the per-channel statistics as metrics `stats/mean/R` and so on."""
    metrics = {
        "images": record["image_count"],
        "skipped": len(record["skipped"]),
        "classes": len(record["classes"]),
    }
    for moment in ("mean", "std"):
        for channel, value in zip("RGB", record["statistics"][moment]):
            metrics[f"stats/{moment}/{channel}"] = value
    return metrics
