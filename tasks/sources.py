"""ERA5 sources besides local files: CDS API requests and remote Zarr stores.

Both kinds open as xarray datasets with ERA5 short names, and each dataset carries a
provenance record in `attrs[SOURCE_RECORD_ATTR]` (path, sha256, size) that
`tasks.ingest.ingest_era5` stores as its source. A record never contains credentials.

Source strings, as the flow parameter `sources` and the CLI take them:

- `cds:REQUEST.yaml` or `cds:{...}`: a `CdsRequest` in a YAML or JSON file, or as inline
  JSON. It is sent as one CDS API request per calendar month, and each download is
  cached under the hash of its request, so the same request is downloaded once.
- `zarr:URL?variables=t2m,u&levels=500,850&area=58,-10,50,2&time=START,END` or
  `zarr:{...}`: a `RemoteZarrSource` as query parameters or as inline JSON. URL is an
  fsspec URL (`https://`, `gs://`, `s3://`) or a local path, of a store laid out like
  ARCO-ERA5 or WeatherBench 2. Only the chunks inside the selection are read.

Areas are `[north, west, south, east]` in degrees, as in CDS requests.
"""

from __future__ import annotations

import calendar
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import cdsapi
import cdsapi.api
import numpy as np
import pandas as pd
import pydantic
import requests
import xarray as xr
import yaml
import zarr
import zarr.errors
from ecmwf.datastores.processing import DownloadError, ProcessingFailedError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from data_catalog.workspace import atomic_write_text, sha256_file
from tasks.ingest import (
    CANONICAL_DIMS,
    DIMENSION_ALIASES,
    LATITUDE,
    LEVEL,
    LONGITUDE,
    SOURCE_RECORD_ATTR,
    TIME,
    InvalidSourceError,
    open_source,
)

logger = logging.getLogger(__name__)

CDS_PREFIX = "cds:"
ZARR_PREFIX = "zarr:"

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

# Tolerance in degrees when matching grid coordinates against area edges and levels.
_COORDINATE_TOLERANCE = 1e-6


# --- provenance records -------------------------------------------------------------------


