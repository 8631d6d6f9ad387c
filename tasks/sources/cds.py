"""ERA5 from the Copernicus Climate Data Store (CDS) through the cdsapi client, with a download cache."""

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import cdsapi
import cdsapi.api
import pandas as pd
import pydantic
import requests
import xarray as xr
import yaml
from ecmwf.datastores.processing import DownloadError, ProcessingFailedError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from data_catalog.workspace import atomic_write_text, sha256_file
from tasks.ingest import open_source
from tasks.sources.common import CDS_VARIABLE_NAMES, Area, attach_source_record

logger = logging.getLogger(__name__)

CDS_PREFIX = "cds:"
DEFAULT_CDSAPI_RC = "~/.cdsapirc"
CDS_API_URL = "https://cds.climate.copernicus.eu/api"
ALL_HOURS = tuple(f"{hour:02d}:00" for hour in range(24))
SINGLE_LEVELS = "reanalysis-era5-single-levels"
PRESSURE_LEVELS = "reanalysis-era5-pressure-levels"


class CdsCredentialsError(RuntimeError):
    """Error for missing or unusable CDS API credentials. The message explains how to create them."""


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
        description="ERA5 short names (t2m, u, ...), sent as their CDS names, or CDS variable names "
        "(2m_temperature, ...)",
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
            raise ValueError(f"dates {first} .. {last} span several months, so send monthly_requests() one by one")
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


def _store_download(
    temporary: Path, target_dir: Path, stem: str, request: CdsRequest
) -> tuple[dict[Path, str], bool]:
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
