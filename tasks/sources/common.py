"""Parts shared by the CDS and Zarr sources: ERA5 variable names, provenance records and field types."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Annotated

import numpy as np
import xarray as xr
from pydantic import AfterValidator

from tasks.ingest import SOURCE_RECORD_ATTR

# CDS API variable names, which ARCO-ERA5 and WeatherBench 2 stores use too, mapped to the
# ERA5 short names that cfgrib gives. Those are ECMWF parameter short names, except that
# cfgrib writes 2t, 2d, 10u, 10v, 100u and 100v as t2m, d2m, u10, v10, u100 and v100.
# Static fields (land_sea_mask, geopotential_at_surface) are left out: ingest needs a time axis.
ERA5_SHORT_NAMES: dict[str, str] = {
    # pressure levels
    "geopotential": "z",
    "temperature": "t",
    "u_component_of_wind": "u",
    "v_component_of_wind": "v",
    "vertical_velocity": "w",
    "specific_humidity": "q",
    "relative_humidity": "r",
    "divergence": "d",
    "vorticity": "vo",
    "potential_vorticity": "pv",
    "fraction_of_cloud_cover": "cc",
    "ozone_mass_mixing_ratio": "o3",
    "specific_cloud_ice_water_content": "ciwc",
    "specific_cloud_liquid_water_content": "clwc",
    # single levels
    "2m_temperature": "t2m",
    "2m_dewpoint_temperature": "d2m",
    "10m_u_component_of_wind": "u10",
    "10m_v_component_of_wind": "v10",
    "100m_u_component_of_wind": "u100",
    "100m_v_component_of_wind": "v100",
    "mean_sea_level_pressure": "msl",
    "surface_pressure": "sp",
    "skin_temperature": "skt",
    "sea_surface_temperature": "sst",
    "total_precipitation": "tp",
    "evaporation": "e",
    "total_column_water": "tcw",
    "total_column_water_vapour": "tcwv",
    "total_cloud_cover": "tcc",
    "boundary_layer_height": "blh",
    "toa_incident_solar_radiation": "tisr",
}
CDS_VARIABLE_NAMES: dict[str, str] = {short: long for long, short in ERA5_SHORT_NAMES.items()}


# --- provenance records -------------------------------------------------------------------


def attach_source_record(
    dataset: xr.Dataset, path: str, sha256: str | None = None, size: int | None = None
) -> xr.Dataset:
    """Return a shallow copy of `dataset` with the provenance record that ingest stores for it.

    `path` names the origin of the data. `sha256` defaults to a digest of the dataset's
    names, dims, dtypes and values, which loads every value once. `size` defaults to the
    size of the values in bytes.
    """
    record = {
        "path": path,
        "sha256": sha256 if sha256 is not None else content_sha256(dataset),
        "size": int(size if size is not None else dataset.nbytes),
    }
    return dataset.assign_attrs({SOURCE_RECORD_ATTR: record})


def content_sha256(dataset: xr.Dataset) -> str:
    """Return the sha256 of every variable's name, dims, dtype and values, in name order."""
    digest = hashlib.sha256()
    for name in sorted(map(str, dataset.variables)):
        values = dataset[name]
        header = [name, [str(dim) for dim in values.dims], str(values.dtype), list(values.shape)]
        digest.update(json.dumps(header).encode("utf-8"))
        array = np.asarray(values.values)
        if array.dtype.kind == "O":
            digest.update("\0".join(map(str, array.ravel())).encode("utf-8"))
        else:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()



# --- field types --------------------------------------------------------------------------


def _check_area(area: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    north, west, south, east = area
    if not -90.0 <= south <= north <= 90.0:
        raise ValueError(f"area {list(area)} must be [north, west, south, east] with -90 <= south <= north <= 90")
    if not (-180.0 <= west <= 360.0 and -180.0 <= east <= 360.0):
        raise ValueError(f"area {list(area)} has a west or east edge outside -180 .. 360 degrees")
    return area


Area = Annotated[tuple[float, float, float, float], AfterValidator(_check_area)]
"""Box `[north, west, south, east]` in degrees. West may exceed east, for a box across the antimeridian."""


def _to_naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is not None:
        return moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def _check_time_range(period: tuple[datetime, datetime]) -> tuple[datetime, datetime]:
    start, end = (_to_naive_utc(moment) for moment in period)
    if start > end:
        raise ValueError(f"time range starts at {start.isoformat()}, after its end {end.isoformat()}")
    return start, end


TimeRange = Annotated[tuple[datetime, datetime], AfterValidator(_check_time_range)]
"""Inclusive `(start, end)` in naive UTC."""

