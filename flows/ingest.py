"""`ingest/era5`: ERA5 files, CDS requests or Zarr stores to a normalised Zarr dataset in the catalog."""

from __future__ import annotations

import glob
from pathlib import Path

import pandas as pd
import xarray as xr
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from data_catalog import Catalog, atmorep_home, fetch_sample
from flows.caching import ERA5_CACHE_POLICY, run_data_task
from flows.common import DATA_RETRIES, NETWORK_RETRIES, stage_run
from flows.params import IngestEra5Params
from tasks.append import append_era5
from tasks.ingest import ingest_era5
from tasks.sources import CDS_PREFIX, ZARR_PREFIX, open_cds, open_zarr_source, parse_cds_source, parse_zarr_source
from tasks.tracking import log_json_artifact, log_metrics

SAMPLE_PREFIX = "sample:"
CDS_DOWNLOAD_DIR = Path("downloads") / "cds"


def resolve_sources(
    sources: list[str], time_range: tuple[str, str] | None = None, download_dir: Path | None = None
) -> list[Path | xr.Dataset]:
    """Turn source strings into files and opened datasets for `ingest_era5`.

    - `sample:NAME`: a sample file listed in data_catalog/samples.yaml.
    - `cds:REQUEST.yaml` or `cds:{json}`: a `tasks.sources.CdsRequest`, downloaded into
      `download_dir` (default `$ATMOREP_HOME/downloads/cds`) and opened, one dataset per file.
    - `zarr:URL?...` or `zarr:{json}`: a `tasks.sources.RemoteZarrSource`, opened lazily.
    - anything else: a GRIB or NetCDF path or glob, expanded in sorted order.

    `time_range` (first and last time, ISO 8601) fills in the dates of a CDS request and
    the time of a Zarr selection that give none.
    """
    moments = tuple(pd.Timestamp(moment).to_pydatetime() for moment in time_range) if time_range else None
    resolved: list[Path | xr.Dataset] = []
    for source in sources:
        if source.startswith(SAMPLE_PREFIX):
            resolved.append(fetch_sample(source.removeprefix(SAMPLE_PREFIX)))
        elif source.startswith(CDS_PREFIX):
            dates = (moments[0].date(), moments[1].date()) if moments else None
            request = parse_cds_source(source, default_dates=dates)
            resolved.extend(open_cds(request, download_dir or atmorep_home() / CDS_DOWNLOAD_DIR))
        elif source.startswith(ZARR_PREFIX):
            resolved.append(open_zarr_source(parse_zarr_source(source, default_time=moments)))
        else:
            matches = sorted(glob.glob(source))
            if not matches:
                raise FileNotFoundError(
                    f"source {source!r} matches no file: give existing GRIB or NetCDF paths or globs, "
                    "sample:NAME for a sample listed in data_catalog/samples.yaml, cds:REQUEST or zarr:URL"
                )
            resolved.extend(Path(match) for match in matches)
    return resolved


fetch_sources = task(resolve_sources, name="fetch-sources", **NETWORK_RETRIES)
# The cache key covers the recipe inputs and the sha256 of each source (see flows.caching).
ingest_files = task(ingest_era5, name="ingest-era5", cache_policy=ERA5_CACHE_POLICY, **DATA_RETRIES)
# Appending adds the time steps that the dataset lacks, so a result is never reused.
append_files = task(append_era5, name="append-era5", cache_policy=NONE, **DATA_RETRIES)


@flow(name="ingest", flow_run_name="era5-{params.name}")
def ingest(params: IngestEra5Params = IngestEra5Params()) -> dict:
    """Decode, validate and normalise ERA5 files into Zarr and publish them in the catalog.

    Returns the catalog entry (as a dict) with the MLflow run id under `run_id`.
    """
    logger = get_run_logger()
    last_period = params.test_period or params.train_period
    time_range = (params.train_period[0], last_period[1])
    sources = fetch_sources(params.sources, time_range=time_range)
    logger.info("Ingesting %d source(s) as %s", len(sources), params.name)

    cached = False
    if params.append:
        result = append_files(sources, name=params.name, catalog=Catalog())
    else:
        result, cached = run_data_task(
            ingest_files,
            Catalog(),
            params.name,
            sources=sources,
            train_period=params.train_period,
            test_period=params.test_period,
            variables=params.variables,
            time_chunk=params.time_chunk,
            area=params.area,
            longitude_convention=params.longitude_convention,
            coarsen_factor=params.coarsen_factor,
            normalisation=params.normalisation,
            on_time_gaps=params.on_time_gaps,
            grib_decoder=params.grib_decoder,
            scheduler_address=params.scheduler_address,
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

    with stage_run("ingest", params, entry=entry, dataset_context="ingest") as run:
        record = entry.model_dump(mode="json")
        log_json_artifact(run.run_id, record, "catalog_entry.json")
        log_metrics(run.run_id, _statistics_metrics(record["statistics"]))
        log_metrics(run.run_id, {"reused": float(reused)})

    return {**record, "run_id": run.run_id}


def _statistics_metrics(statistics: dict) -> dict[str, float]:
    """Flatten `{var: {"mean": [...], "std": [...]}}` into metrics `stats/mean/VAR[/LEVEL_INDEX]`.

    Locally normalised variables have no single mean and std, so they are skipped.
    """
    metrics = {}
    for variable, moments in statistics.items():
        for moment in ("mean", "std"):
            values = moments.get(moment)
            if values is None:
                continue
            if len(values) == 1:
                metrics[f"stats/{moment}/{variable}"] = values[0]
            else:
                metrics.update({f"stats/{moment}/{variable}/{index}": value for index, value in enumerate(values)})
    return metrics
