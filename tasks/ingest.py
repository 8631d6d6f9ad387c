"""Ingest ERA5 GRIB or NetCDF files into a normalised Zarr dataset and publish its catalog entry.

Steps of `ingest_era5`:

1. Hash the sources and derive the recipe digest. A complete dataset with that digest is reused.
2. Decode each file (cfgrib for GRIB, h5netcdf or another NetCDF engine otherwise) and
   rename it to the canonical dimensions `(time, [level,] latitude, longitude)`.
3. Validate each file and the combined dataset (dimensions, time axis, regular grid).
4. Select variables and check the train and test periods.
5. Compute statistics over the train period, normalise, and write Zarr format 3 into a
   temporary folder beside the target, then rename it into place.
6. Publish the catalog entry last, so an entry always points at a complete store.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from cfgrib.dataset import DatasetBuildError
from gribapi.errors import GribInternalError
from tqdm.auto import tqdm

from data_catalog.catalog import Catalog, dataset_digest
from data_catalog.schema import DatasetEntry, GridInfo, Provenance, SourceFile, VariableInfo, VariableStatistics
from data_catalog.workspace import package_versions, sha256_file
from tasks.normalise import compute_statistics, normalise

logger = logging.getLogger(__name__)

# Bump when a code change alters the written dataset, so older stores are not reused.
INGEST_FORMAT_VERSION = 1

GRIB_SUFFIXES = frozenset({".grib", ".grb", ".grib1", ".grib2", ".grb1", ".grb2"})
NETCDF_SUFFIXES = frozenset({".nc", ".nc4", ".netcdf", ".cdf"})
# Engines tried in order, each only when its module is installed. h5netcdf reads NetCDF4 (HDF5)
# files, netCDF4 reads both NetCDF4 and classic NetCDF3 files, and scipy reads NetCDF3 only.
NETCDF_ENGINES = (("h5netcdf", "h5netcdf"), ("netcdf4", "netCDF4"), ("scipy", "scipy"))

TIME, LEVEL, LATITUDE, LONGITUDE = "time", "level", "latitude", "longitude"
CANONICAL_DIMS = (TIME, LEVEL, LATITUDE, LONGITUDE)
DIMENSION_ALIASES = {
    "isobaricInhPa": LEVEL,
    "pressure_level": LEVEL,
    "lat": LATITUDE,
    "lon": LONGITUDE,
}
KEPT_VARIABLE_ATTRS = ("units", "long_name", "standard_name")
RECORDED_PACKAGES = ("xarray", "zarr", "cfgrib", "eccodes", "eccodeslib", "numpy", "dask", "h5netcdf")

# Relative tolerance when checking that grid coordinates are evenly spaced.
_GRID_STEP_RTOL = 1e-6


class InvalidSourceError(ValueError):
    """Error for a source file that cannot be decoded or does not fit the dataset format.

    The message names the file.
    """


class InvalidPeriodError(ValueError):
    """Error for a train or test period that is empty, outside the data, or overlaps the other period."""


@dataclass(frozen=True)
class IngestResult:
    entry: DatasetEntry
    reused: bool
    zarr_path: Path


def ingest_era5(
    sources: Sequence[str | Path],
    name: str,
    train_period: tuple[str, str],
    test_period: tuple[str, str],
    variables: list[str] | None = None,
    time_chunk: int = 24,
    catalog: Catalog | None = None,
) -> IngestResult:
    """Decode, validate and normalise ERA5 files into `<catalog root>/data/<name>.zarr`.

    `sources` are GRIB or NetCDF files: one file, files split by time, or one file per
    variable. Periods are inclusive `(start, end)` times that must lie inside the data and
    must not overlap. `variables` selects ERA5 short names (default: all). Statistics
    come from `train_period` only.

    Returns `reused=True` without writing when the catalog already has `name` with the
    same digest and its store is complete. A failure at any step leaves no new
    `<name>.zarr` and no new catalog entry. A previous dataset of the same name stays
    published, unless the failure happens during the final swap, after its entry was removed.
    """
    catalog = catalog if catalog is not None else Catalog()
    target = catalog.default_zarr_path(name)
    paths = _resolve_sources(sources)
    if time_chunk < 1:
        raise ValueError(f"time_chunk must be a positive number of time steps, got {time_chunk}")
    train = _parse_period(train_period, "train_period")
    test = _parse_period(test_period, "test_period")

    source_files = [_describe_source(path) for path in paths]
    parameters = {
        "format_version": INGEST_FORMAT_VERSION,
        "variables": sorted(variables) if variables is not None else None,
        "train_period": list(_iso_period(train)),
        "test_period": list(_iso_period(test)),
        "time_chunk": time_chunk,
    }
    digest = dataset_digest([source.sha256 for source in source_files], parameters)

    reusable = _find_reusable_entry(catalog, name, digest)
    if reusable is not None:
        logger.info("dataset %s with digest %s is complete at %s, so it is reused", name, digest[:12], target)
        return IngestResult(entry=reusable, reused=True, zarr_path=catalog.resolve_zarr_path(reusable))

    logger.info("ingesting %d source file(s) into dataset %s (digest %s)", len(paths), name, digest[:12])
    dataset = open_sources(paths, time_chunk)
    dataset = select_variables(dataset, variables, paths)
    validate_periods(dataset, train, test)

    try:
        statistics = compute_statistics(dataset, _iso_period(train))
    except GribInternalError as error:
        raise InvalidSourceError(f"cannot decode GRIB data from {_list_paths(paths)}: {error}") from error

    normalised = normalise(dataset, statistics).astype(np.float32)
    entry = _build_entry(
        dataset, name, target, train, test, statistics, source_files, parameters, digest, time_chunk
    )
    normalised.attrs = _store_attrs(entry)
    _write_and_publish(normalised, entry, catalog, target, time_chunk)
    return IngestResult(entry=entry, reused=False, zarr_path=target)


# --- sources: decoding and canonical form -------------------------------------------------


def open_sources(paths: Sequence[Path], time_chunk: int = 24) -> xr.Dataset:
    """Decode, canonicalise and validate every file, then combine them into one dataset.

    Returns dask-backed variables chunked `time_chunk` steps along time, with dims
    `(time, [level,] latitude, longitude)`.
    """
    datasets = []
    for path in paths:
        dataset = canonicalise(open_source(path), path)
        validate_source(dataset, path)
        datasets.append(dataset.chunk(_chunks(dataset, time_chunk)))

    if len(datasets) == 1:
        combined = datasets[0]
    else:
        _check_disjoint_times(datasets, paths)
        try:
            combined = xr.combine_by_coords(
                datasets,
                join="exact",
                compat="no_conflicts",
                data_vars="all",
                coords="different",
                combine_attrs="drop_conflicts",
            )
        except ValueError as error:
            raise InvalidSourceError(
                f"cannot combine {_list_paths(paths)}: {error}. Files must share one grid and level "
                "set per variable, and files of one variable must cover disjoint times."
            ) from error
        combined = combined.chunk(_chunks(combined, time_chunk))
        combined.attrs = {}

    validate_combined(combined, paths)
    return combined


def open_source(path: Path) -> xr.Dataset:
    """Open one GRIB or NetCDF file lazily, without dask and without writing index files."""
    suffix = path.suffix.lower()
    if suffix in GRIB_SUFFIXES:
        return _open_grib(path)
    if suffix in NETCDF_SUFFIXES:
        return _open_netcdf(path)
    raise InvalidSourceError(
        f"source {path} has an unknown suffix {suffix!r}: expected one of "
        f"{sorted(GRIB_SUFFIXES | NETCDF_SUFFIXES)}"
    )


def _open_grib(path: Path) -> xr.Dataset:
    # indexpath "" keeps cfgrib's index in memory, so nothing is written beside the input.
    # errors "raise" turns a truncated message into an exception instead of a smaller dataset.
    try:
        return xr.open_dataset(
            path,
            engine="cfgrib",
            backend_kwargs={"indexpath": "", "errors": "raise"},
            decode_timedelta=True,
        )
    except (GribInternalError, DatasetBuildError, EOFError, OSError) as error:
        raise InvalidSourceError(
            f"cannot decode GRIB file {path}: {type(error).__name__}: {error}. The file may be "
            "truncated or corrupted (download it again), or mix several grids or level types "
            "(split it into one file per kind)."
        ) from error


def _open_netcdf(path: Path) -> xr.Dataset:
    failures = []
    for engine, module in NETCDF_ENGINES:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            return xr.open_dataset(path, engine=engine)
        except (OSError, ValueError, TypeError) as error:
            logger.debug("engine %s cannot open %s: %s", engine, path, error)
            failures.append(f"{engine}: {error}")
    raise InvalidSourceError(
        f"cannot decode NetCDF file {path} ({'; '.join(failures) or 'no NetCDF engine installed'}). "
        "Check that the file is a complete NetCDF file."
    )


def canonicalise(dataset: xr.Dataset, path: Path) -> xr.Dataset:
    """Rename to canonical dims, drop scalar and auxiliary coords, and sort the grid.

    Time becomes the valid time. Pressure levels become `level` in hPa, ascending.
    Latitude runs north to south and longitude ascends. Variable attrs keep only units,
    long_name and standard_name, and source encodings (packing, fill values) are dropped.
    """
    dataset = _canonical_time(dataset, path)
    dataset = _canonical_level(dataset)
    dataset = dataset.rename({old: new for old, new in DIMENSION_ALIASES.items() if old in dataset.variables})

    auxiliary = [name for name in dataset.coords if name not in dataset.dims]
    dataset = dataset.drop_vars(auxiliary)

    unsupported = sorted(set(dataset.dims) - set(CANONICAL_DIMS))
    if unsupported:
        raise InvalidSourceError(
            f"source {path} has unsupported dimensions {unsupported} (supported: {list(CANONICAL_DIMS)}). "
            "Select a single ensemble member, forecast step or level type before ingesting."
        )
    for dim in (LATITUDE, LONGITUDE):
        if dim not in dataset.dims:
            raise InvalidSourceError(f"source {path} has no {dim!r} dimension (dims: {list(dataset.dims)})")

    dataset = dataset.sortby(LATITUDE, ascending=False).sortby(LONGITUDE)
    if LEVEL in dataset.dims:
        dataset = dataset.sortby(LEVEL)
    dataset = dataset.assign_coords(
        {dim: dataset[dim].astype(np.float64) for dim in (LEVEL, LATITUDE, LONGITUDE) if dim in dataset.dims}
    )

    # Dataset.map would copy the source attrs back (or drop all attrs), so build the dataset directly.
    dataset = xr.Dataset({name: _canonical_variable(values, path) for name, values in dataset.data_vars.items()})
    return dataset.drop_encoding()


def _canonical_time(dataset: xr.Dataset, path: Path) -> xr.Dataset:
    """Replace reference time and step by one `time` dimension of valid times."""
    if "step" in dataset.dims:
        raise InvalidSourceError(
            f"source {path} has {dataset.sizes['step']} forecast steps, but ingest expects analyses with one "
            "valid time per field. Select a single step before ingesting."
        )

    if "valid_time" in dataset.dims:
        # CDS NetCDF files since 2024 name the time dimension valid_time.
        if TIME in dataset.variables:
            dataset = dataset.drop_vars(TIME)
        return dataset.rename({"valid_time": TIME})

    if "valid_time" in dataset.coords:
        valid_time = dataset["valid_time"]
        if valid_time.dims == (TIME,):
            return dataset.drop_vars("valid_time").assign_coords({TIME: (TIME, valid_time.values)})
        if valid_time.ndim == 0 and (TIME not in dataset.variables or dataset[TIME].ndim == 0):
            dataset = dataset.drop_vars([name for name in (TIME, "valid_time") if name in dataset.variables])
            return dataset.expand_dims({TIME: [valid_time.values]})
        raise InvalidSourceError(
            f"source {path} has valid_time with dims {valid_time.dims}, but ingest expects one valid time per field"
        )

    if TIME not in dataset.variables:
        raise InvalidSourceError(f"source {path} has no time coordinate (coords: {list(dataset.coords)})")
    if dataset[TIME].ndim == 0:
        time_value = dataset[TIME].values
        return dataset.drop_vars(TIME).expand_dims({TIME: [time_value]})
    return dataset


def _canonical_level(dataset: xr.Dataset) -> xr.Dataset:
    """Rename the pressure coordinate to `level` in hPa, and turn a scalar level into a length-1 dimension."""
    if "isobaricInPa" in dataset.variables:
        in_hpa = dataset["isobaricInPa"] / 100.0
        in_hpa.attrs = {"units": "hPa", "long_name": "pressure"}
        dataset = dataset.assign_coords(isobaricInPa=in_hpa).rename({"isobaricInPa": LEVEL})
    for alias, canonical in DIMENSION_ALIASES.items():
        if canonical == LEVEL and alias in dataset.variables:
            dataset = dataset.rename({alias: LEVEL})

    if LEVEL not in dataset.variables:
        return dataset
    units = str(dataset[LEVEL].attrs.get("units", "hPa"))
    if units == "Pa":
        in_hpa = dataset[LEVEL] / 100.0
        in_hpa.attrs = {**dataset[LEVEL].attrs, "units": "hPa"}
        dataset = dataset.assign_coords({LEVEL: in_hpa})
    if dataset[LEVEL].ndim == 0:
        level_value = dataset[LEVEL].values
        dataset = dataset.drop_vars(LEVEL).expand_dims({LEVEL: [level_value]})
    return dataset


def _canonical_variable(values: xr.DataArray, path: Path) -> xr.DataArray:
    if "units" not in values.attrs:
        raise InvalidSourceError(f"variable {values.name!r} in {path} has no units attribute")
    order = [dim for dim in CANONICAL_DIMS if dim in values.dims]
    values = values.transpose(*order)
    values.attrs = {
        key: str(values.attrs[key])
        for key in KEPT_VARIABLE_ATTRS
        if key in values.attrs and values.attrs[key] != "unknown"
    }
    return values


# --- validation ---------------------------------------------------------------------------


def validate_source(dataset: xr.Dataset, path: Path) -> None:
    """Check one canonical file: variables present, each with time, latitude and longitude, and
    a strictly increasing time axis without duplicates."""
    if not dataset.data_vars:
        raise InvalidSourceError(f"source {path} contains no data variables")
    for name, values in dataset.data_vars.items():
        missing = [dim for dim in (TIME, LATITUDE, LONGITUDE) if dim not in values.dims]
        if missing:
            raise InvalidSourceError(
                f"variable {name!r} in {path} lacks dimensions {missing} (dims: {list(values.dims)})"
            )
    _check_time_axis(dataset[TIME].values, str(path))


def validate_combined(dataset: xr.Dataset, paths: Sequence[Path]) -> None:
    """Check the combined dataset: increasing time with a regular step, and a regular grid."""
    where = _list_paths(paths)
    times = dataset[TIME].values
    _check_time_axis(times, where)
    if times.size > 1:
        steps = np.diff(times)
        irregular = np.flatnonzero(steps != steps[0])
        if irregular.size:
            index = int(irregular[0])
            raise InvalidSourceError(
                f"time axis of {where} is not regular: step {pd.Timedelta(steps[0])} at the start but "
                f"{pd.Timedelta(steps[index])} from {_iso(times[index])} to {_iso(times[index + 1])}. "
                "Add the missing time steps or ingest the parts separately."
            )

    for dim in (LATITUDE, LONGITUDE):
        coordinate = dataset[dim].values
        if coordinate.size > 1:
            steps = np.diff(coordinate)
            if not np.allclose(steps, steps[0], rtol=_GRID_STEP_RTOL, atol=0.0):
                raise InvalidSourceError(
                    f"{dim} of {where} is not evenly spaced (steps from {steps.min()} to {steps.max()} "
                    "degrees), but ingest expects a regular latitude-longitude grid"
                )


def _check_time_axis(times: np.ndarray, where: str) -> None:
    values, counts = np.unique(times, return_counts=True)
    duplicates = values[counts > 1]
    if duplicates.size:
        raise InvalidSourceError(
            f"time axis of {where} contains {duplicates.size} duplicate time(s), first {_iso(duplicates[0])}"
        )
    decreasing = np.flatnonzero(np.diff(times) <= np.timedelta64(0, "ns"))
    if decreasing.size:
        index = int(decreasing[0])
        raise InvalidSourceError(
            f"time axis of {where} is not increasing: {_iso(times[index])} is followed by "
            f"{_iso(times[index + 1])}"
        )


def _check_disjoint_times(datasets: Sequence[xr.Dataset], paths: Sequence[Path]) -> None:
    """Raise when two files provide the same variable at the same time."""
    owners: dict[str, list[tuple[Path, np.ndarray]]] = defaultdict(list)
    for dataset, path in zip(datasets, paths, strict=True):
        for variable in dataset.data_vars:
            owners[str(variable)].append((path, dataset[TIME].values))
    for variable, files in owners.items():
        for index, (first_path, first_times) in enumerate(files):
            for second_path, second_times in files[index + 1 :]:
                shared = np.intersect1d(first_times, second_times)
                if shared.size:
                    raise InvalidSourceError(
                        f"variable {variable!r} appears at {shared.size} identical time(s) (first "
                        f"{_iso(shared[0])}) in both {first_path} and {second_path}. Remove one of the files."
                    )


def select_variables(dataset: xr.Dataset, variables: list[str] | None, paths: Sequence[Path]) -> xr.Dataset:
    """Keep the requested variables, or all of them when `variables` is None.

    Raises InvalidSourceError naming the missing variables and listing the available ones.
    """
    if variables is None:
        return dataset
    if not variables:
        raise ValueError("variables is an empty list. Pass None to keep all variables.")
    missing = [variable for variable in variables if variable not in dataset.data_vars]
    if missing:
        raise InvalidSourceError(
            f"variables {missing} not found in {_list_paths(paths)} "
            f"(available: {sorted(map(str, dataset.data_vars))})"
        )
    return dataset[list(variables)]


def validate_periods(dataset: xr.Dataset, train: tuple[datetime, datetime], test: tuple[datetime, datetime]) -> None:
    """Check that both periods lie inside the data, select at least one step and do not overlap."""
    times = dataset[TIME].values
    first, last = times[0], times[-1]
    for label, (start, end) in (("train_period", train), ("test_period", test)):
        start64, end64 = np.datetime64(start, "ns"), np.datetime64(end, "ns")
        if start64 < first or end64 > last:
            raise InvalidPeriodError(
                f"{label} {_iso_period((start, end))} is outside the data, which covers "
                f"{_iso(first)} .. {_iso(last)}"
            )
        if not np.any((times >= start64) & (times <= end64)):
            raise InvalidPeriodError(f"{label} {_iso_period((start, end))} contains no time step of the data")

    if train[0] <= test[1] and test[0] <= train[1]:
        raise InvalidPeriodError(
            f"train_period {_iso_period(train)} overlaps test_period {_iso_period(test)}. "
            "Choose disjoint periods, so the test period does not inform the normalisation statistics."
        )


# --- catalog entry, reuse and writing -----------------------------------------------------


def _build_entry(
    dataset: xr.Dataset,
    name: str,
    target: Path,
    train: tuple[datetime, datetime],
    test: tuple[datetime, datetime],
    statistics: dict[str, dict[str, list[float]]],
    source_files: list[SourceFile],
    parameters: dict[str, object],
    digest: str,
    time_chunk: int,
) -> DatasetEntry:
    created = datetime.now(timezone.utc)
    times = dataset[TIME].values
    latitude = dataset[LATITUDE].values
    longitude = dataset[LONGITUDE].values
    variables = {
        str(variable): VariableInfo(
            units=values.attrs["units"],
            long_name=values.attrs.get("long_name"),
            standard_name=values.attrs.get("standard_name"),
            has_levels=LEVEL in values.dims,
        )
        for variable, values in dataset.data_vars.items()
    }

    return DatasetEntry(
        name=name,
        zarr_path=str(target),
        variables=variables,
        levels=dataset[LEVEL].values.tolist() if LEVEL in dataset.dims else None,
        grid=GridInfo(
            latitude_first=float(latitude[0]),
            latitude_last=float(latitude[-1]),
            latitude_step=float(latitude[1] - latitude[0]) if latitude.size > 1 else 0.0,
            longitude_first=float(longitude[0]),
            longitude_last=float(longitude[-1]),
            longitude_step=float(longitude[1] - longitude[0]) if longitude.size > 1 else 0.0,
            shape=(latitude.size, longitude.size),
        ),
        time_start=pd.Timestamp(times[0]).to_pydatetime(),
        time_end=pd.Timestamp(times[-1]).to_pydatetime(),
        time_step=pd.Timedelta(times[1] - times[0]).to_pytimedelta() if times.size > 1 else timedelta(0),
        time_count=int(times.size),
        time_chunk=time_chunk,
        train_period=train,
        test_period=test,
        statistics={variable: VariableStatistics(**values) for variable, values in statistics.items()},
        provenance=Provenance(
            sources=source_files,
            parameters=parameters,
            packages=_package_versions(),
            created=created,
        ),
        digest=digest,
        created=created,
    )


def _store_attrs(entry: DatasetEntry) -> dict[str, object]:
    """Return the Zarr attributes (statistics, periods, provenance, digest, name) as JSON values."""
    document = entry.model_dump(mode="json")
    return {
        "name": entry.name,
        "statistics": document["statistics"],
        "train_period": document["train_period"],
        "test_period": document["test_period"],
        "provenance": document["provenance"],
        "digest": entry.digest,
    }


def _find_reusable_entry(catalog: Catalog, name: str, digest: str) -> DatasetEntry | None:
    """Return the published entry when it and its store both carry `digest`, else None."""
    if name not in catalog:
        return None
    try:
        entry = catalog.get(name)
    except ValueError as error:
        logger.warning("catalog entry %s is invalid (%s), so the dataset is ingested again", name, error)
        return None
    if entry.digest != digest:
        logger.info("dataset %s has digest %s, not %s, so it will be replaced", name, entry.digest[:12], digest[:12])
        return None

    path = catalog.resolve_zarr_path(entry)
    try:
        store = xr.open_zarr(path, consolidated=False)
    except (OSError, KeyError, ValueError) as error:
        logger.warning(
            "Zarr store %s of dataset %s cannot be opened (%s), so the dataset is ingested again", path, name, error
        )
        return None
    with store:
        complete = (
            store.attrs.get("digest") == digest
            and set(map(str, store.data_vars)) == set(entry.variables)
            and store.sizes.get(TIME) == entry.time_count
        )
    if not complete:
        logger.warning("Zarr store %s does not match catalog entry %s, so the dataset is ingested again", path, name)
        return None
    return entry


def _write_and_publish(
    dataset: xr.Dataset, entry: DatasetEntry, catalog: Catalog, target: Path, time_chunk: int
) -> None:
    """Write the store beside `target`, swap it into place, then publish the entry.

    The old entry is removed before the old store is replaced, so the catalog never
    points at a store from a different recipe.

    NOTE: no lock guards two concurrent ingests of the same name. A race between them can
    leave an entry whose digest differs from the store's, which Catalog.open_dataset rejects.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    previous: Path | None = None
    moved_into_place = False
    try:
        _write_zarr(dataset, temporary, time_chunk)

        if target.exists():
            catalog.remove(entry.name)
            previous = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
            os.replace(target, previous)
        os.replace(temporary, target)
        moved_into_place = True
        catalog.publish(entry)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if moved_into_place:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    logger.info("wrote dataset %s to %s", entry.name, target)