def attach_source_record(
    dataset: xr.Dataset, path: str, sha256: str | None = None, size: int | None = None
) -> xr.Dataset:
    """Return a shallow copy of `dataset` with the provenance record that ingest stores for it.

    `path` says where the data came from. `sha256` defaults to a digest of the dataset's
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


# --- shared field types -------------------------------------------------------------------


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


# --- CDS API ------------------------------------------------------------------------------

DEFAULT_CDSAPI_RC = "~/.cdsapirc"
CDS_API_URL = "https://cds.climate.copernicus.eu/api"
ALL_HOURS = tuple(f"{hour:02d}:00" for hour in range(24))
SINGLE_LEVELS = "reanalysis-era5-single-levels"
PRESSURE_LEVELS = "reanalysis-era5-pressure-levels"


class CdsCredentialsError(RuntimeError):
    """Error for missing or unusable CDS API credentials. The message says how to create them."""


class CdsRetrievalError(RuntimeError):
    """Error for a CDS request that failed, or a download that is not GRIB, NetCDF or zip."""


class CdsRequest(BaseModel):
    """ERA5 hourly data to retrieve from the CDS: variables, pressure levels, days, hours and area."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: Literal["reanalysis-era5-single-levels", "reanalysis-era5-pressure-levels"] = Field(
        description="CDS dataset name"
    )
    variables: list[str] = Field(
        min_length=1,
        description="ERA5 short names (t2m, u, ...) or CDS variable names (2m_temperature, ...); "
        "short names are sent as CDS names",
    )
    levels: list[int] | None = Field(
        None, description="pressure levels in hPa: required for the pressure-level dataset, not allowed otherwise"
    )
    dates: tuple[date, date] = Field(description="first and last day, inclusive")
    times: list[str] = Field(list(ALL_HOURS), min_length=1, description="hours of the day as HH:00 in UTC")
    area: Area | None = Field(None, description="[north, west, south, east] in degrees (default: the globe)")
    grid: tuple[float, float] | None = Field(
        None, description="latitude and longitude spacing in degrees (default: the native 0.25)"
    )
    data_format: Literal["grib", "netcdf"] = Field("grib", description="file format the CDS returns")

    @field_validator("variables")
    @classmethod
    def _cds_names(cls, variables: list[str]) -> list[str]:
        names = [CDS_VARIABLE_NAMES.get(variable, variable) for variable in variables]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"variables {variables} name {duplicates} more than once")
        return names

    @field_validator("times")
    @classmethod
    def _check_times(cls, times: list[str]) -> list[str]:
        invalid = [time for time in times if re.fullmatch(r"([01]\d|2[0-3]):00", time) is None]
        if invalid:
            raise ValueError(f"times {invalid} are not hours of the day written HH:00 (ERA5 is hourly)")
        return sorted(set(times))

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, grid: tuple[float, float] | None) -> tuple[float, float] | None:
        if grid is not None and min(grid) <= 0:
            raise ValueError(f"grid {list(grid)} must be two positive spacings in degrees")
        return grid

    @model_validator(mode="after")
    def _check_request(self) -> CdsRequest:
        if self.dates[0] > self.dates[1]:
            raise ValueError(f"dates start at {self.dates[0]}, after their end {self.dates[1]}")
        if self.dataset == PRESSURE_LEVELS and not self.levels:
            raise ValueError(f"dataset {PRESSURE_LEVELS} needs levels (pressure levels in hPa)")
        if self.dataset == SINGLE_LEVELS and self.levels:
            raise ValueError(f"dataset {SINGLE_LEVELS} has no pressure levels, but levels {self.levels} are given")
        return self

    def for_month(self, year: int, month: int) -> CdsRequest:
        """Return this request restricted to the days of one calendar month."""
        first = max(self.dates[0], date(year, month, 1))
        last = min(self.dates[1], date(year, month, calendar.monthrange(year, month)[1]))
        return self.model_copy(update={"dates": (first, last)})

    def monthly_requests(self) -> list[CdsRequest]:
        """Split the request into one request per calendar month of `dates`.

        CDS requests list years, months and days separately and the CDS takes every
        combination of them, so a range across months must be sent month by month.
        """
        start, end = self.dates
        months = pd.period_range(start, end, freq="M")
        return [self.for_month(period.year, period.month) for period in months]

    def api_request(self) -> dict[str, Any]:
        """Return the CDS API request body of a request within one calendar month."""
        first, last = self.dates
        if (first.year, first.month) != (last.year, last.month):
            raise ValueError(f"dates {first} .. {last} span several months: send monthly_requests() one by one")
        body: dict[str, Any] = {
            "product_type": ["reanalysis"],
            "variable": list(self.variables),
            "year": [f"{first.year:04d}"],
            "month": [f"{first.month:02d}"],
            "day": [f"{day:02d}" for day in range(first.day, last.day + 1)],
            "time": list(self.times),
            "data_format": self.data_format,
            "download_format": "unarchived",
        }
        if self.levels:
            body["pressure_level"] = [str(level) for level in sorted(set(self.levels))]
        if self.area is not None:
            body["area"] = list(self.area)
        if self.grid is not None:
            body["grid"] = list(self.grid)
        return body

    def to_source_string(self) -> str:
        """Return `cds:{json}` with sorted keys, which parses back to this request."""
        document = self.model_dump(mode="json", exclude_none=True)
        return CDS_PREFIX + json.dumps(document, sort_keys=True, separators=(",", ":"))


class CdsCredentials(BaseModel):
    """CDS API URL and personal access token. The key's repr and str are masked."""

    model_config = ConfigDict(frozen=True)

    url: str
    key: SecretStr
    verify: bool = True
    origin: str = Field(description="where the credentials were read: the environment and/or the rc file")


