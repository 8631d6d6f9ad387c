"""Grid handling for regular latitude-longitude datasets: longitude convention, regional crops and coarsening.

Every function takes and returns an `xr.Dataset` with 1-D `latitude` and `longitude`
coordinates in degrees, latitude running north to south (as `tasks.ingest.canonicalise`
leaves it). Dask-backed variables stay lazy.

- `apply_longitude_convention` wraps longitudes into `[-180, 180)` or `[0, 360)` and sorts them.
- `crop_area` keeps the points inside `area = (north, west, south, east)`, also across the
  180° meridian or the 0° meridian.
- `coarsen` block-averages `factor x factor` points with cell-area weights, which is
  first-order conservative remapping on a regular latitude-longitude grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import xarray as xr

logger = logging.getLogger(__name__)

LATITUDE, LONGITUDE = "latitude", "longitude"

LongitudeConvention = Literal["-180..180", "0..360"]
LONGITUDE_CONVENTIONS: tuple[str, ...] = ("-180..180", "0..360")
# -180..180 keeps Europe and Africa contiguous, where regional ERA5 requests usually cross 0°.
DEFAULT_LONGITUDE_CONVENTION: LongitudeConvention = "-180..180"
_CONVENTION_WEST_EDGE = {"-180..180": -180.0, "0..360": 0.0}

# Absolute tolerance in degrees when comparing grid coordinates (ERA5 GRIB stores millidegrees).
_DEGREE_ATOL = 1e-6


class InvalidGridError(ValueError):
    """Error for a grid, area or coarsening factor that ingest cannot use. The message names the value at fault."""


def apply_longitude_convention(
    dataset: xr.Dataset, convention: str = DEFAULT_LONGITUDE_CONVENTION, where: str = "the dataset"
) -> xr.Dataset:
    """Wrap longitudes into `convention` and sort them ascending.

    `convention` is "-180..180" (longitudes in [-180, 180)) or "0..360" (in [0, 360)). A
    global grid is rolled so that it starts at the convention's western edge. A regional
    grid must stay evenly spaced after wrapping. Otherwise it crosses the seam of the
    convention (180° for -180..180, 0° for 0..360), and InvalidGridError names the other
    convention to use. `where` names the source files in error messages.
    """
    west_edge = _west_edge(convention)
    longitude = dataset[LONGITUDE].values.astype(np.float64)
    wrapped = _wrap(longitude, west_edge)
    order = np.argsort(wrapped, kind="stable")
    wrapped = wrapped[order]

    if wrapped.size > 1 and not _is_global(longitude):
        steps = np.diff(wrapped)
        if not np.allclose(steps, steps[0], rtol=0.0, atol=_DEGREE_ATOL):
            other = "0..360" if convention == "-180..180" else "-180..180"
            raise InvalidGridError(
                f"longitudes of {where} ({longitude[0]:g} to {longitude[-1]:g} degrees) cross {abs(west_edge):g}°, "
                f"the seam of the longitude convention {convention}, so the region would be split. "
                f"Use longitude_convention={other!r} (`--longitude-convention {other}` on the command line)."
            )

    if not np.array_equal(order, np.arange(order.size)):
        dataset = dataset.isel({LONGITUDE: order})
    return dataset.assign_coords({LONGITUDE: (LONGITUDE, wrapped, dataset[LONGITUDE].attrs)})


def contiguous_longitude_steps(longitude: np.ndarray) -> np.ndarray:
    """Return the steps in degrees between neighbouring longitudes, taken in order around the circle.

    The order starts east of the widest gap, so a region across the 0° or 180° meridian
    stored as 0, 0.25, ..., 2, 350, ..., 359.75 gives steps of 0.25 only. Returns
    `longitude.size - 1` steps.
    """
    ordered = np.sort(np.mod(longitude.astype(np.float64), 360.0))
    gaps = np.diff(np.append(ordered, ordered[0] + 360.0))
    start = (int(np.argmax(gaps)) + 1) % ordered.size
    return np.mod(np.diff(np.roll(ordered, -start)), 360.0)


def crop_area(dataset: xr.Dataset, area: Sequence[float], where: str = "the dataset") -> xr.Dataset:
    """Keep the grid points inside `area = (north, west, south, east)` in degrees, bounds included.

    The longitude range runs eastwards from `west` to `east` and may cross the 180° or the
    0° meridian: (60, 170, 40, -170) selects 20 degrees around the 180° meridian, in any
    longitude convention of the data. The kept longitudes are ordered west to east, so
    apply the longitude convention afterwards. Raises InvalidGridError for an invalid area
    or one that contains no grid point.
    """
    north, west, south, east = check_area(area)
    latitude = dataset[LATITUDE].values
    keep_latitude = np.flatnonzero((latitude <= north + _DEGREE_ATOL) & (latitude >= south - _DEGREE_ATOL))

    longitude = dataset[LONGITUDE].values.astype(np.float64)
    width = (east - west) % 360.0
    if width == 0.0 and east != west:
        width = 360.0
    # Distance eastwards from the western bound, so points across the seam sort after the others.
    offset = (longitude - west) % 360.0
    offset[np.isclose(offset, 360.0, rtol=0.0, atol=_DEGREE_ATOL)] = 0.0
    inside = np.flatnonzero(offset <= width + _DEGREE_ATOL)
    keep_longitude = inside[np.argsort(offset[inside], kind="stable")]

    if keep_latitude.size == 0 or keep_longitude.size == 0:
        raise InvalidGridError(
            f"area {list(area)} (north, west, south, east) contains no grid point of {where}, which covers "
            f"latitude {latitude.min():g} to {latitude.max():g} and longitude {longitude.min():g} to "
            f"{longitude.max():g} degrees"
        )
    return dataset.isel({LATITUDE: keep_latitude, LONGITUDE: keep_longitude})


def coarsen(dataset: xr.Dataset, factor: int) -> xr.Dataset:
    """Average blocks of `factor x factor` grid points, weighted by cell area and ignoring NaN.

    A cell of the regular grid spans half a step on each side of its point, clipped at
    the poles, and has area proportional to `sin(lat_north) - sin(lat_south)`, which is
    proportional to `cos(lat)` away from the poles. The weighted block mean therefore
    conserves the area integral of each field (first-order conservative remapping).
    NaN values take no weight, and a block of only NaN values stays NaN. The coarse
    coordinates are the block means of the fine coordinates.

    Trailing rows or columns that do not fill a whole block are dropped with a warning.
    Raises InvalidGridError when `factor` is below 1 or larger than the grid.
    """
    if factor < 1:
        raise InvalidGridError(f"coarsen_factor must be a positive integer, got {factor}")
    if factor == 1:
        return dataset
    latitude = dataset[LATITUDE].values.astype(np.float64)
    longitude = dataset[LONGITUDE].values.astype(np.float64)
    if latitude.size < factor or longitude.size < factor:
        raise InvalidGridError(
            f"coarsen_factor {factor} is larger than the grid of {latitude.size} x {longitude.size} points"
        )
    _warn_trimmed(latitude, longitude, factor)

    weights = xr.DataArray(cell_area_weights(latitude), dims=LATITUDE, coords={LATITUDE: dataset[LATITUDE]})
    blocks = {LATITUDE: factor, LONGITUDE: factor}
    variables = {}
    for name, values in dataset.data_vars.items():
        valid_weights = weights.where(values.notnull(), 0.0)
        weighted_sum = (values.astype(np.float64).fillna(0.0) * valid_weights).coarsen(blocks, boundary="trim").sum()
        weight_sum = valid_weights.coarsen(blocks, boundary="trim").sum()
        mean = (weighted_sum / weight_sum.where(weight_sum > 0.0)).astype(values.dtype)
        mean.attrs = dict(values.attrs)
        variables[name] = mean.transpose(*values.dims)

    coarse = xr.Dataset(variables, attrs=dataset.attrs)
    coarse_latitude = _block_means(latitude, factor)
    coarse_longitude = _block_means(longitude, factor)
    return coarse.assign_coords(
        {
            LATITUDE: (LATITUDE, coarse_latitude, dataset[LATITUDE].attrs),
            LONGITUDE: (LONGITUDE, coarse_longitude, dataset[LONGITUDE].attrs),
        }
    )


def cell_area_weights(latitude: np.ndarray) -> np.ndarray:
    """Return the relative area of each grid row: `sin(lat_north) - sin(lat_south)` of its cell.

    latitude: [H] evenly spaced, in degrees. Cell edges lie half a step from each point
    and are clipped to [-90, 90], so a row at a pole gets the area of its half cell.
    """
    latitude = np.asarray(latitude, dtype=np.float64)
    if latitude.size == 1:
        return np.ones(1)
    half_step = abs(latitude[1] - latitude[0]) / 2.0
    north = np.clip(latitude + half_step, -90.0, 90.0)
    south = np.clip(latitude - half_step, -90.0, 90.0)
    return np.sin(np.deg2rad(north)) - np.sin(np.deg2rad(south))


def _block_means(coordinate: np.ndarray, factor: int) -> np.ndarray:
    blocks = coordinate.size // factor
    return coordinate[: blocks * factor].reshape(blocks, factor).mean(axis=1)


def _warn_trimmed(latitude: np.ndarray, longitude: np.ndarray, factor: int) -> None:
    dropped_latitude = latitude[latitude.size - latitude.size % factor :]
    dropped_longitude = longitude[longitude.size - longitude.size % factor :]
    if dropped_latitude.size or dropped_longitude.size:
        logger.warning(
            "coarsening by %d drops the trailing latitudes %s and longitudes %s, which do not fill a block. "
            "Crop with `area` to choose which points are dropped.",
            factor, dropped_latitude.tolist(), dropped_longitude.tolist(),
        )


def check_area(area: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        north, west, south, east = (float(value) for value in area)
    except (TypeError, ValueError) as error:
        raise InvalidGridError(f"area {area!r} is not four numbers (north, west, south, east): {error}") from error
    if not -90.0 <= south <= north <= 90.0:
        raise InvalidGridError(
            f"area {list(area)} is invalid: expected -90 <= south ({south:g}) <= north ({north:g}) <= 90 degrees"
        )
    for label, value in (("west", west), ("east", east)):
        if not -360.0 <= value <= 360.0:
            raise InvalidGridError(f"area {list(area)} has {label} = {value:g}, outside -360 to 360 degrees")
    return north, west, south, east


def _west_edge(convention: str) -> float:
    try:
        return _CONVENTION_WEST_EDGE[convention]
    except KeyError:
        raise InvalidGridError(
            f"longitude_convention {convention!r} is unknown: use one of {list(LONGITUDE_CONVENTIONS)}"
        ) from None


def _wrap(longitude: np.ndarray, west_edge: float) -> np.ndarray:
    wrapped = (longitude - west_edge) % 360.0 + west_edge
    # A value a rounding error below the eastern edge belongs at the western edge.
    wrapped[np.isclose(wrapped, west_edge + 360.0, rtol=0.0, atol=_DEGREE_ATOL)] = west_edge
    return wrapped


def _is_global(longitude: np.ndarray) -> bool:
    """Return whether evenly spaced longitudes go once around the Earth (n * step == 360)."""
    if longitude.size < 2:
        return False
    step = abs(longitude[1] - longitude[0])
    return bool(np.isclose(step * longitude.size, 360.0, rtol=0.0, atol=1e-3))
