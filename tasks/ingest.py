"""Ingest ERA5 GRIB or NetCDF files into a normalised Zarr dataset and publish its catalog entry.

Steps of `ingest_era5`:

1. Hash the sources and derive the recipe digest. A complete dataset with that digest is reused.
2. Inspect each GRIB file's message headers with ecCodes (`tasks.grib`), decode each file
   (cfgrib for GRIB, h5netcdf or another NetCDF engine otherwise) and rename it to the
   canonical dimensions `(time, [member,] [level,] latitude, longitude)`.
3. Validate each file and the combined dataset (dimensions, time axis, regular grid).
4. Select variables, crop, apply the longitude convention and coarsen (`tasks.grid`),
   report time gaps, and check the train and test periods.
5. Compute statistics over the train period, normalise, and write Zarr format 3 into a
   temporary folder beside the target, one time chunk at a time, then rename it into
   place. A variable with missing values keeps them as NaN and gets a boolean
   `<var>_mask` variable. The temporary folder and a journal of finished chunks are named
   by the digest, so a run killed half way resumes where it stopped (`tasks.writer`).
   With `grib_decoder="eccodes"`, or "auto" for GRIB inputs of at least
   FAST_PATH_MIN_BYTES, GRIB files that `tasks.decode` supports are indexed from their
   message headers without cfgrib, then decoded and written on a dask cluster.
6. Publish the catalog entry last, so an entry always points at a complete store.

`tasks.append.append_era5` adds later time steps to a published dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import shutil
import sys
import uuid
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import cfgrib
import dask.array  # noqa: F401 - imported with the module (about 0.5 s) rather than inside the first ingest
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from cfgrib.dataset import DatasetBuildError
from gribapi.errors import GribInternalError
from pydantic import ValidationError
from tqdm.auto import tqdm

from data_catalog.catalog import Catalog, content_digest, dataset_digest
from data_catalog.locks import holds_dataset_lock
from data_catalog.schema import DatasetEntry, GridInfo, Provenance, SourceFile, VariableInfo, VariableStatistics
from data_catalog.workspace import package_versions, sha256_file
from tasks import decode, grid, writer
from tasks.grib import SUPPORTED_GRID_TYPES, GribInspectionError, inspect_grib
from tasks.normalise import (
    SCHEMES,
    STATISTICS_GROUP,
    Summary,
    normalise,
    open_statistics,
    statistics_attrs,
    statistics_dataset,
    summarise,
)

if TYPE_CHECKING:
    from dask.distributed import Client

logger = logging.getLogger(__name__)

# Bump when a code change alters the written dataset, so older stores are not reused.
INGEST_FORMAT_VERSION = 3

GRIB_SUFFIXES = frozenset({".grib", ".grb", ".grib1", ".grib2", ".grb1", ".grb2"})
NETCDF_SUFFIXES = frozenset({".nc", ".nc4", ".netcdf", ".cdf"})
# Engines tried in order, each only when its module is installed. h5netcdf reads NetCDF4 (HDF5)
# files, netCDF4 reads both NetCDF4 and classic NetCDF3 files, and scipy reads NetCDF3 only.
NETCDF_ENGINES = (("h5netcdf", "h5netcdf"), ("netcdf4", "netCDF4"), ("scipy", "scipy"))

TIME, MEMBER, LEVEL, LATITUDE, LONGITUDE = "time", "member", "level", "latitude", "longitude"
CANONICAL_DIMS = (TIME, MEMBER, LEVEL, LATITUDE, LONGITUDE)
DIMENSION_ALIASES = {
    "number": MEMBER,
    "isobaricInhPa": LEVEL,
    "pressure_level": LEVEL,
    "lat": LATITUDE,
    "lon": LONGITUDE,
}
# CF standard names used as variable names for ERA5 pressure-level fields, and the ERA5
# short name of each (ECMWF parameter database).
CF_PRESSURE_LEVEL_NAMES = {
    "air_temperature": "t",
    "eastward_wind": "u",
    "northward_wind": "v",
    "lagrangian_tendency_of_air_pressure": "w",
    "specific_humidity": "q",
    "relative_humidity": "r",
    "geopotential": "z",
    "divergence_of_wind": "d",
    "atmosphere_relative_vorticity": "vo",
    "mass_fraction_of_ozone_in_air": "o3",
    "specific_cloud_ice_water_content": "ciwc",
    "specific_cloud_liquid_water_content": "clwc",
    "specific_rain_water_content": "crwc",
    "specific_snow_water_content": "cswc",
    "fraction_of_cloud_cover": "cc",
    "ertel_potential_vorticity": "pv",
}
# CF standard names used as variable names for ERA5 single-level fields, and the ERA5 short
# name of each. A name whose meaning depends on the height above ground maps heights in m
# to short names. The height comes from a scalar `height` coordinate or from the long_name
# ("2 metre temperature"), and without one such a variable keeps its name.
CF_SINGLE_LEVEL_NAMES: dict[str, str | dict[float, str]] = {
    "air_temperature": {2.0: "t2m"},
    "dew_point_temperature": {2.0: "d2m"},
    "eastward_wind": {10.0: "u10", 100.0: "u100"},
    "northward_wind": {10.0: "v10", 100.0: "v100"},
    "wind_speed_of_gust": {10.0: "i10fg"},
    "surface_air_pressure": "sp",
    "air_pressure_at_mean_sea_level": "msl",
    "surface_temperature": "skt",
    "sea_surface_temperature": "sst",
    "sea_ice_area_fraction": "ci",
    "land_binary_mask": "lsm",
    "surface_geopotential": "z",
    "cloud_area_fraction": "tcc",
    "atmosphere_boundary_layer_thickness": "blh",
    "atmosphere_mass_content_of_water_vapor": "tcwv",
    "lwe_thickness_of_precipitation_amount": "tp",
    "lwe_thickness_of_water_evaporation_amount": "e",
    "lwe_thickness_of_surface_snow_amount": "sd",
    "integral_wrt_time_of_surface_downwelling_shortwave_flux_in_air": "ssrd",
    "integral_wrt_time_of_surface_downwelling_longwave_flux_in_air": "strd",
    "integral_wrt_time_of_toa_incoming_shortwave_flux": "tisr",
}
# ERA5 short names (ECMWF parameter database) that ingest keeps when no `variables` are
# selected: the pressure-level parameters and the common single-level ones, with the
# names cfgrib gives them (cfVarName: t2m, u10, siconc, fg10). Other variables, such as
# derived fields that some NetCDF writers add, are skipped with a warning unless they are
# selected by name.
ERA5_SHORT_NAMES = frozenset(
    {
        # pressure levels
        "z", "t", "u", "v", "w", "q", "r", "d", "vo", "o3", "cc", "ciwc", "clwc", "crwc", "cswc", "pv",
        # single levels: temperature, wind, pressure
        "t2m", "d2m", "skt", "sst", "mx2t", "mn2t", "u10", "v10", "u100", "v100", "i10fg", "fg10", "sp", "msl",
        # clouds, columns and convection
        "tcc", "lcc", "mcc", "hcc", "tcw", "tcwv", "tciw", "tclw", "tcrw", "tcsw", "tco3", "blh", "cape", "cin",
        "cbh", "deg0l", "kx", "totalx",
        # precipitation, evaporation, runoff and snow
        "tp", "cp", "lsp", "crr", "lsrr", "csfr", "lssfr", "sf", "e", "pev", "es", "ro", "sro", "ssro", "smlt",
        "sd", "rsn", "asn", "tsn", "ptype",
        # radiation and surface fluxes
        "ssrd", "strd", "ssr", "str", "tsr", "ttr", "tisr", "fdir", "cdir", "slhf", "sshf", "ewss", "nsss",
        "zust", "fsr", "flsr",
        # land, soil, sea ice and invariants
        "stl1", "stl2", "stl3", "stl4", "swvl1", "swvl2", "swvl3", "swvl4", "src", "ci", "siconc", "lsm", "cl",
        "sdor", "slor", "anor", "isor", "cvl", "cvh", "tvl", "tvh", "lai_lv", "lai_hv", "lict", "licd", "lmlt",
        "lshf", "ltlt", "lmld", "slt", "sdfor", "chnk",
        # ocean waves
        "swh", "mwd", "mwp", "pp1d", "mp2", "wmb", "shww", "mdww", "mpww", "shts", "mdts", "mpts",
    }
)
KEPT_VARIABLE_ATTRS = ("units", "long_name", "standard_name")
# Level units that mean hPa, and the factor that converts other pressure units to hPa.
HPA_UNITS = frozenset({"hPa", "hpa", "millibars", "millibar", "mbar", "mb"})
PRESSURE_TO_HPA = {"Pa": 0.01, "pa": 0.01, "kPa": 10.0}
ON_TIME_GAPS = ("error", "keep")
GRIB_DECODERS = ("auto", "cfgrib", "eccodes")
# With grib_decoder "auto", datasets of fewer float32 bytes than this decode with cfgrib,
# where starting worker processes would cost more than it saves.
# NOTE: an estimate, not measured; the UK demo file (4.8 MB) decodes in about a second with cfgrib.
FAST_PATH_MIN_BYTES = 32 * 2**20
MASK_SUFFIX = "_mask"
RECORDED_PACKAGES = ("xarray", "zarr", "cfgrib", "eccodes", "eccodeslib", "numpy", "dask", "h5netcdf")

# Relative tolerance when checking that grid coordinates are evenly spaced.
_GRID_STEP_RTOL = 1e-6
# At most this many time gaps are listed in a message; the catalog entry lists all of them.
_MAX_LISTED_GAPS = 20


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


@holds_dataset_lock("ingest")
def ingest_era5(
    sources: Sequence[str | Path | xr.Dataset],
    name: str,
    train_period: tuple[str, str],
    test_period: tuple[str, str] | None,
    variables: list[str] | None = None,
    time_chunk: int = 24,
    catalog: Catalog | None = None,
    area: Sequence[float] | None = None,
    longitude_convention: str = grid.DEFAULT_LONGITUDE_CONVENTION,
    coarsen_factor: int = 1,
    normalisation: dict[str, str] | None = None,
    on_time_gaps: str = "error",
    grib_decoder: str = "auto",
    scheduler_address: str | None = None,
) -> IngestResult:
    """Decode, validate and normalise ERA5 files into `<catalog root>/data/<name>.zarr`.

    `sources` are GRIB or NetCDF files: one file, files split by time, or one file per
    variable. A source may also be an opened dataset that carries a provenance record in
    `attrs[SOURCE_RECORD_ATTR]`, as `tasks.sources` opens CDS downloads and Zarr stores. Periods are inclusive `(start, end)` times that must lie inside the data and
    must not overlap. `test_period` None marks a dataset that is not evaluated, for
    example a single time step. `variables` selects variables by name. By default every
    ERA5 parameter is kept and other variables are skipped with a warning (see
    `select_variables`). Statistics come from `train_period` only.

    Grid options (`tasks.grid`): `area = (north, west, south, east)` in degrees crops the
    grid, also across the 180° or 0° meridian. `longitude_convention` is "-180..180"
    (default) or "0..360". `coarsen_factor` block-averages that many points in each
    direction with cell-area weights (1 keeps the grid).

    `normalisation` maps variables to "global" (one mean and std per level, the default)
    or "local" (per calendar month, level and grid point); see `tasks.normalise`.
    `on_time_gaps` is "error" (default) to reject missing or irregular time steps, or
    "keep" to keep them with their true times. Either way the gaps are listed, in the
    error or in the log and the catalog entry. Ensemble members are kept as the `member`
    dimension.

    `grib_decoder` chooses how GRIB data are decoded. "cfgrib" always decodes through
    xarray and cfgrib. "eccodes" uses the ecCodes path of `tasks.decode` wherever it
    applies, and falls back to cfgrib with a log line otherwise. "auto" (default) acts
    like "eccodes" once the dataset exceeds FAST_PATH_MIN_BYTES. Both give identical stores.
    The ecCodes path decodes and writes on a dask.distributed cluster: a local cluster of
    one worker process per core, started once per ingest, or the existing cluster at
    `scheduler_address` (tcp://HOST:PORT). While a local cluster starts, the statistics
    pass decodes on threads of this process. Neither option is part of the digest.
    The local cluster's worker processes import the calling script, so a script must call
    `ingest_era5` under `if __name__ == "__main__":`. Without that guard the workers fail
    to start, and the store is written on threads of this process with a warning that
    names the script.

    The call holds the lock of `name` in the catalog's workspace (`data_catalog.locks`), so a
    second ingest or append of the same name at the same time raises DatasetLockedError
    at once, naming the lock file and its holder.

    Returns `reused=True` without writing when the catalog already has `name` with the
    same digest and its store is complete. A failure at any step leaves no new
    `<name>.zarr` and no new catalog entry. A previous dataset of the same name stays
    published, unless the failure happens during the final swap, after its entry was removed.
    """
    catalog = catalog if catalog is not None else Catalog()
    target = catalog.default_zarr_path(name)
    paths = _resolve_sources(sources)
    labels = [_source_label(source) for source in paths]
    if time_chunk < 1:
        raise ValueError(f"time_chunk must be a positive number of time steps, got {time_chunk}")
    train = _parse_period(train_period, "train_period")
    test = _parse_period(test_period, "test_period")
    _check_options(area, longitude_convention, coarsen_factor, normalisation, on_time_gaps)
    if grib_decoder not in GRIB_DECODERS:
        raise ValueError(f"grib_decoder {grib_decoder!r} is unknown: use one of {list(GRIB_DECODERS)}")

    if scheduler_address is None and grib_decoder != "cfgrib" and _all_grib(paths):
        # The workers' forkserver imports its modules while the sources are hashed and indexed.
        decode.prepare_local_workers()
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Without a published entry of `name` nothing can be reused, so the GRIB headers are
        # indexed while the sources are hashed: hashlib and ecCodes release the GIL.
        indexing = pool.submit(_open_fast, paths, time_chunk, grib_decoder) if name not in catalog else None
        source_files = [_describe_source(source) for source in paths]
        fast = indexing.result() if indexing is not None else None
    parameters = {
        "format_version": INGEST_FORMAT_VERSION,
        "variables": sorted(variables) if variables is not None else None,
        "train_period": list(_iso_period(train)),
        "test_period": list(_iso_period(test)) if test is not None else None,
        "time_chunk": time_chunk,
        "area": [float(value) for value in area] if area is not None else None,
        "longitude_convention": longitude_convention,
        "coarsen_factor": coarsen_factor,
        "normalisation": dict(sorted((normalisation or {}).items())),
        "on_time_gaps": on_time_gaps,
    }
    digest = dataset_digest([source.sha256 for source in source_files], parameters)

    reusable = _find_reusable_entry(catalog, name, digest)
    if reusable is not None:
        logger.info("dataset %s with digest %s is complete at %s, so it is reused", name, digest[:12], target)
        return IngestResult(entry=reusable, reused=True, zarr_path=catalog.resolve_zarr_path(reusable))

    logger.info("ingesting %d source(s) into dataset %s (digest %s)", len(paths), name, digest[:12])
    if indexing is None:
        fast = _open_fast(paths, time_chunk, grib_decoder)
    dataset = open_sources(paths, time_chunk) if fast is None else fast[0]
    dataset = select_variables(dataset, variables, labels)
    where = _list_paths(labels)
    dataset = regrid(dataset, where, area, longitude_convention, coarsen_factor)
    dataset = dataset.chunk(_chunks(dataset, time_chunk))
    time_step, time_gaps = check_time_gaps(dataset[TIME].values, where, on_time_gaps)
    validate_periods(dataset, train, test)

    plan = None
    if fast is not None:
        plan = decode.plan_fast_path(
            fast[1],
            dataset,
            lambda probe: regrid(probe, where, area, longitude_convention, coarsen_factor),
            coarsen_factor,
        )

    writer.discard_other_recipes(target, digest)
    # The cluster is started once, in the background, and writes the store. The statistics
    # pass runs on threads of this process while a local cluster starts, or on an existing
    # cluster, so that it scales out with it.
    cluster = decode.background_client(scheduler_address) if plan is not None else contextlib.nullcontext()
    with cluster as starting:
        journal = writer.load_journal(target, digest)
        if journal is None:
            try:
                if plan is not None:
                    runner = starting.result() if scheduler_address is not None else os.cpu_count() or 1
                    summary = decode.summarise_fast(plan, dataset, _iso_period(train), normalisation, time_chunk, runner)
                else:
                    summary = summarise(dataset, _iso_period(train), normalisation)
            except GribInternalError as error:
                raise InvalidSourceError(f"cannot decode GRIB data from {where}: {error}") from error
            statistics, missing = summary.statistics, summary.missing
            entry = _build_entry(
                dataset, name, target, (train, test), summary, (time_step, time_gaps), source_files, parameters,
                digest, time_chunk,
            )
            journal = writer.IngestJournal(
                digest=digest, entry=entry, time_chunk=time_chunk, region_count=-(-dataset.sizes[TIME] // time_chunk)
            )
        else:
            # The statistics, missing-value counts and entry of the interrupted run are kept, so
            # the resumed store is the one an uninterrupted run writes.
            logger.info(
                "resuming the ingest of %s: %d of %d time regions were written before it stopped",
                name, len(journal.completed), journal.region_count,
            )
            entry = journal.entry
            statistics = open_statistics(writer.temporary_store_path(target, digest))
            missing = {variable: info.missing_values for variable, info in entry.variables.items()}

        normalised = normalise(dataset, statistics).astype(np.float32)
        normalised = add_masks(normalised, dataset, missing)
        normalised.attrs = _store_attrs(entry)
        workers = None
        if plan is not None:
            runner = _local_runner(starting) if scheduler_address is None else starting.result()
            workers = (decode.PassContext(plan=plan, mode="write", statistics=statistics), runner)
        published = _write_and_publish(normalised, statistics_dataset(statistics), journal, catalog, target, workers)
    return IngestResult(entry=published, reused=False, zarr_path=target)


def _local_runner(starting: Future) -> Client | int:
    """Return the client of the local cluster, or a number of threads of this process when it failed to start.

    The usual cause of a failed start is a script that calls `ingest_era5` at top level:
    each worker process imports the calling script, so it runs the ingest again and fails.
    """
    try:
        return starting.result()
    except (RuntimeError, OSError, TimeoutError) as error:
        threads = os.cpu_count() or 1
        main = sys.modules.get("__main__")
        script = getattr(main, "__file__", None) if getattr(main, "__spec__", None) is None else None
        hint = (
            f" Worker processes import the calling script {script}, so a script that calls ingest_era5 at top "
            'level must put the call under `if __name__ == "__main__":`.'
            if script is not None
            else ""
        )
        logger.warning(
            "the local dask cluster failed to start (%s: %s), so the store is written on %d thread(s) of this "
            "process instead.%s",
            type(error).__name__, error, threads, hint,
        )
        return threads


def _all_grib(paths: Sequence[Path | xr.Dataset]) -> bool:
    return all(isinstance(path, Path) and path.suffix.lower() in GRIB_SUFFIXES for path in paths)


def _open_fast(
    paths: Sequence[Path | xr.Dataset], time_chunk: int, grib_decoder: str
) -> tuple[xr.Dataset, decode.FastPlan] | None:
    """Return the canonical dataset and plan of the ecCodes path when `grib_decoder` selects it and it applies, else None."""
    if grib_decoder == "cfgrib":
        return None
    if not _all_grib(paths):
        logger.info("ingest decodes with cfgrib, not the fast ecCodes path, because a source is not a GRIB file")
        return None
    try:
        fast = decode.open_grib_fast(paths, time_chunk, canonicalise)
    except GribInspectionError as error:
        raise InvalidSourceError(str(error)) from error
    if fast is None:
        return None

    dataset = fast[0]
    validate_combined(dataset, paths)
    size = sum(values.size * 4 for values in dataset.data_vars.values())
    if grib_decoder == "auto" and size < FAST_PATH_MIN_BYTES:
        return None
    return fast


# --- sources: decoding and canonical form -------------------------------------------------


def open_sources(sources: Sequence[Path | xr.Dataset], time_chunk: int = 24) -> xr.Dataset:
    """Decode, canonicalise and validate every file or opened dataset, then combine them into one dataset.

    Returns dask-backed variables chunked `time_chunk` steps along time, with dims
    `(time, [level,] latitude, longitude)`.
    """
    # An opened dataset is named by the path of its provenance record in error messages.
    paths = [_source_label(source) for source in sources]
    datasets = []
    for source, path in zip(sources, paths, strict=True):
        opened = source if isinstance(source, xr.Dataset) else open_source(source)
        dataset = canonicalise(opened, path)
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
    """Inspect the message headers, then decode the file; several level types are decoded apart and merged."""
    try:
        inspect_grib(path)
    except GribInspectionError as error:
        raise InvalidSourceError(str(error)) from error

    # indexpath "" keeps cfgrib's index in memory, so nothing is written beside the input.
    # errors "raise" turns a truncated message into an exception instead of a smaller dataset.
    backend_kwargs = {"indexpath": "", "errors": "raise"}
    try:
        try:
            return xr.open_dataset(path, engine="cfgrib", backend_kwargs=backend_kwargs, decode_timedelta=True)
        except DatasetBuildError as error:
            logger.info("GRIB file %s mixes level types (%s), so each is decoded apart", path, str(error).splitlines()[0])
            parts = cfgrib.open_datasets(path, backend_kwargs=backend_kwargs, decode_timedelta=True)
    except (GribInternalError, DatasetBuildError, EOFError, OSError) as error:
        raise InvalidSourceError(
            f"cannot decode GRIB file {path}: {type(error).__name__}: {error}. The file may be "
            "truncated or corrupted (download it again), or mix kinds of fields that cfgrib cannot "
            "separate (split it into one file per kind)."
        ) from error
    return _merge_level_types(parts, path)


def _merge_level_types(parts: list[xr.Dataset], path: Path) -> xr.Dataset:
    """Merge cfgrib's per-level-type datasets of one file, with every pressure level in hPa.

    Parts must share their times, steps, members and grid, so the merge adds levels and
    variables but never fills missing fields with NaN.
    """
    parts = [_canonical_level(part, path) for part in parts]
    shared = ("time", "step", "valid_time", "number", LATITUDE, LONGITUDE)
    for part in parts[1:]:
        for name in shared:
            if name in part.variables and name in parts[0].variables and not parts[0][name].equals(part[name]):
                raise InvalidSourceError(
                    f"GRIB file {path} has level types with different {name} values, so they cannot form one "
                    "dataset. Split the file into one file per level type."
                )
    try:
        return xr.merge(parts, compat="no_conflicts", join="outer", combine_attrs="drop_conflicts")
    except ValueError as error:
        raise InvalidSourceError(
            f"cannot merge the level types of GRIB file {path}: {error}. Split the file into one file per level type."
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

    Time becomes the valid time. Ensemble members (cfgrib's `number`) become `member`.
    Pressure levels become `level` in hPa, ascending. Latitude runs north to south and
    longitude ascends. Variable attrs keep only units, long_name and standard_name, and
    source encodings (packing, fill values) are dropped. Raises InvalidSourceError for a
    grid that is not regular latitude-longitude.
    """
    _check_regular_grid(dataset, path)
    dataset = _canonical_time(dataset, path)
    dataset = _canonical_level(dataset, path)
    dataset = dataset.rename({old: new for old, new in DIMENSION_ALIASES.items() if old in dataset.variables})
    dataset = _era5_short_names(dataset, path)

    auxiliary = [name for name in dataset.coords if name not in dataset.dims]
    dataset = dataset.drop_vars(auxiliary)

    unsupported = sorted(set(dataset.dims) - set(CANONICAL_DIMS))
    if unsupported:
        raise InvalidSourceError(
            f"source {path} has unsupported dimensions {unsupported} (supported: {list(CANONICAL_DIMS)}). "
            "Select a single forecast step or level type before ingesting."
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


def _era5_short_names(dataset: xr.Dataset, path: Path | str) -> xr.Dataset:
    """Rename variables named by their CF standard name to ERA5 short names.

    Some NetCDF writers (pycontrails, for example) name ERA5 fields `air_temperature`,
    `eastward_wind` and so on. Variables with a `level` dimension follow
    CF_PRESSURE_LEVEL_NAMES, the others CF_SINGLE_LEVEL_NAMES, where `air_temperature` at a
    height of 2 m becomes t2m. A name is kept when its short name exists already.
    """
    renames = {}
    for name, values in dataset.data_vars.items():
        if LEVEL in values.dims:
            short = CF_PRESSURE_LEVEL_NAMES.get(str(name))
        else:
            short = CF_SINGLE_LEVEL_NAMES.get(str(name))
            if isinstance(short, dict):
                short = short.get(_height_above_ground(values))
        if short is not None and short not in dataset.variables and short not in renames.values():
            renames[str(name)] = short
    if renames:
        logger.info("renaming CF standard names in %s to ERA5 short names: %s", path, renames)
    return dataset.rename(renames)


def _height_above_ground(values: xr.DataArray) -> float | None:
    """Return the height in m of a single-level field, from a scalar `height` coordinate or the long_name, else None."""
    height = values.coords.get("height")
    if height is not None and height.ndim == 0 and str(height.attrs.get("units", "m")) in ("m", "metre", "meters", "metres"):
        return float(height.values)
    match = re.search(r"\b(\d+) ?(?:metre|meter|m)\b", str(values.attrs.get("long_name", "")))
    return float(match.group(1)) if match else None


def _check_regular_grid(dataset: xr.Dataset, path: Path | str) -> None:
    """Raise for a GRIB grid type other than regular_ll, or for 2-D latitude or longitude coordinates."""
    grid_types = {str(values.attrs["GRIB_gridType"]) for values in dataset.data_vars.values() if "GRIB_gridType" in values.attrs}
    unsupported = sorted(grid_types - SUPPORTED_GRID_TYPES)
    if unsupported:
        raise InvalidSourceError(
            f"source {path} has grid type(s) {unsupported} (GRIB_gridType), but ingest needs a regular "
            "latitude-longitude grid ('regular_ll'). Interpolate the data to a regular lat-lon grid first."
        )
    for name in (LATITUDE, LONGITUDE, "lat", "lon"):
        if name in dataset.variables and dataset[name].ndim > 1:
            raise InvalidSourceError(
                f"source {path} has a {dataset[name].ndim}-D {name} coordinate with dims {dataset[name].dims}: a "
                "projected or curvilinear grid (such as Lambert conformal), but ingest needs a regular "
                "latitude-longitude grid. Interpolate the data to a regular lat-lon grid first."
            )


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


def _canonical_level(dataset: xr.Dataset, path: Path | str) -> xr.Dataset:
    """Rename the pressure coordinate to `level` in hPa, and turn a scalar level into a length-1 dimension.

    Levels in Pa (cfgrib's `isobaricInPa`, or units "Pa") are divided by 100. Raises
    InvalidSourceError for level units that are not a pressure.
    """
    if "isobaricInPa" in dataset.variables:
        dataset = dataset.rename({"isobaricInPa": LEVEL})
        dataset[LEVEL].attrs["units"] = "Pa"
    for alias, canonical in DIMENSION_ALIASES.items():
        if canonical == LEVEL and alias in dataset.variables:
            dataset = dataset.rename({alias: LEVEL})

    if LEVEL not in dataset.variables:
        return dataset
    units = str(dataset[LEVEL].attrs.get("units", "hPa"))
    if units in PRESSURE_TO_HPA:
        in_hpa = dataset[LEVEL].astype(np.float64) * PRESSURE_TO_HPA[units]
    elif units in HPA_UNITS:
        in_hpa = dataset[LEVEL].astype(np.float64)
    else:
        raise InvalidSourceError(
            f"level coordinate of {path} has units {units!r}, but ingest expects pressure levels in hPa or Pa"
        )
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


def validate_combined(dataset: xr.Dataset, paths: Sequence[Path | str]) -> None:
    """Check the combined dataset: increasing time without duplicates, and a regular grid.

    Gaps in the time axis are left to `check_time_gaps`.
    """
    where = _list_paths(paths)
    _check_time_axis(dataset[TIME].values, where)

    for dim in (LATITUDE, LONGITUDE):
        coordinate = dataset[dim].values
        if coordinate.size > 1:
            steps = np.diff(coordinate)
            if dim == LONGITUDE and not _evenly_spaced(steps):
                # A regional grid in 0..360 that crosses 0° is sorted as 0, 0.25, ..., 350, ...:
                # it is regular once rolled to start west of 0°, as `regrid` does later.
                contiguous = grid.contiguous_longitude_steps(coordinate)
                steps = contiguous if _evenly_spaced(contiguous) else steps
            if not _evenly_spaced(steps):
                raise InvalidSourceError(
                    f"{dim} of {where} is not evenly spaced (steps from {steps.min()} to {steps.max()} "
                    "degrees), but ingest expects a regular latitude-longitude grid"
                )


def _evenly_spaced(steps: np.ndarray) -> bool:
    return bool(np.allclose(steps, steps[0], rtol=_GRID_STEP_RTOL, atol=0.0))


def check_time_gaps(
    times: np.ndarray, where: str, on_time_gaps: str = "error"
) -> tuple[np.timedelta64, list[tuple[np.datetime64, np.datetime64]]]:
    """Find the regular time step and the intervals that differ from it.

    times: [T] increasing datetime64. The regular step is the most common difference
    between consecutive times (the smaller one on a tie), and 0 for a single time. Each
    gap is `(time before, time after)` of a difference other than the step, so a missing
    step or an irregular one. With `on_time_gaps` "error" gaps raise InvalidSourceError
    listing them; with "keep" they are logged and returned.
    """
    if times.size < 2:
        return np.timedelta64(0, "ns"), []
    steps = np.diff(times)
    values, counts = np.unique(steps, return_counts=True)
    step = values[int(np.argmax(counts))]
    gaps = [(times[index], times[index + 1]) for index in np.flatnonzero(steps != step)]
    if not gaps:
        return step, []

    listing = _describe_gaps(gaps, step)
    if on_time_gaps == "error":
        raise InvalidSourceError(
            f"time axis of {where} is not regular: the step is {format_step(step)}, but {len(gaps)} interval(s) "
            f"differ: {listing}. Add the missing time steps, or pass on_time_gaps='keep' (`--on-time-gaps keep`) to keep the true times "
            "(training windows then skip the gaps)."
        )
    logger.warning(
        "time axis of %s has %d gap(s) or irregular step(s), kept with their true times: %s", where, len(gaps), listing
    )
    return step, gaps


def format_step(step: np.timedelta64) -> str:
    """Format a time step in its largest whole unit: "1 h", "2 days", "30 min", "90 s"."""
    seconds = pd.Timedelta(step).total_seconds()
    for unit, singular, plural in ((86400, "day", "days"), (3600, "h", "h"), (60, "min", "min"), (1, "s", "s")):
        if seconds % unit == 0 and seconds >= unit:
            count = int(seconds // unit)
            return f"{count} {singular if count == 1 else plural}"
    return f"{seconds:g} s"


def _describe_gaps(gaps: Sequence[tuple[np.datetime64, np.datetime64]], step: np.timedelta64) -> str:
    listed = []
    for before, after in gaps[:_MAX_LISTED_GAPS]:
        missing = int((after - before) // step) - 1 if (after - before) % step == np.timedelta64(0) else None
        detail = f"{missing} step(s) missing" if missing else "irregular step"
        listed.append(f"{_iso(before)} to {_iso(after)} ({detail})")
    more = f" and {len(gaps) - _MAX_LISTED_GAPS} more" if len(gaps) > _MAX_LISTED_GAPS else ""
    return "; ".join(listed) + more


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


def _check_disjoint_times(datasets: Sequence[xr.Dataset], paths: Sequence[Path | str]) -> None:
    """Raise when the files do not fit together into one dataset.

    That is when their grids differ, when a variable is missing from the files of some
    times, or when two files give one variable at the same time. In the last case the
    message states whether the repeated values are identical or differ.
    """
    _check_same_grid(datasets, paths)
    _check_variables_cover_times(datasets, paths)

    owners: dict[str, list[tuple[Path | str, xr.Dataset]]] = defaultdict(list)
    for dataset, path in zip(datasets, paths, strict=True):
        for variable in dataset.data_vars:
            owners[str(variable)].append((path, dataset))
    for variable, files in owners.items():
        for index, (first_path, first) in enumerate(files):
            for second_path, second in files[index + 1 :]:
                shared = np.intersect1d(first[TIME].values, second[TIME].values)
                if shared.size:
                    raise InvalidSourceError(
                        f"variable {variable!r} appears at {shared.size} identical time(s) (first "
                        f"{_iso(shared[0])}) in both {first_path} and {second_path}, "
                        f"{_compare_repeats(first[variable], second[variable], shared)}. Remove one of the files "
                        "or cut the overlap."
                    )


def _compare_repeats(first: xr.DataArray, second: xr.DataArray, times: np.ndarray) -> str:
    """Describe whether two files give the same values at their shared times."""
    first_values = first.sel({TIME: times}).values
    second_values = second.sel({TIME: times}).values
    if first_values.shape != second_values.shape:
        return "with different shapes"
    axes = tuple(range(1, first_values.ndim))
    differs = ~((first_values == second_values) | (np.isnan(first_values) & np.isnan(second_values))).all(axis=axes)
    if not differs.any():
        return "with the same values"
    return f"with different values at {int(differs.sum())} of them (first {_iso(times[np.argmax(differs)])})"


def _check_same_grid(datasets: Sequence[xr.Dataset], paths: Sequence[Path | str]) -> None:
    reference = datasets[0]
    for dataset, path in zip(datasets[1:], paths[1:], strict=True):
        for dim in (LATITUDE, LONGITUDE):
            first, other = reference[dim].values, dataset[dim].values
            if first.shape != other.shape or not np.allclose(first, other, rtol=0.0, atol=1e-6):
                raise InvalidSourceError(
                    f"files {paths[0]} and {path} have different grids or resolutions: {_describe_grid(reference)} "
                    f"against {_describe_grid(dataset)}. Regrid them to one grid, or ingest them as separate datasets."
                )


def _describe_grid(dataset: xr.Dataset) -> str:
    latitude, longitude = dataset[LATITUDE].values, dataset[LONGITUDE].values
    step = abs(float(latitude[1] - latitude[0])) if latitude.size > 1 else float("nan")
    return (
        f"{latitude.size} x {longitude.size} points, latitude {latitude[0]:g} to {latitude[-1]:g}, "
        f"longitude {longitude[0]:g} to {longitude[-1]:g}, step {step:g} degrees"
    )


def _check_variables_cover_times(datasets: Sequence[xr.Dataset], paths: Sequence[Path | str]) -> None:
    """Raise when a variable is missing at times that other files provide."""
    all_times = np.unique(np.concatenate([dataset[TIME].values for dataset in datasets]))
    variables = sorted({str(variable) for dataset in datasets for variable in dataset.data_vars})
    for variable in variables:
        holders = [dataset for dataset in datasets if variable in dataset.data_vars]
        covered = np.unique(np.concatenate([dataset[TIME].values for dataset in holders]))
        if covered.size == all_times.size:
            continue
        lacking = [
            (path, dataset)
            for dataset, path in zip(datasets, paths, strict=True)
            if variable not in dataset.data_vars and not np.isin(dataset[TIME].values, covered).all()
        ]
        path, dataset = lacking[0]
        raise InvalidSourceError(
            f"variable {variable!r} is missing from {path} (times {_iso(dataset[TIME].values[0])} to "
            f"{_iso(dataset[TIME].values[-1])}, variables {sorted(map(str, dataset.data_vars))}), while other files "
            "give it. Every time step needs every variable: add the variable or select common variables with "
            "`variables`."
        )


def select_variables(dataset: xr.Dataset, variables: list[str] | None, paths: Sequence[Path]) -> xr.Dataset:
    """Keep the requested variables, or every ERA5 parameter (ERA5_SHORT_NAMES) when `variables` is None.

    With `variables` None, the other variables are skipped with a warning that names them
    and says how to keep them. Raises InvalidSourceError naming the missing variables and
    listing the available ones, or when no variable is an ERA5 parameter.
    """
    if variables is None:
        return _drop_unknown_parameters(dataset, paths)
    if not variables:
        raise ValueError("variables is an empty list. Pass None to keep all variables.")
    missing = [variable for variable in variables if variable not in dataset.data_vars]
    if missing:
        raise InvalidSourceError(
            f"variables {missing} not found in {_list_paths(paths)} "
            f"(available: {sorted(map(str, dataset.data_vars))})"
        )
    return dataset[list(variables)]


def _drop_unknown_parameters(dataset: xr.Dataset, paths: Sequence[Path]) -> xr.Dataset:
    available = sorted(map(str, dataset.data_vars))
    unknown = [name for name in available if name not in ERA5_SHORT_NAMES]
    if not unknown:
        return dataset
    if len(unknown) == len(available):
        raise InvalidSourceError(
            f"no variable of {_list_paths(paths)} is an ERA5 parameter (variables: {available}). Select the "
            "variables to ingest by name with `variables` (`--variables`)."
        )
    kept = [name for name in available if name not in unknown]
    logger.warning(
        "skipping variables %s of %s: they are not ERA5 parameters (tasks.ingest.ERA5_SHORT_NAMES). To ingest "
        "them, select them by name with `variables` (`--variables`), for example %s",
        unknown, _list_paths(paths), kept + unknown,
    )
    return dataset[[name for name in dataset.data_vars if str(name) in kept]]


def validate_periods(
    dataset: xr.Dataset, train: tuple[datetime, datetime], test: tuple[datetime, datetime] | None
) -> None:
    """Check that both periods lie inside the data, select at least one step and do not overlap.

    `test` None skips the checks of the test period.
    """
    times = dataset[TIME].values
    first, last = times[0], times[-1]
    periods = [("train_period", train)] + ([("test_period", test)] if test is not None else [])
    for label, (start, end) in periods:
        start64, end64 = np.datetime64(start, "ns"), np.datetime64(end, "ns")
        if start64 < first or end64 > last:
            raise InvalidPeriodError(f"{label} {_iso_period((start, end))} is outside the data: {_describe_times(times)}")
        if not np.any((times >= start64) & (times <= end64)):
            raise InvalidPeriodError(
                f"{label} {_iso_period((start, end))} contains no time step of the data: {_describe_times(times)}"
            )

    if test is not None and train[0] <= test[1] and test[0] <= train[1]:
        raise InvalidPeriodError(
            f"train_period {_iso_period(train)} overlaps test_period {_iso_period(test)}. "
            "Choose disjoint periods, so the test period does not inform the normalisation statistics."
        )


def _describe_times(times: np.ndarray) -> str:
    """Describe the valid times of the data for a period error, listing them when there are few."""
    if times.size == 1:
        return (
            f"it has a single valid time, {_iso(times[0])}. Use it as both start and end of train_period, "
            "with no test period (`--test-period none none`)"
        )
    if times.size <= 4:
        return f"its valid times are {', '.join(_iso(time) for time in times)}"
    return f"it covers {_iso(times[0])} .. {_iso(times[-1])} ({times.size} time steps)"


def regrid(
    dataset: xr.Dataset,
    where: str,
    area: Sequence[float] | None = None,
    longitude_convention: str = grid.DEFAULT_LONGITUDE_CONVENTION,
    coarsen_factor: int = 1,
) -> xr.Dataset:
    """Crop to `area`, wrap and sort longitudes into `longitude_convention`, then coarsen; see `tasks.grid`.

    Raises tasks.grid.InvalidGridError naming the area, the convention or `where`.
    """
    if area is not None:
        dataset = grid.crop_area(dataset, area, where)
    dataset = grid.apply_longitude_convention(dataset, longitude_convention, where)
    return grid.coarsen(dataset, coarsen_factor)


def add_masks(normalised: xr.Dataset, source: xr.Dataset, missing: dict[str, int]) -> xr.Dataset:
    """Add a boolean `<var>_mask` (True where the source value is missing) for each variable with NaN values.

    The data variable names its mask in the CF attribute `ancillary_variables`.
    """
    masks = {}
    for variable, count in missing.items():
        if count == 0:
            continue
        mask_name = f"{variable}{MASK_SUFFIX}"
        if mask_name in source.variables:
            raise InvalidSourceError(f"variable {mask_name!r} clashes with the mask name of variable {variable!r}")
        mask = source[variable].isnull()
        mask.attrs = {"long_name": f"missing values of {variable}", "flag_meanings": "missing"}
        masks[mask_name] = mask
        normalised[variable] = normalised[variable].assign_attrs(ancillary_variables=mask_name)
        logger.info("variable %s has %d missing values, kept as NaN and flagged in %s", variable, count, mask_name)
    return normalised.assign(masks)


def _check_options(
    area: Sequence[float] | None,
    longitude_convention: str,
    coarsen_factor: int,
    normalisation: dict[str, str] | None,
    on_time_gaps: str,
) -> None:
    """Raise ValueError for an invalid grid, normalisation or time gap option before any file is read."""
    if area is not None:
        grid.check_area(area)
    if longitude_convention not in grid.LONGITUDE_CONVENTIONS:
        raise ValueError(
            f"longitude_convention {longitude_convention!r} is unknown: use one of {list(grid.LONGITUDE_CONVENTIONS)}"
        )
    if isinstance(coarsen_factor, bool) or not isinstance(coarsen_factor, int) or coarsen_factor < 1:
        raise ValueError(f"coarsen_factor must be a positive integer, got {coarsen_factor!r}")
    for variable, scheme in (normalisation or {}).items():
        if scheme not in SCHEMES:
            raise ValueError(f"normalisation of {variable!r} is {scheme!r}: use one of {list(SCHEMES)}")
    if on_time_gaps not in ON_TIME_GAPS:
        raise ValueError(f"on_time_gaps {on_time_gaps!r} is unknown: use one of {list(ON_TIME_GAPS)}")


# --- catalog entry, reuse and writing -----------------------------------------------------


def _build_entry(
    dataset: xr.Dataset,
    name: str,
    target: Path,
    periods: tuple[tuple[datetime, datetime], tuple[datetime, datetime] | None],
    summary: Summary,
    time_axis: tuple[np.timedelta64, list[tuple[np.datetime64, np.datetime64]]],
    source_files: list[SourceFile],
    parameters: dict[str, object],
    digest: str,
    time_chunk: int,
) -> DatasetEntry:
    created = datetime.now(timezone.utc)
    train, test = periods
    time_step, time_gaps = time_axis
    times = dataset[TIME].values
    latitude = dataset[LATITUDE].values
    longitude = dataset[LONGITUDE].values
    variables = {
        str(variable): VariableInfo(
            units=values.attrs["units"],
            long_name=values.attrs.get("long_name"),
            standard_name=values.attrs.get("standard_name"),
            has_levels=LEVEL in values.dims,
            missing_values=summary.missing[str(variable)],
            mask=f"{variable}{MASK_SUFFIX}" if summary.missing[str(variable)] else None,
        )
        for variable, values in dataset.data_vars.items()
    }
    statistics = statistics_attrs(summary.statistics)

    return DatasetEntry(
        name=name,
        zarr_path=str(target),
        variables=variables,
        levels=dataset[LEVEL].values.tolist() if LEVEL in dataset.dims else None,
        members=dataset[MEMBER].values.astype(int).tolist() if MEMBER in dataset.dims else None,
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
        time_step=pd.Timedelta(time_step).to_pytimedelta(),
        time_count=int(times.size),
        time_chunk=time_chunk,
        time_gaps=[(pd.Timestamp(before).to_pydatetime(), pd.Timestamp(after).to_pydatetime()) for before, after in time_gaps],
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
    """Return the Zarr root attributes as JSON values.

    They are the name, statistics, periods, time gaps, provenance, recipe digest, content
    digest and version. The content digest is None until the store is written.
    """
    document = entry.model_dump(mode="json")
    return {
        "name": entry.name,
        **content_metadata(entry),
        "time_gaps": document["time_gaps"],
        "provenance": document["provenance"],
        "digest": entry.digest,
        "content_digest": entry.content_digest,
        "version": entry.version,
    }


def content_metadata(entry: DatasetEntry) -> dict[str, object]:
    """Return what the content digest covers besides the store's arrays: statistics and periods, as JSON values.

    Global statistics live only in the entry and the root attributes, so they are hashed
    from here. Local statistics arrays are hashed as files of the store as well.
    """
    document = entry.model_dump(mode="json")
    return {
        "statistics": {
            variable: statistics.model_dump(mode="json", exclude_none=True)
            for variable, statistics in entry.statistics.items()
        },
        "train_period": document["train_period"],
        "test_period": document["test_period"],
    }


def finish_store(store: Path, entry: DatasetEntry, catalog: Catalog) -> DatasetEntry:
    """Compute the content digest of the written `store`, pick the version, and add both to its attributes.

    Returns `entry` with `content_digest` and `version` set. Call it before the entry is
    published, and before an older entry of the same name is removed, because the version
    is taken from that entry (`Catalog.next_version`).
    """
    digest = content_digest(store, content_metadata(entry))
    version = catalog.next_version(entry.name, digest)
    finished = DatasetEntry.model_validate({**entry.model_dump(), "content_digest": digest, "version": version})
    zarr.open_group(store, mode="r+").attrs.update({"content_digest": digest, "version": version})
    return finished


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
    expected = set(entry.variables) | {info.mask for info in entry.variables.values() if info.mask}
    with store:
        complete = (
            store.attrs.get("digest") == digest
            and set(map(str, store.data_vars)) == expected
            and store.sizes.get(TIME) == entry.time_count
        )
    if not complete:
        logger.warning("Zarr store %s does not match catalog entry %s, so the dataset is ingested again", path, name)
        return None
    return entry


def _write_and_publish(
    dataset: xr.Dataset,
    statistics_arrays: xr.Dataset,
    journal: writer.IngestJournal,
    catalog: Catalog,
    target: Path,
    workers: tuple[decode.PassContext, Client | int] | None = None,
) -> DatasetEntry:
    """Write the store into its temporary folder, swap it into place, then publish and return the entry.

    The published entry is the journal's entry with the content digest and the version
    that `finish_store` adds once the store is written.

    The temporary folder and the journal are named by the recipe digest (see
    `tasks.writer`), so a run killed without cleanup is resumed by the next run of the
    same recipe. Any exception removes both, since bad data or a bug would fail again.
    KeyboardInterrupt and SystemExit keep them for a resume. The old entry is removed
    before the old store is replaced, so the catalog never points at a store from a
    different recipe. The store of the old entry is removed after the new entry is
    published when it lies elsewhere (an appended version, see `tasks.append`).

    The caller holds the dataset lock of the name, so no other ingest writes beside it.
    """
    entry = journal.entry
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = writer.temporary_store_path(target, journal.digest)
    previous: Path | None = None
    moved_into_place = False
    old_store = _published_store(catalog, entry.name)
    try:
        _write_zarr(dataset, statistics_arrays, temporary, journal, target, workers)
        entry = finish_store(temporary, entry, catalog)

        if target.exists():
            catalog.remove(entry.name)
            previous = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
            os.replace(target, previous)
        os.replace(temporary, target)
        moved_into_place = True
        writer.journal_path(target, journal.digest).unlink(missing_ok=True)
        catalog.publish(entry)
    except Exception:
        writer.discard(target, journal.digest)
        if moved_into_place:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    if old_store is not None and old_store != target:
        shutil.rmtree(old_store, ignore_errors=True)
    logger.info("wrote dataset %s version %d to %s", entry.name, entry.version, target)
    return entry


def _published_store(catalog: Catalog, name: str) -> Path | None:
    """Return the store path of the published entry `name`, or None when there is no valid entry."""
    if name not in catalog:
        return None
    try:
        return catalog.resolve_zarr_path(catalog.get(name))
    except ValueError:
        return None


def _write_zarr(
    dataset: xr.Dataset,
    statistics_arrays: xr.Dataset,
    path: Path,
    journal: writer.IngestJournal,
    target: Path,
    workers: tuple[decode.PassContext, Client | int] | None = None,
) -> None:
    """Write Zarr format 3 in chunks of `time_chunk` steps by the whole grid, one time region at a time.

    A new store is created first: the first `to_zarr` call creates the arrays and writes
    the coordinates, and local statistics arrays go to the child group `statistics`, one
    chunk per month. Then each region not yet in the journal is computed, written and
    recorded in the journal (`writer.record_region`). With `workers` (the write context of `tasks.decode` and
    a dask client), the cluster's workers decode, normalise and write the regions.
    """
    time_chunk = journal.time_chunk
    if not journal.completed and not writer.journal_path(target, journal.digest).exists():
        shutil.rmtree(path, ignore_errors=True)
        encoding = {
            str(variable): {"chunks": tuple(time_chunk if dim == TIME else values.sizes[dim] for dim in values.dims)}
            for variable, values in dataset.data_vars.items()
        }
        dataset.to_zarr(path, mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding)
        if statistics_arrays.data_vars:
            statistics_encoding = {
                str(name): {"chunks": tuple(1 if dim == "month" else size for dim, size in values.sizes.items())}
                for name, values in statistics_arrays.data_vars.items()
            }
            statistics_arrays.to_zarr(
                path, group=STATISTICS_GROUP, mode="w-", zarr_format=3, consolidated=False, encoding=statistics_encoding
            )
        writer.save_journal(target, journal)

    time_count = dataset.sizes[TIME]
    if workers is not None:
        context, client = workers
        context = dataclasses.replace(context, store=str(path), token=uuid.uuid4().hex)
        regions = [(index, *_bounds(writer.region_bounds(index, time_chunk, time_count))) for index in journal.pending()]
        for index, _ in decode.run_pass(context, regions, client):
            writer.record_region(target, journal, index)
        return

    data = dataset[list(dataset.data_vars)].drop_vars([MEMBER, LEVEL, LATITUDE, LONGITUDE], errors="ignore")
    for index in tqdm(journal.pending(), desc=f"writing {path.name}", unit="region", disable=None):
        region = writer.region_bounds(index, time_chunk, time_count)
        data.isel({TIME: region}).to_zarr(path, region={TIME: region}, consolidated=False)
        writer.record_region(target, journal, index)


# --- small helpers ------------------------------------------------------------------------


# Attribute of an opened dataset source that contains its provenance record: a mapping with
# the SourceFile fields path (where the data came from), sha256 and size in bytes.
SOURCE_RECORD_ATTR = "atmorep_source"


def _resolve_sources(sources: Sequence[str | Path | xr.Dataset]) -> list[Path | xr.Dataset]:
    if isinstance(sources, (str, Path, xr.Dataset)):
        sources = [sources]
    if not sources:
        raise ValueError("sources is empty. Pass at least one GRIB or NetCDF file or opened dataset.")

    # Files keep the absolute path the caller gave, not the one with symlinks resolved, so
    # messages and provenance records name the path the user typed. Duplicates are found
    # through the resolved path.
    absolute: list[Path | xr.Dataset] = []
    seen: dict[Path | str, Path | str] = {}
    for source in sources:
        if isinstance(source, xr.Dataset):
            label: Path | str = _dataset_record(source).path
            key: Path | str = label
        else:
            label = source = Path(os.path.abspath(Path(source).expanduser()))
            if not source.is_file():
                raise FileNotFoundError(f"source file {source} not found")
            key = source.resolve()
        if key in seen:
            same = "" if seen[key] == label else f" (as {seen[key]} and as {label})"
            raise ValueError(f"source {label} is listed twice{same}")
        absolute.append(source)
        seen[key] = label
    return absolute


def _describe_source(source: Path | xr.Dataset) -> SourceFile:
    if isinstance(source, xr.Dataset):
        return _dataset_record(source)
    return SourceFile(path=str(source), sha256=sha256_file(source), size=source.stat().st_size)


def _dataset_record(dataset: xr.Dataset) -> SourceFile:
    record = dataset.attrs.get(SOURCE_RECORD_ATTR)
    if record is None:
        raise InvalidSourceError(
            f"an opened dataset source has no provenance record in attrs[{SOURCE_RECORD_ATTR!r}]. Open it with "
            "tasks.sources (open_cds, open_remote_zarr) or add the record with tasks.sources.attach_source_record."
        )
    try:
        return SourceFile.model_validate(record)
    except ValidationError as error:
        raise InvalidSourceError(f"provenance record {record!r} of an opened dataset source is invalid: {error}") from error


def _source_label(source: Path | xr.Dataset) -> Path | str:
    """Return a file source itself, or the record path of an opened dataset, for error messages."""
    return _dataset_record(source).path if isinstance(source, xr.Dataset) else source


def _parse_period(period: tuple[object, object] | None, label: str) -> tuple[datetime, datetime] | None:
    """Parse an inclusive `(start, end)` pair of times into naive UTC datetimes; None stays None."""
    if period is None:
        return None
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


def _bounds(region: slice) -> tuple[int, int]:
    return region.start, region.stop


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
