"""ERA5 from Zarr stores laid out like ARCO-ERA5 or WeatherBench 2, opened lazily through fsspec."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import pydantic
import xarray as xr
import zarr
import zarr.errors
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.ingest import CANONICAL_DIMS, DIMENSION_ALIASES, LATITUDE, LEVEL, LONGITUDE, TIME, InvalidSourceError
from tasks.sources.common import CDS_VARIABLE_NAMES, ERA5_SHORT_NAMES, Area, TimeRange, attach_source_record

logger = logging.getLogger(__name__)

ZARR_PREFIX = "zarr:"

# Tolerance in degrees when matching grid coordinates against area edges and levels.
_COORDINATE_TOLERANCE = 1e-6


class RemoteZarrSource(BaseModel):
    """A selection from a Zarr store laid out like ARCO-ERA5 or WeatherBench 2."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(
        description="fsspec URL or local path of the store (gs:// and s3:// need the gcsfs or s3fs package)"
    )
    variables: list[str] = Field(
        min_length=1, description="ERA5 short names (t2m, u, ...) or the store's variable names"
    )
    time: TimeRange | None = Field(None, description="first and last time step, inclusive (default: all)")
    area: Area | None = Field(None, description="[north, west, south, east] in degrees (default: the whole grid)")
    levels: list[float] | None = Field(None, description="pressure levels in hPa (default: all)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options, such as {'token': 'anon'} for gs:// URLs, which are never recorded",
    )

    @field_validator("url")
    @classmethod
    def _normalise_url(cls, url: str) -> str:
        if url.startswith("file://"):
            url = unquote(urlsplit(url).path)
        if "://" not in url:
            return str(Path(url).expanduser().resolve())
        return url

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    def to_source_string(self) -> str:
        """Return the `zarr:URL?...` source string, without credentials.

        The URL loses any user name, password, query and fragment, because they can carry
        secrets. `storage_options` are left out for the same reason.
        """
        url = self.url
        if not self.is_local:
            parts = urlsplit(url)
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port else host
            url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        query = [f"variables={','.join(self.variables)}"]
        if self.levels is not None:
            query.append(f"levels={','.join(_format_number(level) for level in self.levels)}")
        if self.area is not None:
            query.append(f"area={','.join(_format_number(edge) for edge in self.area)}")
        if self.time is not None:
            query.append(f"time={','.join(moment.isoformat(timespec='seconds') for moment in self.time)}")
        return f"{ZARR_PREFIX}{url}?{'&'.join(query)}"


_ZARR_QUERY_KEYS = ("variables", "levels", "area", "time")


def parse_zarr_source(text: str, default_time: tuple[datetime, datetime] | None = None) -> RemoteZarrSource:
    """Parse `zarr:{json}` or `zarr:URL?variables=...&levels=...&area=N,W,S,E&time=START,END`.

    List values are comma separated. The URL itself cannot carry a query string in this
    form, but it can in the JSON form. `default_time` fills in `time` when it is missing.
    """
    body = text.removeprefix(ZARR_PREFIX).strip()
    if body.startswith("{"):
        try:
            document = json.loads(body)
        except json.JSONDecodeError as error:
            raise ValueError(f"inline Zarr source {body!r} is not valid JSON: {error}") from error
        if not isinstance(document, dict):
            raise ValueError(f"inline Zarr source {body!r} must be a JSON object of RemoteZarrSource fields")
    else:
        document = _parse_zarr_query(body, text)

    if default_time is not None and document.get("time") is None:
        document = {**document, "time": list(default_time)}
    try:
        return RemoteZarrSource.model_validate(document)
    except pydantic.ValidationError as error:
        raise ValueError(f"Zarr source {text!r} is invalid: {error}") from error


