"""Pydantic schemas of the catalog: sample files (`SampleEntry`) and ingested datasets.

An ingested dataset is either ERA5 fields (`DatasetEntry`) or images (`ImageDatasetEntry`,
marked `kind: images`). All are stored as YAML. Unknown keys are rejected, so a misspelt
field fails when the entry is loaded, with the field's name in the error.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import PurePosixPath
from typing import Annotated, Literal
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


RECIPE_DIGEST_DESCRIPTION = (
    "sha256 of the ingest recipe (source sha256 digests and parameters). Ingest reuses or resumes a dataset by it."
)
CONTENT_DIGEST_DESCRIPTION = (
    "sha256 of the stored data and statistics (`data_catalog.catalog.content_digest`). MLflow records it as the "
    "dataset input of every run that reads the dataset. None only in the journal of an unfinished ingest, "
    "because it is computed after the store is written."
)
VERSION_DESCRIPTION = (
    "1 for a new name, plus 1 each time the name is published with a different content digest."
)

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
    missing_values: int = Field(default=0, ge=0, description="NaN values in the whole dataset.")
    mask: str | None = Field(default=None, description="Boolean variable that is True where values are missing.")


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
    """Training-period normalisation statistics of one variable.

    `global`: mean and standard deviation, one value per level (one value without levels).
    `local`: per calendar month, level and grid point; the arrays are in the `group` of the
    Zarr store, and the entry lists the months.
    """

    scheme: Literal["global", "local"] = "global"
    mean: list[float] | None = None
    std: list[float] | None = None
    count: list[int] | None = Field(default=None, description="Valid training values per level.")
    months: list[int] | None = Field(default=None, description="Calendar months with local statistics.")
    group: str | None = Field(default=None, description="Zarr group of the local statistics arrays.")

    @model_validator(mode="after")
    def _check_lengths(self) -> VariableStatistics:
        if self.scheme == "local":
            if not self.months or self.group is None or self.mean is not None or self.std is not None:
                raise ValueError("local statistics need months and group, and keep mean and std in the Zarr group")
            return self
        if self.mean is None or self.std is None or len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"mean ({len(self.mean or [])} values) and std ({len(self.std or [])} values) must be "
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
    members: list[int] | None = Field(default=None, description="Ensemble member numbers (the `member` dimension).")
    grid: GridInfo
    time_start: datetime
    time_end: datetime
    time_step: timedelta
    time_count: int = Field(gt=0)
    time_chunk: int = Field(gt=0, description="Time steps per Zarr chunk.")
    time_gaps: list[tuple[datetime, datetime]] = Field(
        default_factory=list, description="Consecutive time steps further apart than `time_step`."
    )
    train_period: Period
    test_period: Period | None = Field(default=None, description="None for a dataset that is not evaluated.")
    statistics: dict[str, VariableStatistics]
    provenance: Provenance
    digest: Sha256 = Field(description=RECIPE_DIGEST_DESCRIPTION)
    content_digest: Sha256 | None = Field(default=None, description=CONTENT_DIGEST_DESCRIPTION)
    version: int = Field(default=1, ge=1, description=VERSION_DESCRIPTION)
    created: datetime

    @model_validator(mode="after")
    def _check_consistency(self) -> DatasetEntry:
        missing = sorted(set(self.variables) - set(self.statistics))
        if missing:
            raise ValueError(f"variables {missing} have no statistics")
        if self.time_start > self.time_end:
            raise ValueError(f"time_start {self.time_start} is after time_end {self.time_end}")
        return self


class ImageClass(_Strict):
    """One class of an image dataset: its index (the stored `label`), WordNet id and readable name."""

    index: int = Field(ge=0)
    wnid: str = Field(min_length=1, description="WordNet id such as n01440764, or the class folder name.")
    name: str | None = Field(default=None, description="Readable class name, None when the source has none.")


class ChannelStatistics(_Strict):
    """Mean and population standard deviation of each channel (R, G, B) in 8-bit pixel units (0 to 255).

    Both are taken over every pixel of every stored image, after resizing and cropping.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class SkippedImage(_Strict):
    """A source image that could not be decoded and is not in the dataset."""

    path: str = Field(description="Path relative to the source folder.")
    error: str


class ImageProvenance(_Strict):
    """Lineage of an image dataset: the source folder, a digest of its files, parameters and package versions."""

    folder: str
    layout: Literal["imagefolder", "flat"]
    labels_file: SourceFile | None = Field(default=None, description="The label file of a flat folder.")
    file_count: int = Field(ge=0, description="Image files found, including skipped ones.")
    files_digest: Sha256 = Field(
        description="sha256 over each image's relative path and the sha256 of its bytes, in dataset order.",
    )
    parameters: dict[str, object] = Field(default_factory=dict)
    packages: dict[str, str]
    created: datetime


class ImageDatasetEntry(_Strict):
    """An image Zarr dataset written by `tasks.imagenet`: uint8 RGB images, labels and class table."""

    name: Name
    kind: Literal["images"] = "images"
    zarr_path: str = Field(
        description=(
            "Path of the Zarr store. Ingest writes it absolute, and a relative path starts at the catalog root."
        ),
    )
    image_size: int = Field(gt=0, description="Height and width of every stored image in pixels.")
    image_count: int = Field(gt=0)
    chunk_images: int = Field(gt=0, description="Images per Zarr chunk.")
    classes: list[ImageClass]
    statistics: ChannelStatistics
    skipped: list[SkippedImage] = Field(default_factory=list)
    provenance: ImageProvenance
    digest: Sha256 = Field(description=RECIPE_DIGEST_DESCRIPTION)
    content_digest: Sha256 | None = Field(default=None, description=CONTENT_DIGEST_DESCRIPTION)
    version: int = Field(default=1, ge=1, description=VERSION_DESCRIPTION)
    created: datetime

    @model_validator(mode="after")
    def _check_consistency(self) -> ImageDatasetEntry:
        indices = [item.index for item in self.classes]
        if len(set(indices)) != len(indices):
            raise ValueError("classes repeat a class index")
        wnids = [item.wnid for item in self.classes]
        if len(set(wnids)) != len(wnids):
            raise ValueError("classes repeat a wnid")
        if self.image_count + len(self.skipped) != self.provenance.file_count:
            raise ValueError(
                f"image_count {self.image_count} plus {len(self.skipped)} skipped images differs from "
                f"provenance.file_count {self.provenance.file_count}"
            )
        return self


CatalogEntry = DatasetEntry | ImageDatasetEntry
"""Any entry the catalog stores: ERA5 fields or images."""