def load_cds_credentials() -> CdsCredentials:
    """Read the CDS API URL and key the way cdsapi 0.7 does.

    `CDSAPI_URL` and `CDSAPI_KEY` come first. Whatever they leave missing is read from the
    file named by `CDSAPI_RC` (default `~/.cdsapirc`), with lines `url: ...` and `key: ...`
    and an optional `verify: 0` to skip TLS verification. Raises CdsCredentialsError,
    saying how to create the file, when the URL or the key is missing.
    """
    url = os.environ.get("CDSAPI_URL")
    key = os.environ.get("CDSAPI_KEY")
    rc_path = Path(os.environ.get("CDSAPI_RC", DEFAULT_CDSAPI_RC)).expanduser()
    origins = [name for name, value in (("CDSAPI_URL", url), ("CDSAPI_KEY", key)) if value]
    verify = True

    if (not url or not key) and rc_path.is_file():
        config = cdsapi.api.read_config(rc_path)
        url = url or config.get("url")
        key = key or config.get("key")
        try:
            verify = bool(int(config.get("verify", "1")))
        except ValueError:
            raise CdsCredentialsError(f"'verify' in {rc_path} must be 0 or 1, got {config['verify']!r}") from None
        origins.append(str(rc_path))

    if not url or not key:
        missing = " and ".join(name for name, value in (("url", url), ("key", key)) if not value)
        raise CdsCredentialsError(
            f"CDS API {missing} not found in the environment (CDSAPI_URL, CDSAPI_KEY) or in {rc_path}. "
            f"Create {DEFAULT_CDSAPI_RC} (or the file CDSAPI_RC names) with the two lines\n"
            f"    url: {CDS_API_URL}\n"
            "    key: <your personal access token>\n"
            "taking the token from your profile page on the CDS web site, or set CDSAPI_URL and CDSAPI_KEY."
        )
    if ":" in key:
        raise CdsCredentialsError(
            f"the CDS API key from {' and '.join(origins)} has the UID:KEY form of the CDS that was retired in "
            "September 2024. Replace it by the personal access token shown on your CDS profile page, and set "
            f"url to {CDS_API_URL}."
        )
    return CdsCredentials(url=url.rstrip("/"), key=SecretStr(key), verify=verify, origin=" and ".join(origins))


@dataclass(frozen=True)
class CdsDownload:
    """The files of one monthly CDS request in the download cache, with their sha256."""

    request: CdsRequest
    files: dict[Path, str]
    archived: bool = False


def retrieve_cds(
    request: CdsRequest,
    target_dir: Path,
    *,
    credentials: CdsCredentials | None = None,
    timeout_s: float = 60.0,
    sleep_max_s: float = 120.0,
    retry_max: int = 500,
) -> list[Path]:
    """Download `request` month by month into `target_dir` and return the GRIB or NetCDF files.

    Each monthly download is stored as `<dataset>-<request hash>.grib` or `.nc` (or, when
    the CDS returns a zip archive, as the files of the folder `<dataset>-<request hash>/`)
    beside a `.json` record of the request and the files' sha256. A request whose files
    are already there with the recorded sha256 is not sent again, and needs no
    credentials. Downloads go to a temporary file that is renamed when complete.

    `credentials` default to `load_cds_credentials()`. `timeout_s`, `sleep_max_s` (the
    longest wait between status checks) and `retry_max` pass to the cdsapi client.
    Raises CdsCredentialsError or CdsRetrievalError.
    """
    downloads = retrieve_cds_downloads(
        request, target_dir, credentials=credentials, timeout_s=timeout_s, sleep_max_s=sleep_max_s, retry_max=retry_max
    )
    return [path for download in downloads for path in download.files]


