"""`ingest/era5`: ERA5 GRIB or NetCDF files to a normalised Zarr dataset in the catalog."""

from __future__ import annotations

import glob
from pathlib import Path

from prefect import flow, get_run_logger, task

from data_catalog import Catalog, fetch_sample
from flows.common import stage_run
from flows.params import IngestEra5Params
from tasks.ingest import ingest_era5
from tasks.tracking import log_dataset_input, log_json_artifact, log_metrics

SAMPLE_PREFIX = "sample:"


def resolve_sources(sources: list[str]) -> list[Path]:
    """Expand `sample:NAME` references and globs into a sorted list of existing files."""
    paths: list[Path] = []
    for source in sources:
        if source.startswith(SAMPLE_PREFIX):
            paths.append(fetch_sample(source.removeprefix(SAMPLE_PREFIX)))
            continue
        matches = sorted(glob.glob(source))
        if not matches:
            raise FileNotFoundError(
                f"source {source!r} matches no file: give existing GRIB or NetCDF paths or globs, "
                "or sample:NAME for a sample listed in data_catalog/samples.yaml"
            )
        paths.extend(Path(match) for match in matches)
    return paths


fetch_sources = task(resolve_sources, name="fetch-sources", retries=2, retry_delay_seconds=5)
ingest_files = task(ingest_era5, name="ingest-era5")


@flow(name="ingest", flow_run_name="era5-{params.name}")
def ingest(params: IngestEra5Params = IngestEra5Params()) -> dict:
    """Decode, validate and normalise ERA5 files into Zarr and publish them in the catalog.

    Returns the catalog entry (as a dict) with the MLflow run id under `run_id`.
    """
    logger = get_run_logger()
    paths = fetch_sources(params.sources)
    logger.info("Ingesting %d file(s) as %s", len(paths), params.name)

    result = ingest_files(
        paths,
        name=params.name,
        train_period=params.train_period,
        test_period=params.test_period,
        variables=params.variables,
        time_chunk=params.time_chunk,
        catalog=Catalog(),
    )
    entry = result.entry
    if result.reused:
        logger.info("Dataset %s with digest %s exists already: reused", entry.name, entry.digest)

    with stage_run("ingest", params, dataset=entry.name, dataset_digest=entry.digest) as run:
        log_dataset_input(run.run_id, entry.name, Path(entry.zarr_path), entry.digest, context="ingest")
        record = entry.model_dump(mode="json")
        log_json_artifact(run.run_id, record, "catalog_entry.json")
        log_metrics(run.run_id, _statistics_metrics(record["statistics"]))
        log_metrics(run.run_id, {"reused": float(result.reused)})

    return {**record, "run_id": run.run_id}


def _statistics_metrics(statistics: dict) -> dict[str, float]:
    """Flatten `{var: {"mean": [...], "std": [...]}}` into metrics `stats/mean/VAR[/LEVEL_INDEX]`."""
    metrics = {}
    for variable, moments in statistics.items():
        for moment in ("mean", "std"):
            values = moments[moment]
            if len(values) == 1:
                metrics[f"stats/{moment}/{variable}"] = values[0]
            else:
                metrics.update({f"stats/{moment}/{variable}/{index}": value for index, value in enumerate(values)})
    return metrics
