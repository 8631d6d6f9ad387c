"""Pydantic schemas of the catalog: sample files (`SampleEntry`) and ingested datasets (`DatasetEntry`).

Both are stored as YAML. Unknown keys are rejected, so a misspelt field fails when the
entry is loaded, with the field's name in the error.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import PurePosixPath
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


def _to_naive_utc(moment: datetime) -> datetime:
    # Dataset times are naive datetime64 values in UTC, so aware inputs are converted to match.
    if moment.tzinfo is not None:
        return moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def _validate_period(period: tuple[datetime, datetime]) -> tuple[datetime, datetime]:
    start, end = (_to_naive_utc(moment) for moment in period)
    if start > end:
        raise ValueError(f"period start {start.isoformat()} is after its end {end.isoformat()}")
    return start, end


Period = Annotated[tuple[datetime, datetime], AfterValidator(_validate_period)]
"""Inclusive time range `(start, end)` in naive UTC, stored as two ISO 8601 strings."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleEntry(_Strict):
    """A public sample file, found either in the data mirror or at its canonical URL."""

    name: Name
    url: str | None = Field(
        default=None,
        description="Canonical public http(s) URL, or None when no stable public address is known.",
    )
    sha256: Sha256
    mirror_path: str = Field(description="Relative POSIX path of the file inside the data mirror folder.")
    description: str
    licence: str
    attribution: str

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url {url!r} is not an http(s) URL with a host")
        return url

    @field_validator("mirror_path")
    @classmethod
    def _check_mirror_path(cls, mirror_path: str) -> str:
        path = PurePosixPath(mirror_path)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(
                f"mirror_path {mirror_path!r} must be a relative path inside the mirror folder, "
                "without '..'"
            )
        return str(path)


class VariableInfo(_Strict):
    """Metadata of one data variable, copied from the source attributes."""

    units: str
    long_name: str | None = None
    standard_name: str | None = None
    has_levels: bool = Field(description="True when the variable has a `level` dimension.")


class GridInfo(_Strict):
    """Regular latitude-longitude grid in degrees, with latitude running north to south."""

    latitude_first: float
    latitude_last: float
    latitude_step: float = Field(description="Signed step in degrees, negative because latitude descends.")
    longitude_first: float
    longitude_last: float
    longitude_step: float
    shape: tuple[int, int] = Field(description="(latitude points, longitude points)")


class VariableStatistics(_Strict):
    """Training-period mean and standard deviation, one value per level (one value without levels)."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _check_lengths(self) -> VariableStatistics:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"mean ({len(self.mean)} values) and std ({len(self.std)} values) must be "
                "non-empty lists of equal length"
            )
        return self


class SourceFile(_Strict):
    path: str
    sha256: Sha256
    size: int = Field(ge=0, description="File size in bytes.")


class Provenance(_Strict):
    """Lineage of a dataset: the source files, the ingest parameters and the package versions."""

    sources: list[SourceFile]
    parameters: dict[str, object] = Field(default_factory=dict)
    packages: dict[str, str]
    created: datetime


class DatasetEntry(_Strict):
    """A normalised Zarr dataset written by `tasks.ingest`."""

    name: Name
    zarr_path: str = Field(
        description=(
            "Path of the Zarr store. Ingest writes it absolute, and a relative path starts at the catalog root."
        ),
    )
    variables: dict[str, VariableInfo]
    levels: list[float] | None = Field(default=None, description="Pressure levels in hPa, ascending.")
    grid: GridInfo
    time_start: datetime
    time_end: datetime
    time_step: timedelta
    time_count: int = Field(gt=0)
    time_chunk: int = Field(gt=0, description="Time steps per Zarr chunk.")
    train_period: Period
    test_period: Period
    statistics: dict[str, VariableStatistics]
    provenance: Provenance
    digest: Sha256
    created: datetime

    @model_validator(mode="after")
    def _check_consistency(self) -> DatasetEntry:
        missing = sorted(set(self.variables) - set(self.statistics))
        if missing:
            raise ValueError(f"variables {missing} have no statistics")
        if self.time_start > self.time_end:
            raise ValueError(f"time_start {self.time_start} is after time_end {self.time_end}")
        return self