def retrieve_cds_downloads(
    request: CdsRequest,
    target_dir: Path,
    *,
    credentials: CdsCredentials | None = None,
    timeout_s: float = 60.0,
    sleep_max_s: float = 120.0,
    retry_max: int = 500,
) -> list[CdsDownload]:
    """Do what `retrieve_cds` does, but return the monthly request and file sha256s of each download."""
    target_dir = Path(target_dir).expanduser().resolve()
    client: _CdsClient | None = None
    downloads = []
    for monthly in request.monthly_requests():
        download = _cached_download(monthly, target_dir)
        if download is None:
            if client is None:
                client = _CdsClient(credentials or load_cds_credentials(), timeout_s, sleep_max_s, retry_max)
            download = client.download(monthly, target_dir)
        downloads.append(download)
    return downloads


def open_cds(request: CdsRequest, target_dir: Path, **options: Any) -> list[xr.Dataset]:
    """Retrieve `request` with `retrieve_cds` and open every file lazily, with its provenance record.

    The record's path is the monthly request as a `cds:{json}` source string, followed by
    `#<file name>` for a file from a zip archive. Its sha256 is the file's. `options` pass
    to `retrieve_cds`.
    """
    datasets = []
    for download in retrieve_cds_downloads(request, target_dir, **options):
        for path, sha256 in download.files.items():
            label = download.request.to_source_string()
            if download.archived:
                label += f"#{path.name}"
            dataset = open_source(path)
            datasets.append(attach_source_record(dataset, label, sha256=sha256, size=path.stat().st_size))
    return datasets


def parse_cds_source(text: str, default_dates: tuple[date, date] | None = None) -> CdsRequest:
    """Parse `cds:{json}` or `cds:PATH` (a YAML or JSON file) into a CdsRequest.

    `default_dates` fill in `dates` when the request has none.
    """
    body = text.removeprefix(CDS_PREFIX).strip()
    if body.startswith("{"):
        where = "inline CDS request"
        try:
            document = json.loads(body)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} {body!r} is not valid JSON: {error}") from error
    else:
        path = Path(body).expanduser()
        where = f"CDS request file {path}"
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where} not found (source {text!r})") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{where} is not valid YAML: {error}") from error

    if not isinstance(document, dict):
        raise ValueError(f"{where} must be a mapping of CdsRequest fields, got {type(document).__name__}")
    if default_dates is not None and "dates" not in document:
        document = {**document, "dates": list(default_dates)}
    try:
        return CdsRequest.model_validate(document)
    except pydantic.ValidationError as error:
        raise ValueError(f"{where} is invalid: {error}") from error


def cds_request_hash(request: CdsRequest) -> str:
    """Return the sha256 of the dataset name and API request body, which keys the download cache."""
    document = {"dataset": request.dataset, "request": request.api_request()}
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _cache_stem(request: CdsRequest) -> str:
    return f"{request.dataset}-{cds_request_hash(request)[:16]}"