def _parse_zarr_query(body: str, text: str) -> dict[str, Any]:
    url, _, query = body.partition("?")
    if not url:
        raise ValueError(f"Zarr source {text!r} has no URL or path after {ZARR_PREFIX!r}")
    document: dict[str, Any] = {"url": url}
    for item in filter(None, query.split("&")):
        key, separator, value = item.partition("=")
        if not separator or key not in _ZARR_QUERY_KEYS:
            raise ValueError(
                f"Zarr source {text!r} has an invalid parameter {item!r}: expected "
                f"{', '.join(f'{name}=...' for name in _ZARR_QUERY_KEYS)}"
            )
        if key in document:
            raise ValueError(f"Zarr source {text!r} gives {key} twice")
        document[key] = [unquote(part).strip() for part in value.split(",") if part.strip()]
    if "variables" not in document:
        raise ValueError(
            f"Zarr source {text!r} has no variables. Name the ERA5 variables to read, as in variables=t2m,u"
        )
    return document


def open_remote_zarr(
    url: str,
    variables: Sequence[str],
    time: tuple[str | datetime, str | datetime] | None = None,
    area: Sequence[float] | None = None,
    levels: Sequence[float] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Open a selection of an ARCO-ERA5 or WeatherBench 2 style Zarr store lazily.

    See `open_zarr_source`, which takes the same fields as a `RemoteZarrSource`.
    """
    source = RemoteZarrSource(
        url=url,
        variables=list(variables),
        time=time,
        area=area,
        levels=list(levels) if levels is not None else None,
        storage_options=dict(storage_options or {}),
    )
    return open_zarr_source(source)


def open_zarr_source(source: RemoteZarrSource) -> xr.Dataset:
    """Open the selection `source` lazily, in canonical names, with its provenance record.

    Variables get ERA5 short names (see ERA5_SHORT_NAMES), and `lat`/`lon` become
    `latitude`/`longitude`. Dims are ordered `(time, [level,] latitude, longitude)`,
    latitude descends and levels ascend. With an area, longitudes run from its west edge
    to its east edge, shifted by 360 degrees where the store's convention differs, so a box
    across the store's seam (0 degrees in ARCO-ERA5) comes back contiguous. Values stay
    dask arrays in the store's chunks: only chunks inside the selection are read later.

    The record's sha256 covers the Zarr metadata of the selected arrays and their
    coordinates, plus the selected coordinate values, so it is the same for a copy of the
    store at another URL. NOTE: a rewrite of chunk data that leaves the metadata and
    coordinates unchanged keeps the sha256, so such a change is not detected.
    """
    group, store = _open_zarr_group(source)
    names = _store_variables(store, source)
    subset = store[list(names)]

    indexers, longitudes = _selection(subset, source)
    subset = subset.isel(indexers)
    if longitudes is not None:
        subset = subset.assign_coords({LONGITUDE: (LONGITUDE, longitudes, subset[LONGITUDE].attrs)})
    subset = subset.rename({name: short for name, short in names.items() if name != short})
    subset = subset.transpose(*[dim for dim in CANONICAL_DIMS if dim in subset.dims], ...)
    subset.attrs = {}

    sha256 = _selection_sha256(group, list(names), subset)
    size = sum(int(subset[name].nbytes) for name in subset.data_vars)
    logger.info(
        "opened %s: %s, dims %s, %.1f MB before compression",
        source.to_source_string(),
        ", ".join(map(str, subset.data_vars)),
        dict(subset.sizes),
        size / 1e6,
    )
    return attach_source_record(subset, source.to_source_string(), sha256=sha256, size=size)


def _open_zarr_group(source: RemoteZarrSource) -> tuple[zarr.Group, xr.Dataset]:
    """Open the store once with zarr (for its metadata) and once with xarray, lazily."""
    options = None if source.is_local else (source.storage_options or None)
    if source.is_local and not Path(source.url).is_dir():
        raise InvalidSourceError(f"Zarr store {source.url} not found. Give an existing folder or a URL.")
    try:
        group = zarr.open_group(source.url, mode="r", storage_options=options)
        store = xr.open_zarr(group.store, consolidated=None, chunks={}, decode_timedelta=True)
    except (OSError, KeyError, ValueError, zarr.errors.BaseZarrError) as error:
        raise InvalidSourceError(
            f"cannot open Zarr store {source.to_source_string()}: {type(error).__name__}: {error}. "
            "Check the URL, and pass storage_options (JSON form) when the store needs them."
        ) from error

    aliases = {alias: canonical for alias, canonical in DIMENSION_ALIASES.items() if alias in store.variables}
    return group, store.rename(aliases)


def _store_variables(store: xr.Dataset, source: RemoteZarrSource) -> dict[str, str]:
    """Map each requested variable to its store name, and return `{store name: ERA5 short name}`."""
    names: dict[str, str] = {}
    missing = []
    for variable in source.variables:
        if variable in store.data_vars:
            name = variable
        elif CDS_VARIABLE_NAMES.get(variable) in store.data_vars:
            name = CDS_VARIABLE_NAMES[variable]
        else:
            missing.append(variable)
            continue
        names[name] = ERA5_SHORT_NAMES.get(name, name)

    if missing:
        available = sorted(
            f"{ERA5_SHORT_NAMES[str(name)]} ({name})" if name in ERA5_SHORT_NAMES else str(name)
            for name in store.data_vars
        )
        raise InvalidSourceError(
            f"variables {missing} not found in Zarr store {source.to_source_string()} "
            f"(available: {', '.join(available)})"
        )
    if len(set(names.values())) < len(names):
        raise InvalidSourceError(f"variables {source.variables} name one store variable twice in {source.url}")
    return names


def _selection(subset: xr.Dataset, source: RemoteZarrSource) -> tuple[dict[str, Any], np.ndarray | None]:
    """Return the integer indexers of the time, area and level selection, and the new longitudes."""
    where = source.to_source_string()
    for dim in (TIME, LATITUDE, LONGITUDE):
        if dim not in subset.dims:
            raise InvalidSourceError(f"Zarr store {where} has no {dim!r} dimension (dims: {list(subset.dims)})")

    indexers: dict[str, Any] = {TIME: _time_indexer(subset[TIME].values, source.time, where)}
    north, west, south, east = source.area if source.area is not None else (90.0, None, -90.0, None)
    indexers[LATITUDE] = _latitude_indexer(subset[LATITUDE].values, north, south, where)
    longitudes = None
    if west is not None:
        indexers[LONGITUDE], longitudes = _longitude_indexer(subset[LONGITUDE].values, west, east, where)

    if source.levels is not None:
        if LEVEL not in subset.dims:
            raise InvalidSourceError(f"levels {source.levels} given, but no selected variable of {where} has levels")
        indexers[LEVEL] = _level_indexer(subset[LEVEL], source.levels, where)
    elif LEVEL in subset.dims:
        indexers[LEVEL] = _as_indexer(np.argsort(subset[LEVEL].values, kind="stable"))
    return indexers, longitudes


def _time_indexer(times: np.ndarray, period: tuple[datetime, datetime] | None, where: str) -> slice:
    if times.size > 1 and np.any(np.diff(times) <= np.timedelta64(0, "ns")):
        raise InvalidSourceError(f"time coordinate of Zarr store {where} is not increasing")
    if period is None:
        return slice(None)
    start, end = (np.datetime64(moment, "ns") for moment in period)
    first = int(np.searchsorted(times, start, side="left"))
    stop = int(np.searchsorted(times, end, side="right"))
    if first >= stop:
        covers = f"{times[0]} .. {times[-1]}" if times.size else "no time steps"
        raise InvalidSourceError(
            f"time {period[0]} .. {period[1]} selects no time step of {where}, which covers {covers}"
        )
    return slice(first, stop)


def _latitude_indexer(latitudes: np.ndarray, north: float, south: float, where: str) -> slice | np.ndarray:
    """Select latitudes inside [south, north] and order them north to south."""
    inside = np.flatnonzero(
        (latitudes <= north + _COORDINATE_TOLERANCE) & (latitudes >= south - _COORDINATE_TOLERANCE)
    )
    if inside.size == 0:
        raise InvalidSourceError(
            f"area {north} .. {south} degrees north contains no latitude of {where}, which spans "
            f"{latitudes.min()} .. {latitudes.max()}"
        )
    order = np.argsort(-latitudes[inside], kind="stable")
    return _as_indexer(inside[order])


def _longitude_indexer(
    longitudes: np.ndarray, west: float, east: float, where: str
) -> tuple[slice | np.ndarray, np.ndarray]:
    """Select longitudes from `west` eastwards to `east`, wrapping at 360 degrees.

    Returns the indexer, in order of increasing distance east of `west`, and the selected
    longitudes shifted by whole turns so that they ascend without a jump and the first one
    lies in -180 .. 180. West 355 and east 5 on a 0 .. 360 grid give -5 .. 5.
    """
    # West 170 and east -170 span 20 degrees, and west -180 with east 180 the full 360.
    span = float(np.mod(east - west, 360.0))
    if span == 0.0 and east != west:
        span = 360.0
    offsets = np.mod(longitudes - west, 360.0)
    # A point just west of `west` by rounding error lands near 360, so fold it back to 0.
    offsets = np.where(offsets > 360.0 - _COORDINATE_TOLERANCE, offsets - 360.0, offsets)
    inside = np.flatnonzero(offsets <= span + _COORDINATE_TOLERANCE)
    if inside.size == 0:
        raise InvalidSourceError(
            f"area {west} .. {east} degrees east contains no longitude of {where}, which spans "
            f"{longitudes.min()} .. {longitudes.max()}"
        )
    inside = inside[np.argsort(offsets[inside], kind="stable")]
    selected = longitudes[inside].astype(np.float64)
    turns = np.round((west + offsets[inside] - selected) / 360.0)
    contiguous = selected + 360.0 * turns
    contiguous -= 360.0 * np.floor((contiguous[0] + 180.0) / 360.0)
    return _as_indexer(inside), contiguous


def _level_indexer(levels: xr.DataArray, requested: Sequence[float], where: str) -> slice | np.ndarray:
    values = levels.values.astype(np.float64)
    if str(levels.attrs.get("units", "hPa")) == "Pa":
        values = values / 100.0
    indices = []
    for level in sorted(set(requested)):
        matches = np.flatnonzero(np.abs(values - level) <= _COORDINATE_TOLERANCE)
        if matches.size == 0:
            available = ", ".join(_format_number(value) for value in sorted(values))
            raise InvalidSourceError(f"level {_format_number(level)} hPa not found in {where} (available: {available})")
        indices.append(int(matches[0]))
    return _as_indexer(np.asarray(indices))


def _as_indexer(indices: np.ndarray) -> slice | np.ndarray:
    """Return a slice for a run of consecutive indices (cheaper for dask), else the indices."""
    if indices.size > 1 and np.all(np.diff(indices) == 1):
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return indices


def _selection_sha256(group: zarr.Group, names: list[str], subset: xr.Dataset) -> str:
    """Return the sha256 of the selected arrays' Zarr metadata and the selected coordinate values."""
    reverse_aliases = {canonical: alias for alias, canonical in DIMENSION_ALIASES.items()}
    arrays = sorted(set(names) | {str(dim) for dim in subset.dims})
    metadata = {}
    for name in arrays:
        stored = name if name in group else reverse_aliases.get(name, name)
        if stored in group:
            metadata[name] = group[stored].metadata.to_dict()
    coordinates = {
        str(dim): hashlib.sha256(np.ascontiguousarray(subset[dim].values).tobytes()).hexdigest()
        for dim in subset.dims
    }
    document = {"variables": sorted(names), "metadata": metadata, "coordinates": coordinates}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