def _write_zarr(dataset: xr.Dataset, path: Path, time_chunk: int) -> None:
    """Write Zarr format 3 in chunks of `time_chunk` steps by the whole grid, one time block at a time.

    The first `to_zarr` call creates the arrays and writes the coordinates. Each further
    call computes one block of dask chunks and writes it into its time region.
    """
    encoding = {
        str(variable): {"chunks": tuple(time_chunk if dim == TIME else values.sizes[dim] for dim in values.dims)}
        for variable, values in dataset.data_vars.items()
    }
    dataset.to_zarr(path, mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding)

    time_count = dataset.sizes[TIME]
    data = dataset[list(dataset.data_vars)].drop_vars([LEVEL, LATITUDE, LONGITUDE], errors="ignore")
    starts = range(0, time_count, time_chunk)
    for start in tqdm(starts, desc=f"writing {path.name}", unit="block", disable=None):
        region = slice(start, min(start + time_chunk, time_count))
        data.isel({TIME: region}).to_zarr(path, region={TIME: region}, consolidated=False)


# --- small helpers ------------------------------------------------------------------------


def _resolve_sources(sources: Sequence[str | Path]) -> list[Path]:
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ValueError("sources is empty. Pass at least one GRIB or NetCDF file.")

    paths = []
    for source in sources:
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"source file {path} not found")
        if path in paths:
            raise ValueError(f"source file {path} is listed twice")
        paths.append(path)
    return paths


