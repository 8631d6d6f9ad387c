"""Reference values read straight from GRIB (ecCodes) and NetCDF (h5netcdf) files, without cfgrib or xarray.

The tests compare ingested, denormalised stores with these points, so a decoding,
orientation, unit or normalisation error in the ingest shows up as a mismatch. The
module also derives test files from real GRIB files and checks that a failed ingest
left nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import eccodes
import h5netcdf
import numpy as np
import pandas as pd
import xarray as xr

from data_catalog import Catalog

# Pressure level units (typeOfLevel in GRIB, units in NetCDF) and their factor to hPa.
GRIB_LEVEL_TYPES_TO_HPA = {"isobaricInhPa": 1.0, "isobaricInPa": 0.01}
NETCDF_LEVEL_UNITS_TO_HPA = {"hPa": 1.0, "millibars": 1.0, "Pa": 0.01}


@dataclass(frozen=True)
class Point:
    """One source value: NaN where the source marks it missing. Level in hPa, None without levels."""

    variable: str
    time: np.datetime64
    level: float | None
    member: int
    latitude: float
    longitude: float
    value: float


@dataclass(frozen=True)
class GribField:
    """One decoded GRIB message: its coordinates as ecCodes gives them, value by value."""

    variable: str
    time: np.datetime64
    level: float | None
    member: int
    latitudes: np.ndarray
    longitudes: np.ndarray
    values: np.ndarray


def grib_fields(path: Path, indices: set[int] | None = None) -> list[GribField]:
    """Decode the messages of `path` (those in `indices` when given) with ecCodes.

    Missing values (a bitmap) become NaN. Pressure levels are converted to hPa.
    """
    fields = []
    with open(path, "rb") as stream:
        index = 0
        while (handle := eccodes.codes_grib_new_from_file(stream)) is not None:
            try:
                if indices is None or index in indices:
                    fields.append(_grib_field(handle))
            finally:
                eccodes.codes_release(handle)
            index += 1
    return fields


def _grib_field(handle: int) -> GribField:
    values = eccodes.codes_get_values(handle)
    if eccodes.codes_get(handle, "bitmapPresent"):
        values = np.where(values == eccodes.codes_get(handle, "missingValue"), np.nan, values)
    level_type = eccodes.codes_get(handle, "typeOfLevel")
    factor = GRIB_LEVEL_TYPES_TO_HPA.get(level_type)
    date, time = eccodes.codes_get(handle, "validityDate"), eccodes.codes_get(handle, "validityTime")
    return GribField(
        variable=eccodes.codes_get(handle, "cfVarName"),
        time=np.datetime64(pd.Timestamp(f"{date:08d}T{time:04d}"), "ns"),
        level=float(eccodes.codes_get(handle, "level")) * factor if factor is not None else None,
        member=int(eccodes.codes_get(handle, "number")) if eccodes.codes_is_defined(handle, "number") else 0,
        latitudes=eccodes.codes_get_array(handle, "latitudes"),
        longitudes=eccodes.codes_get_array(handle, "longitudes"),
        values=values,
    )


def grib_points(path: Path, rng: np.random.Generator, messages: int = 12, per_message: int = 40) -> list[Point]:
    """Sample `per_message` points of up to `messages` random messages of `path`, plus every missing point."""
    count = message_count(path)
    chosen = set(rng.choice(count, size=min(messages, count), replace=False).tolist())
    points = []
    for field in grib_fields(path, chosen):
        picked = set(rng.choice(field.values.size, size=min(per_message, field.values.size), replace=False).tolist())
        picked |= set(np.flatnonzero(np.isnan(field.values))[:per_message].tolist())
        points.extend(
            Point(
                field.variable, field.time, field.level, field.member,
                float(field.latitudes[index]), float(field.longitudes[index]), float(field.values[index]),
            )
            for index in sorted(picked)
        )
    return points


def message_count(path: Path) -> int:
    with open(path, "rb") as stream:
        return eccodes.codes_count_in_file(stream)


# The ERA5 short names that ingest must give pressure-level variables named by CF standard names.
EXPECTED_SHORT_NAMES = {
    "air_temperature": "t",
    "eastward_wind": "u",
    "northward_wind": "v",
    "lagrangian_tendency_of_air_pressure": "w",
    "specific_humidity": "q",
    "geopotential": "z",
    "specific_cloud_ice_water_content": "ciwc",
}
# Variables of the sample files that are not ERA5 parameters, which ingest skips unless selected.
NOT_ERA5_PARAMETERS = frozenset({"tau_cirrus"})


def netcdf_points(path: Path, rng: np.random.Generator, per_variable: int = 60) -> list[Point]:
    """Sample points of every gridded variable of `path`, unpacking scale_factor, add_offset and _FillValue by hand.

    Pressure-level variables named by a CF standard name are reported under the ERA5
    short name that ingest stores them as, and NOT_ERA5_PARAMETERS are left out.
    """
    points = []
    with h5netcdf.File(path, "r") as file:
        coordinates = {
            "time": _netcdf_times(file.variables["time"]),
            "latitude": file.variables["latitude"][:].astype(np.float64),
            "longitude": file.variables["longitude"][:].astype(np.float64),
        }
        if "level" in file.variables:
            units = _text(file.variables["level"].attrs.get("units", "hPa"))
            coordinates["level"] = file.variables["level"][:].astype(np.float64) * NETCDF_LEVEL_UNITS_TO_HPA[units]

        for name, variable in file.variables.items():
            if not {"time", "latitude", "longitude"} <= set(variable.dimensions) or name in NOT_ERA5_PARAMETERS:
                continue
            values = _unpack(variable)
            for flat in rng.choice(values.size, size=min(per_variable, values.size), replace=False):
                index = dict(zip(variable.dimensions, np.unravel_index(flat, values.shape), strict=True))
                stored_name = EXPECTED_SHORT_NAMES.get(name, name) if "level" in index else name
                points.append(
                    Point(
                        variable=stored_name,
                        time=coordinates["time"][index["time"]],
                        level=float(coordinates["level"][index["level"]]) if "level" in index else None,
                        member=0,
                        latitude=float(coordinates["latitude"][index["latitude"]]),
                        longitude=float(coordinates["longitude"][index["longitude"]]),
                        value=float(values[tuple(index[dim] for dim in variable.dimensions)]),
                    )
                )
    return points


def _unpack(variable: h5netcdf.Variable) -> np.ndarray:
    raw = variable[:]
    values = raw.astype(np.float64)
    fill = variable.attrs.get("_FillValue")
    if fill is not None:
        values[raw == fill] = np.nan
    return values * float(variable.attrs.get("scale_factor", 1.0)) + float(variable.attrs.get("add_offset", 0.0))


def _netcdf_times(variable: h5netcdf.Variable) -> np.ndarray:
    units = _text(variable.attrs["units"])
    unit, _, origin = units.partition(" since ")
    offsets = pd.to_timedelta(variable[:].astype(np.int64), unit={"hours": "h", "seconds": "s", "days": "D"}[unit])
    return (pd.Timestamp(origin) + offsets).values.astype("datetime64[ns]")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def mismatches(restored: xr.Dataset, points: list[Point], convention_west: float = -180.0) -> list[str]:
    """Compare denormalised store values with source points and describe each mismatch.

    Longitudes of the points are wrapped into the store's convention, given by its western
    edge. Values agree when both are NaN, or within 4 float32 units in the last place of
    the variable's largest magnitude, since the store keeps normalised float32 values.
    """
    failures = []
    scales = {}
    for point in points:
        values = restored[point.variable]
        if point.variable not in scales:
            scales[point.variable] = 4.0 * float(np.spacing(np.float32(np.nanmax(np.abs(values.values)))))
        selection = {
            "latitude": point.latitude,
            "longitude": (point.longitude - convention_west) % 360.0 + convention_west,
        }
        if point.level is not None:
            selection["level"] = point.level
        located = values.sel(time=point.time)
        if "member" in located.dims:
            located = located.sel(member=point.member)
        stored = float(located.sel(selection, method="nearest", tolerance=1e-6))
        if np.isnan(point.value) and np.isnan(stored):
            continue
        if not abs(stored - point.value) <= scales[point.variable]:
            failures.append(f"{point}: stored {stored}")
    return failures


def write_grib_messages(source: Path, target: Path, indices: range | list[int]) -> Path:
    """Copy the GRIB messages of `source` at `indices` (0-based, in that order, repeats allowed) into `target`."""
    messages = []
    with open(source, "rb") as stream:
        while (handle := eccodes.codes_grib_new_from_file(stream)) is not None:
            try:
                messages.append(eccodes.codes_get_message(handle))
            finally:
                eccodes.codes_release(handle)
    target.write_bytes(b"".join(messages[index] for index in indices))
    return target


def assert_nothing_written(home: Path, name: str) -> None:
    """Assert that `home` has no Zarr store, temporary folder or catalog entry left by a failed ingest of `name`."""
    data_dir = home / "data"
    leftovers = sorted(path.name for path in data_dir.iterdir()) if data_dir.exists() else []
    assert leftovers == [], f"files left in {data_dir}: {leftovers}"
    assert name not in Catalog(home).names()


def write_grib_where(
    source: Path, target: Path, keep: Callable[[int], bool], change: Callable[[int], None] | None = None
) -> Path:
    """Copy the messages of `source` for which `keep(handle)` is true into `target`, after `change(handle)` if given."""
    with open(source, "rb") as stream, open(target, "wb") as output:
        while (handle := eccodes.codes_grib_new_from_file(stream)) is not None:
            try:
                if keep(handle):
                    if change is not None:
                        change(handle)
                    output.write(eccodes.codes_get_message(handle))
            finally:
                eccodes.codes_release(handle)
    return target
