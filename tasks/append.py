"""Append new time steps to a published ERA5 dataset, normalised with its existing statistics.

Steps of `append_era5`:

1. Load the catalog entry and the statistics of the published store. They are never
   recomputed, so the statistics stay those of the training period.
2. Decode, validate and regrid the new sources with the dataset's own parameters
   (variables, area, longitude convention, coarsening), and check that they continue the
   time axis at the dataset's step, or that the dataset's gap policy keeps the gap.
3. Build a staging store beside the data: hard links to the existing chunk files and
   copies of the metadata. Append the new steps to it along `time` and update its
   attributes. Existing chunks are not rewritten, except a last chunk that held fewer
   than `time_chunk` steps, which the staging store gets as a new file.
4. Rename the staging store to `data/versions/<name>/<digest>.zarr`, then publish the
   new entry. Publishing is one atomic file rename, the only step readers see. Until it
   happens the old entry and the old store stay valid and published. Then the old store
   is removed: its chunk files live on as links in the new store.

A failure before publishing leaves the old dataset published and unchanged. An exception
removes the staging store. After a hard kill, the next `append_era5` of the same name
removes it. It also removes the old store that a kill between publishing and cleanup left.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from data_catalog.catalog import Catalog, dataset_digest
from data_catalog.locks import holds_dataset_lock
from data_catalog.schema import DatasetEntry
from tasks import writer
from tasks.ingest import (
    LATITUDE,
    LEVEL,
    LONGITUDE,
    MEMBER,
    TIME,
    IngestResult,
    InvalidSourceError,
    _chunks,
    _describe_gaps,
    _describe_source,
    _list_paths,
    _resolve_sources,
    _source_label,
    _store_attrs,
    finish_store,
    format_step,
    open_sources,
    regrid,
    select_variables,
)
from tasks.normalise import normalise, open_statistics

logger = logging.getLogger(__name__)

VERSIONS_FOLDER = "versions"
_STAGING_INFIX = ".append-"


@holds_dataset_lock("append")
def append_era5(sources: Sequence[str | Path | xr.Dataset], name: str, catalog: Catalog | None = None) -> IngestResult:
    """Append the time steps of `sources` after the last time of the published dataset `name`.

    The new steps are normalised with the dataset's stored statistics. They must start
    after the dataset's last time, one `time_step` later unless the dataset was ingested
    with `on_time_gaps="keep"`, and they must have the dataset's variables, grid, levels
    and members. Returns the new entry, whose digest is the recipe digest of all sources,
    old and new, with the dataset's parameters, and whose version is one more than the
    old entry's. Raises DatasetNotFoundError for an unknown name, and InvalidSourceError
    naming the files when the new data do not fit, and DatasetLockedError when another
    ingest or append of `name` is running.
    """
    catalog = catalog if catalog is not None else Catalog()
    entry = catalog.get(name)
    if not isinstance(entry, DatasetEntry):
        raise ValueError(f"dataset {name!r} is an image dataset, but append_era5 appends ERA5 fields")
    store = catalog.resolve_zarr_path(entry)
    _remove_leftovers(catalog, name, keep=store)

    paths = _resolve_sources(sources)
    labels = [_source_label(source) for source in paths]
    where = _list_paths(labels)
    source_files = [_describe_source(source) for source in paths]
    known = {source.sha256: source.path for source in entry.provenance.sources}
    for source in source_files:
        if source.sha256 in known:
            raise InvalidSourceError(
                f"source {source.path} has the same content (sha256 {source.sha256[:12]}) as {known[source.sha256]}, "
                f"which dataset {name!r} already contains. Append only new time steps."
            )

    parameters = entry.provenance.parameters
    dataset = open_sources(paths, entry.time_chunk)
    dataset = select_variables(dataset, sorted(entry.variables), labels)
    dataset = regrid(
        dataset,
        where,
        parameters.get("area"),
        str(parameters.get("longitude_convention", "-180..180")),
        int(parameters.get("coarsen_factor", 1)),
    )
    dataset = dataset.chunk(_chunks(dataset, entry.time_chunk))
    new_gaps = _check_continuation(dataset, entry, store, where, str(parameters.get("on_time_gaps", "error")))

    statistics = open_statistics(store)
    normalised = normalise(dataset, statistics).astype(np.float32)
    normalised = _add_masks(normalised, dataset, entry, where)

    digest = dataset_digest([source.sha256 for source in [*entry.provenance.sources, *source_files]], parameters)
    updated = _updated_entry(entry, dataset, source_files, new_gaps, digest, catalog, name)
    normalised.attrs = {}

    final, updated = _write_version(normalised, updated, store, catalog)
    catalog.publish(updated)
    if store != final:
        shutil.rmtree(store, ignore_errors=True)
    logger.info(
        "appended %d time steps to dataset %s (now version %d, %s .. %s, content digest %s)",
        dataset.sizes[TIME], name, updated.version, updated.time_start, updated.time_end, updated.content_digest[:12],
    )
    return IngestResult(entry=updated, reused=False, zarr_path=final)


def version_path(catalog: Catalog, name: str, digest: str) -> Path:
    """Return where an appended version of dataset `name` is stored: `data/versions/<name>/<digest>.zarr`."""
    return catalog.data_dir / VERSIONS_FOLDER / name / f"{digest[:16]}.zarr"


def _check_continuation(
    dataset: xr.Dataset, entry: DatasetEntry, store: Path, where: str, on_time_gaps: str
) -> list[tuple[np.datetime64, np.datetime64]]:
    """Check the grid and the time axis of the new data against the store; return the new time gaps."""
    with xr.open_zarr(store, consolidated=False) as existing:
        for dim in (LATITUDE, LONGITUDE, LEVEL, MEMBER):
            if (dim in existing.dims) != (dim in dataset.dims) or (
                dim in existing.dims and not np.allclose(existing[dim].values, dataset[dim].values, rtol=0, atol=1e-6)
            ):
                raise InvalidSourceError(
                    f"{dim} of {where} differs from that of dataset {entry.name!r} ({store}). Appended data need "
                    "the dataset's grid, levels and members."
                )
        last = existing[TIME].values[-1]
        stored_variables = {str(variable): existing[variable].dims for variable in existing.data_vars}

    for variable in entry.variables:
        if dataset[variable].dims != stored_variables[variable]:
            raise InvalidSourceError(
                f"variable {variable!r} of {where} has dims {dataset[variable].dims}, but dataset {entry.name!r} "
                f"stores it with dims {stored_variables[variable]}"
            )

    times = dataset[TIME].values
    if times[0] <= last:
        raise InvalidSourceError(
            f"{where} starts at {pd.Timestamp(times[0]).isoformat()}, not after the last time "
            f"{pd.Timestamp(last).isoformat()} of dataset {entry.name!r}. Append only later time steps."
        )
    axis = np.concatenate([[last], times])
    differences = np.diff(axis)
    # A single-step dataset has no step yet, so the first appended step sets it.
    step = differences[0] if entry.time_count == 1 else np.timedelta64(pd.Timedelta(entry.time_step).to_timedelta64(), "ns")
    gaps = [(axis[index], axis[index + 1]) for index in np.flatnonzero(differences != step)]
    if gaps:
        listing = _describe_gaps(gaps, step)
        if on_time_gaps == "error":
            raise InvalidSourceError(
                f"{where} does not continue dataset {entry.name!r} at its step {format_step(step)}: {listing}. "
                "Add the missing time steps; the dataset was ingested with on_time_gaps='error'."
            )
        logger.warning("appending %s to dataset %s keeps %d gap(s): %s", where, entry.name, len(gaps), listing)
        return gaps
    return []


def _add_masks(normalised: xr.Dataset, source: xr.Dataset, entry: DatasetEntry, where: str) -> xr.Dataset:
    """Add the `<var>_mask` variables the dataset has; raise for missing values in a variable without a mask."""
    masks = {}
    for variable, info in entry.variables.items():
        if info.mask is None:
            count = int(source[variable].isnull().sum())
            if count:
                raise InvalidSourceError(
                    f"variable {variable!r} of {where} has {count} missing values, but dataset {entry.name!r} has no "
                    f"mask for it, and appending cannot add one. Ingest all files again with ingest_era5."
                )
            continue
        mask = source[variable].isnull()
        mask.attrs = {"long_name": f"missing values of {variable}", "flag_meanings": "missing"}
        masks[info.mask] = mask
        normalised[variable] = normalised[variable].assign_attrs(ancillary_variables=info.mask)
    return normalised.assign(masks)


def _updated_entry(
    entry: DatasetEntry,
    dataset: xr.Dataset,
    source_files: list,
    new_gaps: list[tuple[np.datetime64, np.datetime64]],
    digest: str,
    catalog: Catalog,
    name: str,
) -> DatasetEntry:
    times = dataset[TIME].values
    document = entry.model_dump()
    variables = document["variables"]
    for variable, info in variables.items():
        if info["mask"] is not None:
            info["missing_values"] += int(dataset[variable].isnull().sum())
    document.update(
        zarr_path=str(version_path(catalog, name, digest)),
        time_end=pd.Timestamp(times[-1]).to_pydatetime(),
        time_count=entry.time_count + int(times.size),
        time_gaps=[
            *document["time_gaps"],
            *((pd.Timestamp(before).to_pydatetime(), pd.Timestamp(after).to_pydatetime()) for before, after in new_gaps),
        ],
        digest=digest,
        content_digest=None,
    )
    document["provenance"]["sources"] = [*document["provenance"]["sources"], *(source.model_dump() for source in source_files)]
    if entry.time_count == 1:
        document["time_step"] = pd.Timedelta(times[0] - np.datetime64(entry.time_end, "ns")).to_pytimedelta()
    return DatasetEntry.model_validate(document)


def _write_version(
    normalised: xr.Dataset, entry: DatasetEntry, store: Path, catalog: Catalog
) -> tuple[Path, DatasetEntry]:
    """Write the store of the appended version without touching the catalog.

    Returns its path and `entry` with the content digest and version of the new store.
    """
    final = Path(entry.zarr_path)
    staging = final.with_name(f".{final.name}{_STAGING_INFIX}{os.getpid()}")
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.link_store(store, staging)
        data = normalised.drop_vars([MEMBER, LEVEL, LATITUDE, LONGITUDE], errors="ignore")
        data = data.chunk(_append_chunks(data, entry.time_count - data.sizes[TIME], entry.time_chunk))
        data.to_zarr(staging, append_dim=TIME, consolidated=False)
        group = zarr.open_group(staging, mode="r+")
        group.attrs.put(_store_attrs(entry))
        entry = finish_store(staging, entry, catalog)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final, entry


def _append_chunks(data: xr.Dataset, stored_count: int, time_chunk: int) -> dict[str, tuple[int, ...] | int]:
    """Return dask chunks for appending `data` after `stored_count` steps of a store chunked `time_chunk` along time.

    When the store's last chunk contains fewer than `time_chunk` steps, the first dask chunk
    fills it up, so every later dask chunk maps onto exactly one Zarr chunk. Only that
    last chunk is rewritten. Zarr rejects dask chunks that span two Zarr chunks.
    """
    count = data.sizes[TIME]
    first = min(count, (-stored_count) % time_chunk) or min(count, time_chunk)
    sizes = [first]
    while sum(sizes) < count:
        sizes.append(min(time_chunk, count - sum(sizes)))
    return {dim: (tuple(sizes) if dim == TIME else -1) for dim in data.dims}


def _remove_leftovers(catalog: Catalog, name: str, keep: Path) -> None:
    """Remove staging stores and unpublished versions of `name` that an interrupted append left, but not `keep`."""
    folder = catalog.data_dir / VERSIONS_FOLDER / name
    candidates = list(folder.iterdir()) if folder.is_dir() else []
    default = catalog.default_zarr_path(name)
    if default.exists():
        candidates.append(default)
    for path in candidates:
        if path.resolve() != keep.resolve():
            logger.info("removing %s, left by an interrupted append to dataset %s", path, name)
            shutil.rmtree(path, ignore_errors=True)