def _describe_source(path: Path) -> SourceFile:
    return SourceFile(path=str(path), sha256=sha256_file(path), size=path.stat().st_size)


def _parse_period(period: tuple[object, object], label: str) -> tuple[datetime, datetime]:
    try:
        start, end = period
        moments = [pd.Timestamp(value) for value in (start, end)]
    except (TypeError, ValueError) as error:
        raise InvalidPeriodError(f"{label} {period!r} is not a (start, end) pair of times: {error}") from error

    naive = [
        moment.tz_convert("UTC").tz_localize(None) if moment.tzinfo is not None else moment for moment in moments
    ]
    if naive[0] > naive[1]:
        raise InvalidPeriodError(f"{label} starts at {naive[0].isoformat()}, after its end {naive[1].isoformat()}")
    return naive[0].to_pydatetime(), naive[1].to_pydatetime()


def _chunks(dataset: xr.Dataset, time_chunk: int) -> dict[str, int]:
    return {dim: (time_chunk if dim == TIME else -1) for dim in dataset.dims}


def _package_versions() -> dict[str, str]:
    versions = package_versions(RECORDED_PACKAGES)
    with contextlib.suppress(ImportError, RuntimeError):
        import eccodes

        versions["eccodes-library"] = eccodes.codes_get_api_version()
    return versions


def _iso(moment: np.datetime64) -> str:
    return str(np.datetime_as_string(np.datetime64(moment, "s"), unit="s"))


def _iso_period(period: tuple[datetime, datetime]) -> tuple[str, str]:
    return period[0].isoformat(timespec="seconds"), period[1].isoformat(timespec="seconds")


def _list_paths(paths: Sequence[Path]) -> str:
    return ", ".join(str(path) for path in paths)
