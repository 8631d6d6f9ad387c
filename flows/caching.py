"""Prefect caching of the data stages, so that a re-run with the same inputs and sources skips the work.

The cache key of an ingest task run is the hash of the inputs that decide the dataset,
the catalog root, the task's source code and the sha256 of every source. A sha256 is
computed once per file and recorded in `<catalog root>/cache/source-sha256.json` with the
file's size, modification time and inode, so a later key reuses it while those three are
unchanged. Prefect stores the cached results under its results folder (by default
`$PREFECT_HOME/storage`).

A cached result names a published dataset. `run_data_task` runs the task afresh instead
of taking the cache when the catalog no longer has that dataset, or has it with other
content, or its Zarr store is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr
from prefect import Task, get_run_logger
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from data_catalog import Catalog
from data_catalog.catalog import InvalidCatalogEntryError
from data_catalog.schema import CatalogEntry, SourceFile
from data_catalog.workspace import atomic_write_text, sha256_file
from tasks.imagenet import discover_images, files_digest
from tasks.ingest import SOURCE_RECORD_ATTR

logger = logging.getLogger(__name__)

SOURCE_DIGESTS_FILE = Path("cache") / "source-sha256.json"
CACHED_STATE = "Cached"


class SourceDigests:
    """The recorded sha256 of source files and folders, keyed by absolute path.

    A record is reused only while the stat fingerprint stored with it matches: size in
    bytes, modification time in ns and inode for a file, the hash of those of every
    image for a folder.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.path = catalog.root / SOURCE_DIGESTS_FILE
        try:
            self.records: dict[str, dict[str, str]] = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.records = {}
        except (OSError, ValueError) as error:
            logger.warning("source digest file %s is unreadable (%s), so the digests are computed again", self.path, error)
            self.records = {}
        self.changed = False

    def lookup(self, key: str, fingerprint: str, compute: Callable[[], str]) -> str:
        """Return the recorded sha256 of `key` when its fingerprint matches, else compute and record it."""
        record = self.records.get(key)
        if record is not None and record.get("fingerprint") == fingerprint:
            return record["sha256"]
        digest = compute()
        self.records[key] = {"fingerprint": fingerprint, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        """Write the records atomically when they changed.

        Two runs that save at once keep the records of the last one, and a lost record
        only costs one more hash of its file.
        """
        if self.changed:
            atomic_write_text(self.path, json.dumps(self.records, indent=1, sort_keys=True), durable=False)
            self.changed = False


def file_fingerprint(path: Path) -> str:
    """Return `size:mtime_ns:inode` of a file, which changes when the file is rewritten or replaced."""
    status = path.stat()
    return f"{status.st_size}:{status.st_mtime_ns}:{status.st_ino}"


def era5_source_digests(sources: Sequence[Path | xr.Dataset], catalog: Catalog) -> list[str]:
    """Return the sha256 of each ERA5 source, in order.

    A file's digest comes from `SourceDigests`. An opened dataset carries its digest in
    its provenance record (`tasks.ingest.SOURCE_RECORD_ATTR`). Raises ValueError for a
    dataset without a valid record.
    """
    recorded = SourceDigests(catalog)
    digests = []
    for source in sources:
        if isinstance(source, xr.Dataset):
            record = source.attrs.get(SOURCE_RECORD_ATTR)
            if record is None:
                raise ValueError(f"an opened dataset source has no provenance record in attrs[{SOURCE_RECORD_ATTR!r}]")
            digests.append(SourceFile.model_validate(record).sha256)
            continue
        path = Path(source).resolve()
        digests.append(recorded.lookup(str(path), file_fingerprint(path), lambda path=path: sha256_file(path)))
    recorded.save()
    return digests


def image_folder_digest(folder: Path, layout: str, catalog: Catalog) -> str:
    """Return the digest of an image folder's files as `tasks.imagenet.files_digest` computes it.

    NOTE: the first key of a folder reads every image once more than the ingest itself
    does. Later keys only list the folder and stat its files.
    """
    listing = discover_images(folder, layout)
    fingerprint = hashlib.sha256()
    if listing.labels_file is not None:
        fingerprint.update(f"{listing.labels_file.name}\t{file_fingerprint(listing.labels_file)}\n".encode())
    for image in listing.images:
        fingerprint.update(f"{image.relative_path}\t{file_fingerprint(image.path)}\n".encode())

    def compute() -> str:
        with ThreadPoolExecutor(thread_name_prefix="cache-key") as executor:
            return files_digest(listing, executor)

    recorded = SourceDigests(catalog)
    key = f"{listing.folder.resolve()}?layout={listing.layout}"
    digest = recorded.lookup(key, fingerprint.hexdigest(), compute)
    recorded.save()
    return digest


@dataclass
class DatasetInputs(CachePolicy):
    """Cache key over a data task's inputs and source code, with its sources replaced by their sha256.

    `sources` names the input that contains the sources and `digest_sources(value, inputs,
    catalog)` returns their digests. Inputs in `ignored` do not change the dataset (for
    example where the decoding runs), so they are left out of the key. The `catalog`
    input is replaced by its root folder.
    """

    sources: str = "sources"
    digest_sources: Callable[[Any, dict[str, Any], Catalog], Any] | None = None
    ignored: list[str] = field(default_factory=list)

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        catalog = inputs.get("catalog") or Catalog()
        keyed = {
            name: value for name, value in inputs.items()
            if name not in {self.sources, "catalog", *self.ignored}
        }
        keyed["catalog_root"] = str(catalog.root)
        # Composing with `+ TASK_SOURCE` would drop a None key of this policy and cache on
        # the task source alone, so the source key is part of this one.
        keyed["task_source"] = TASK_SOURCE.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        try:
            keyed["source_digests"] = self.digest_sources(inputs[self.sources], inputs, catalog)
        except (OSError, ValueError) as error:
            # The task itself then fails on the same source with its own message.
            logger.warning("no cache key for task %s, so its result is not cached: %s", task_ctx.task.name, error)
            return None
        return hash_objects(keyed, raise_on_failure=True)


ERA5_CACHE_POLICY = DatasetInputs(
    sources="sources",
    digest_sources=lambda sources, inputs, catalog: era5_source_digests(sources, catalog),
    # Neither changes the written store (see `tasks.ingest.ingest_era5`).
    ignored=["grib_decoder", "scheduler_address"],
)

IMAGENET_CACHE_POLICY = DatasetInputs(
    sources="source",
    digest_sources=lambda folder, inputs, catalog: image_folder_digest(
        Path(folder), inputs.get("layout", "auto"), catalog
    ),
    # The number of decoding threads does not change the written store.
    ignored=["workers"],
)


def published_as(catalog: Catalog, entry: CatalogEntry) -> bool:
    """Return whether the catalog publishes `entry`'s content under its name and its Zarr store exists."""
    if entry.name not in catalog:
        return False
    try:
        published = catalog.get(entry.name)
    except InvalidCatalogEntryError:
        return False
    return (
        published.content_digest == entry.content_digest
        and published.digest == entry.digest
        and catalog.resolve_zarr_path(published).is_dir()
    )


def is_published(catalog: Catalog, name: str) -> bool:
    """Return whether the catalog has a valid entry `name` whose Zarr store exists."""
    if name not in catalog:
        return False
    try:
        entry = catalog.get(name)
    except InvalidCatalogEntryError:
        return False
    return catalog.resolve_zarr_path(entry).is_dir()


def run_data_task(data_task: Task, catalog: Catalog, name: str, **inputs: Any) -> tuple[Any, bool]:
    """Run a cached data task that publishes dataset `name`, and return its result and whether it was cached.

    When the catalog has no published dataset `name`, the task runs with `refresh_cache`,
    so a cached result of the same inputs is replaced rather than returned. A cached
    result whose entry differs from the published one (the dataset was ingested again
    with other inputs since) is dropped the same way.
    """
    run_logger = get_run_logger()
    if not is_published(catalog, name):
        state = data_task.with_options(refresh_cache=True)(catalog=catalog, name=name, return_state=True, **inputs)
        return state.result(), False

    state = data_task(catalog=catalog, name=name, return_state=True, **inputs)
    result = state.result()
    if state.name != CACHED_STATE:
        return result, False
    if published_as(catalog, result.entry):
        return result, True

    run_logger.warning(
        "Cached result of %s names version %d of dataset %s, which the catalog no longer publishes: running it again",
        data_task.name, result.entry.version, name,
    )
    state = data_task.with_options(refresh_cache=True)(catalog=catalog, name=name, return_state=True, **inputs)
    return state.result(), False
