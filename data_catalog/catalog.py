"""Catalog of ingested datasets: one YAML entry per dataset, and opening a dataset by name."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydantic
import xarray as xr
import yaml

from data_catalog.schema import NAME_PATTERN, CatalogEntry, DatasetEntry, ImageDatasetEntry
from data_catalog.workspace import atmorep_home, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)


class DatasetNotFoundError(KeyError):
    """No catalog entry with the requested name."""

    def __str__(self) -> str:
        # KeyError.__str__ would quote the message, so return it unchanged.
        return str(self.args[0]) if self.args else ""


class InvalidCatalogEntryError(ValueError):
    """A catalog file exists but does not parse or validate."""


def dataset_digest(source_sha256s: Iterable[str], parameters: Mapping[str, object]) -> str:
    """Return the sha256 hex digest of an ingest recipe.

    The recipe is the sorted source sha256 digests plus the ingest parameters, encoded as
    JSON with sorted keys. The source order and the file paths do not change the digest.
    `parameters` must be JSON serialisable.
    """
    recipe = {"sources": sorted(source_sha256s), "parameters": dict(parameters)}
    encoded = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def content_digest(store: Path, metadata: Mapping[str, object]) -> str:
    """Return the sha256 hex digest of a Zarr store's data and of its metadata outside the arrays.

    The digest covers, in this order:

    1. every file of the store except the root `zarr.json`, sorted by relative POSIX path,
       as one line `<path>\t<sha256 of the file's bytes>\n` each. These are the chunk files
       and the `zarr.json` of every array and child group (shape, dtype, codecs, fill value
       and array attributes such as units);
    2. the line `metadata\t` followed by `metadata` as JSON with sorted keys, for example
       the statistics and the train and test periods that only the catalog entry and the
       root attributes contain.

    The root `zarr.json` is left out because its attributes contain creation times, the recipe
    digest and this digest itself. Files are read in 1 MiB blocks, so memory stays bounded.
    `metadata` must be JSON serialisable.
    """
    store = Path(store)
    if not (store / "zarr.json").is_file():
        raise FileNotFoundError(f"{store} is not a Zarr format 3 store: its root zarr.json is missing")

    files = sorted(
        path.relative_to(store).as_posix()
        for path in store.rglob("*")
        if path.is_file() and path != store / "zarr.json"
    )
    # hashlib releases the GIL on large blocks, so threads hash several files at once.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        file_digests = list(pool.map(sha256_file, [store / relative for relative in files]))
    digest = hashlib.sha256()
    for relative, file_digest in zip(files, file_digests, strict=True):
        digest.update(f"{relative}\t{file_digest}\n".encode("utf-8"))
    encoded = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))
    digest.update(f"metadata\t{encoded}".encode("utf-8"))
    return digest.hexdigest()


class Catalog:
    """Dataset entries under `root/catalog/<name>.yaml` and Zarr stores under `root/data/`.

    `root` defaults to the working folder (`$ATMOREP_HOME`, else `./runs`).
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser().resolve() if root is not None else atmorep_home()
        self.entries_dir = self.root / "catalog"
        self.data_dir = self.root / "data"

    def __repr__(self) -> str:
        return f"Catalog(root={str(self.root)!r})"

    def entry_path(self, name: str) -> Path:
        _check_name(name)
        return self.entries_dir / f"{name}.yaml"

    def default_zarr_path(self, name: str) -> Path:
        """Return where ingest writes the dataset `name`: `root/data/<name>.zarr`."""
        _check_name(name)
        return self.data_dir / f"{name}.zarr"

    def resolve_zarr_path(self, entry: CatalogEntry) -> Path:
        """Return the absolute path of an entry's Zarr store (relative paths start at `root`)."""
        path = Path(entry.zarr_path)
        return path if path.is_absolute() else self.root / path

    def names(self) -> list[str]:
        """Return the sorted names of all published datasets."""
        if not self.entries_dir.is_dir():
            return []
        return sorted(path.stem for path in self.entries_dir.glob("*.yaml"))

    def __contains__(self, name: str) -> bool:
        return self.entry_path(name).is_file()

    def next_version(self, name: str, content_digest: str) -> int:
        """Return the version that an entry `name` with `content_digest` gets when it is published.

        That is 1 when no entry `name` exists, the published version when the published
        content digest is the same, and the published version plus 1 otherwise. An entry
        that does not validate counts as missing, with a warning.
        """
        if name not in self:
            return 1
        try:
            published = self.get(name)
        except InvalidCatalogEntryError as error:
            logger.warning("catalog entry %s is invalid (%s), so the new entry of %s gets version 1", name, error, name)
            return 1
        if published.content_digest == content_digest:
            return published.version
        return published.version + 1

    def publish(self, entry: CatalogEntry) -> Path:
        """Write `entry` as YAML atomically, replacing an older entry of the same name.

        Raises ValueError when the entry has no content digest.
        """
        if entry.content_digest is None:
            raise ValueError(
                f"catalog entry {entry.name!r} has no content_digest. Compute it with content_digest() "
                "after the store is written, then publish."
            )
        path = self.entry_path(entry.name)
        text = yaml.dump(entry.model_dump(mode="json"), Dumper=_EntryDumper, sort_keys=False, allow_unicode=True)
        atomic_write_text(path, text)
        logger.info(
            "published dataset %s version %d (content digest %s, recipe digest %s) to %s",
            entry.name, entry.version, entry.content_digest[:12], entry.digest[:12], path,
        )
        return path

    def remove(self, name: str) -> bool:
        """Delete the entry `name` and return whether it existed. The Zarr store is left alone."""
        path = self.entry_path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        logger.info("removed catalog entry %s", path)
        return True

    def get(self, name: str) -> CatalogEntry:
        """Load and validate the entry `name`: an ImageDatasetEntry when it has `kind: images`, else a DatasetEntry.

        Raises DatasetNotFoundError (a KeyError) listing the known names when there is no
        entry, and InvalidCatalogEntryError naming the file when it does not validate or
        has no content digest.
        """
        path = self.entry_path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            known = ", ".join(self.names()) or "none"
            raise DatasetNotFoundError(
                f"dataset {name!r} not found in catalog {self.entries_dir} (known datasets: {known}). "
                "Ingest it first with `atmorep ingest era5` or `atmorep ingest imagenet`."
            ) from None

        try:
            entry = _validate_entry(yaml.safe_load(text))
        except (yaml.YAMLError, pydantic.ValidationError) as error:
            raise InvalidCatalogEntryError(
                f"catalog entry {path} is invalid: {error}. Re-ingest the dataset or delete the file."
            ) from error
        if entry.content_digest is None:
            raise InvalidCatalogEntryError(
                f"catalog entry {path} has no content_digest, so it was written by an older version of "
                "atmorep-pipeline. Re-ingest the dataset."
            )
        return entry

    def open_dataset(self, name: str) -> xr.Dataset:
        """Open the normalised dataset `name` lazily (dask arrays) with `xr.open_zarr`.

        Raises FileNotFoundError when the store is missing, and InvalidCatalogEntryError
        when the store's digest differs from the entry's, which means they come from
        different ingest runs.
        """
        entry = self.get(name)
        path = self.resolve_zarr_path(entry)
        if not path.is_dir():
            raise FileNotFoundError(
                f"Zarr store {path} of dataset {name!r} not found. Re-ingest the dataset."
            )

        dataset = xr.open_zarr(path, consolidated=False)
        stored_digest = dataset.attrs.get("digest")
        if stored_digest != entry.digest:
            raise InvalidCatalogEntryError(
                f"Zarr store {path} has digest {stored_digest!r} but catalog entry {self.entry_path(name)} "
                f"has {entry.digest!r}. Re-ingest dataset {name!r}."
            )
        return dataset


def _validate_entry(document: object) -> CatalogEntry:
    """Validate a parsed YAML entry as the schema its `kind` names (ERA5 fields when it has none)."""
    if isinstance(document, dict) and document.get("kind") == "images":
        return ImageDatasetEntry.model_validate(document)
    return DatasetEntry.model_validate(document)


class _EntryDumper(yaml.SafeDumper):
    """Safe YAML dumper that writes lists of scalars (periods, statistics, levels) on one line."""


def _represent_list(dumper: yaml.SafeDumper, items: list) -> yaml.Node:
    flat = all(item is None or isinstance(item, (bool, int, float, str)) for item in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flat)


_EntryDumper.add_representer(list, _represent_list)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None:
        raise ValueError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-'")