def _cached_download(request: CdsRequest, target_dir: Path) -> CdsDownload | None:
    """Return the cached files of a monthly request when all exist with their recorded sha256."""
    record_path = target_dir / f"{_cache_stem(request)}.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        recorded_request = record["request"]
        files = {target_dir / name: sha256 for name, sha256 in record["files"].items()}
        archived = bool(record["archived"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("CDS download record %s is invalid (%s), so the request is sent again", record_path, error)
        return None
    if recorded_request != {"dataset": request.dataset, **request.api_request()}:
        logger.warning("CDS download record %s belongs to another request, so the request is sent again", record_path)
        return None

    for path, expected in files.items():
        if not path.is_file() or sha256_file(path) != expected:
            logger.warning("cached CDS file %s is missing or changed, so the request is sent again", path)
            return None
    logger.info("reusing %d cached CDS file(s) for %s %s .. %s", len(files), request.dataset, *request.dates)
    return CdsDownload(request=request, files=files, archived=archived)


class _CdsClient:
    """A cdsapi client whose log messages go to this module's logger with the key masked."""

    def __init__(self, credentials: CdsCredentials, timeout_s: float, sleep_max_s: float, retry_max: int) -> None:
        self.credentials = credentials
        self._secret = credentials.key.get_secret_value()
        callbacks = {
            f"{name}_callback": self._log_callback(level)
            for name, level in (
                ("debug", logging.DEBUG),
                ("info", logging.INFO),
                ("warning", logging.WARNING),
                ("error", logging.ERROR),
            )
        }
        # cdsapi 0.7 hands a key without ':' to ecmwf-datastores-client, which speaks the
        # current CDS API. Its debug callback receives the key in the client settings.
        self.client = cdsapi.Client(
            url=credentials.url,
            key=self._secret,
            verify=credentials.verify,
            timeout=timeout_s,
            progress=False,
            sleep_max=sleep_max_s,
            retry_max=retry_max,
            **callbacks,
        )
        logger.info("CDS API client for %s with credentials from %s", credentials.url, credentials.origin)

    def mask(self, text: str) -> str:
        return text.replace(self._secret, "***")

    def _log_callback(self, level: int) -> Callable[..., None]:
        def log(message: object = "", *args: object, **_: object) -> None:
            text = str(message)
            if args:
                try:
                    text = text % args
                except (TypeError, ValueError):
                    text = " ".join([text, *map(str, args)])
            logger.log(level, "CDS: %s", self.mask(text))

        return log

    def download(self, request: CdsRequest, target_dir: Path) -> CdsDownload:
        """Send one monthly request, wait for it, and move the result into the cache."""
        target_dir.mkdir(parents=True, exist_ok=True)
        stem = _cache_stem(request)
        body = request.api_request()
        temporary = target_dir / f".{stem}.{uuid.uuid4().hex[:12]}.part"
        logger.info("requesting %s %s .. %s from the CDS at %s", request.dataset, *request.dates, self.credentials.url)

        try:
            try:
                self.client.retrieve(request.dataset, body, str(temporary))
            except (requests.RequestException, ProcessingFailedError, DownloadError) as error:
                raise CdsRetrievalError(self._failure_message(request, error)) from error
            files, archived = _store_download(temporary, target_dir, stem, request)
        finally:
            temporary.unlink(missing_ok=True)

        record = {
            "dataset": request.dataset,
            "request": {"dataset": request.dataset, **body},
            "cds_url": self.credentials.url,
            "archived": archived,
            "files": {str(path.relative_to(target_dir)): sha256 for path, sha256 in files.items()},
            "retrieved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cdsapi": importlib.metadata.version("cdsapi"),
        }
        atomic_write_text(target_dir / f"{stem}.json", json.dumps(record, indent=2) + "\n")
        logger.info("stored CDS download %s (%d file(s)) in %s", stem, len(files), target_dir)
        return CdsDownload(request=request, files=files, archived=archived)

    def _failure_message(self, request: CdsRequest, error: Exception) -> str:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            advice = f"Check the key from {self.credentials.origin}."
        elif status == 403:
            advice = f"Accept the licence of {request.dataset} on its CDS web page, then retry."
        elif status == 404:
            advice = f"Check that {self.credentials.url} is the CDS API URL and {request.dataset} exists there."
        else:
            advice = "Check the request fields against the dataset's download form on the CDS web site."
        return self.mask(
            f"CDS request for {request.dataset} {request.dates[0]} .. {request.dates[1]} failed: "
            f"{type(error).__name__}: {error}. {advice}"
        )


_GRIB_MAGIC = b"GRIB"
_NETCDF_MAGICS = (b"CDF\x01", b"CDF\x02", b"CDF\x05", b"\x89HDF\r\n\x1a\n")
_ZIP_MAGIC = b"PK\x03\x04"


def _store_download(temporary: Path, target_dir: Path, stem: str, request: CdsRequest) -> tuple[dict[Path, str], bool]:
    """Move a finished download into the cache by its content: GRIB, NetCDF, or a zip of them."""
    with open(temporary, "rb") as stream:
        head = stream.read(8)

    if head.startswith(_ZIP_MAGIC):
        return _extract_archive(temporary, target_dir / stem), True
    if head.startswith(_GRIB_MAGIC):
        suffix = ".grib"
    elif head.startswith(_NETCDF_MAGICS):
        suffix = ".nc"
    else:
        raise CdsRetrievalError(
            f"CDS download for {request.dataset} {request.dates[0]} .. {request.dates[1]} is neither GRIB, "
            f"NetCDF nor zip (first bytes {head!r}). Retry the request; the file was not kept."
        )
    target = target_dir / f"{stem}{suffix}"
    sha256 = sha256_file(temporary)
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
    return {target: sha256}, False


def _extract_archive(archive: Path, folder: Path) -> dict[Path, str]:
    """Extract the files of a zip into `folder` by their base names, replacing the folder whole."""
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}.tmp")
    staging.mkdir()
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                name = PurePosixPath(member.filename).name
                if member.is_dir() or not name or name.startswith("."):
                    continue
                if (staging / name).exists():
                    raise CdsRetrievalError(f"CDS zip archive {archive} contains two files named {name}")
                with bundle.open(member) as source, open(staging / name, "wb") as target:
                    shutil.copyfileobj(source, target)
        if not any(staging.iterdir()):
            raise CdsRetrievalError(f"CDS zip archive {archive} contains no files")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {path: sha256_file(path) for path in sorted(folder.iterdir())}


# --- remote Zarr stores -------------------------------------------------------------------


class RemoteZarrSource(BaseModel):
    """A selection from a Zarr store laid out like ARCO-ERA5 or WeatherBench 2."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="fsspec URL (https://, gs://, s3://) or local path of the store")
    variables: list[str] = Field(
        min_length=1, description="ERA5 short names (t2m, u, ...) or the store's variable names"
    )
    time: TimeRange | None = Field(None, description="first and last time step, inclusive (default: all)")
    area: Area | None = Field(None, description="[north, west, south, east] in degrees (default: the whole grid)")
    levels: list[float] | None = Field(None, description="pressure levels in hPa (default: all)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options, such as {'token': 'anon'} for gs:// URLs; never recorded",
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
    form; use the JSON form for that. `default_time` fills in `time` when it is missing.
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
        raise ValueError(f"Zarr source {text!r} has no variables=...: name the ERA5 variables to read")
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

    sha256 = _selection_sha256(group, store, list(names), subset)
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
        raise InvalidSourceError(f"Zarr store {source.url} not found: give an existing folder or a URL")
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
    """Map each requested variable to its store name; return `{store name: ERA5 short name}`."""
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
        available = sorted(f"{ERA5_SHORT_NAMES[str(name)]} ({name})" if name in ERA5_SHORT_NAMES else str(name)
                           for name in store.data_vars)
        raise InvalidSourceError(
            f"variables {missing} not found in Zarr store {source.to_source_string()} (available: {', '.join(available)})"
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
        raise InvalidSourceError(f"time {period[0]} .. {period[1]} selects no time step of {where}, which covers {covers}")
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


def _longitude_indexer(longitudes: np.ndarray, west: float, east: float, where: str) -> tuple[slice | np.ndarray, np.ndarray]:
    """Select longitudes from `west` eastwards to `east`, wrapping at 360 degrees.

    Returns the indexer, in order of increasing distance east of `west`, and the selected
    longitudes shifted by whole turns into `west .. west + 360`.
    """
    span = east - west if east >= west else east - west + 360.0
    if span > 360.0:
        raise InvalidSourceError(f"area west {west} and east {east} span more than 360 degrees")
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
    return _as_indexer(inside), selected + 360.0 * turns


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


def _selection_sha256(group: zarr.Group, store: xr.Dataset, names: list[str], subset: xr.Dataset) -> str:
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
