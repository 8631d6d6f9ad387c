"""Resumable Zarr writing: a temporary store named by the recipe digest, and a journal of finished time regions.

`ingest_era5` writes a dataset into `.<name>.zarr.tmp-<digest>` beside its target, one
time region (one chunk of `time_chunk` steps by the whole grid) at a time. After it
creates the store, and then at most every SAVE_INTERVAL_S seconds as regions finish, it
rewrites the journal `.<name>.zarr.journal-<digest>.json` atomically. The journal contains the catalog entry
(and so the statistics) and the indices of the finished regions. A run of the same recipe
after a hard kill (`kill -9`, out of memory, power loss) finds both files, keeps the
entry and statistics, and writes only the regions that the journal does not list.

`link_store` builds the staging copy of a store that `tasks.append` extends: hard links
to the chunk files, copies of the metadata.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from data_catalog.schema import DatasetEntry
from data_catalog.workspace import atomic_write_text

logger = logging.getLogger(__name__)

JOURNAL_FORMAT_VERSION = 1
# Characters of the recipe digest in the names of temporary stores and journals.
_DIGEST_CHARACTERS = 16
# `record_region` saves the journal at most once per this many seconds, so a hard kill loses
# at most this much finished work. A save took 3-10 ms with fsync on 2 busy cores, so
# saving after every region slowed fast ingests noticeably.
SAVE_INTERVAL_S = 0.5


@dataclass
class IngestJournal:
    """Progress of one ingest recipe: its catalog entry and the time regions already written."""

    digest: str
    entry: DatasetEntry
    time_chunk: int
    region_count: int
    completed: set[int] = field(default_factory=set)
    # time.monotonic() of the last save, and the entry as JSON values, dumped once.
    saved_at: float = field(default=float("-inf"), repr=False, compare=False)
    _entry_document: dict | None = field(default=None, repr=False, compare=False)

    def pending(self) -> list[int]:
        """Return the indices of the regions still to write, in order."""
        return [index for index in range(self.region_count) if index not in self.completed]


def temporary_store_path(target: Path, digest: str) -> Path:
    """Return the temporary store of the recipe `digest`, beside `target`, where a re-run finds it."""
    return target.with_name(f".{target.name}.tmp-{digest[:_DIGEST_CHARACTERS]}")


def journal_path(target: Path, digest: str) -> Path:
    return target.with_name(f".{target.name}.journal-{digest[:_DIGEST_CHARACTERS]}.json")


def save_journal(target: Path, journal: IngestJournal) -> None:
    """Write the journal atomically, so a kill leaves the previous or the new version, never a partial one.

    The write skips fsync: after a power loss the journal may be missing or empty, and
    `load_journal` then starts the ingest again.
    """
    if journal._entry_document is None:
        journal._entry_document = journal.entry.model_dump(mode="json")
    document = {
        "format_version": JOURNAL_FORMAT_VERSION,
        "digest": journal.digest,
        "time_chunk": journal.time_chunk,
        "region_count": journal.region_count,
        "completed": sorted(journal.completed),
        "entry": journal._entry_document,
    }
    atomic_write_text(journal_path(target, journal.digest), json.dumps(document, indent=1), durable=False)
    journal.saved_at = time.monotonic()


def record_region(target: Path, journal: IngestJournal, index: int) -> None:
    """Mark region `index` as written, and save the journal when SAVE_INTERVAL_S has passed or no region is left."""
    journal.completed.add(index)
    if len(journal.completed) == journal.region_count or time.monotonic() - journal.saved_at >= SAVE_INTERVAL_S:
        save_journal(target, journal)


def load_journal(target: Path, digest: str) -> IngestJournal | None:
    """Return the journal of an interrupted ingest of recipe `digest`, or None when there is none to resume.

    An unreadable journal, one of another format or recipe, or one without its temporary
    store is deleted together with the store, and None is returned.
    """
    path = journal_path(target, digest)
    store = temporary_store_path(target, digest)
    if not path.is_file():
        if store.exists():
            logger.info("temporary store %s has no journal (killed while being created), so it is removed", store)
            shutil.rmtree(store, ignore_errors=True)
        return None

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format_version") != JOURNAL_FORMAT_VERSION or document.get("digest") != digest:
            raise ValueError(f"journal has format {document.get('format_version')} and digest {document.get('digest')}")
        journal = IngestJournal(
            digest=digest,
            entry=DatasetEntry.model_validate(document["entry"]),
            time_chunk=int(document["time_chunk"]),
            region_count=int(document["region_count"]),
            completed={int(index) for index in document["completed"]},
        )
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as error:
        logger.warning("journal %s cannot be used (%s), so the ingest starts again", path, error)
        discard(target, digest)
        return None

    if not store.is_dir():
        logger.warning("journal %s has no temporary store %s, so the ingest starts again", path, store)
        discard(target, digest)
        return None
    return journal


def discard(target: Path, digest: str) -> None:
    """Remove the temporary store and the journal of recipe `digest`."""
    shutil.rmtree(temporary_store_path(target, digest), ignore_errors=True)
    journal_path(target, digest).unlink(missing_ok=True)


def discard_other_recipes(target: Path, digest: str) -> None:
    """Remove temporary stores and journals that interrupted ingests of other recipes left beside `target`.

    Call it while holding the dataset lock of the name (`data_catalog.locks`), so no other
    ingest is writing one of them.
    """
    keep = {temporary_store_path(target, digest).name, journal_path(target, digest).name}
    prefixes = (f".{target.name}.tmp-", f".{target.name}.journal-")
    if not target.parent.is_dir():
        return
    for path in target.parent.iterdir():
        if path.name.startswith(prefixes) and path.name not in keep:
            logger.info("removing %s, left by an interrupted ingest of another recipe", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def region_bounds(index: int, time_chunk: int, time_count: int) -> slice:
    """Return the time slice of region `index`: `time_chunk` steps, fewer in the last region."""
    return slice(index * time_chunk, min((index + 1) * time_chunk, time_count))


def link_store(source: Path, target: Path) -> None:
    """Build `target` as a copy of the Zarr store `source` that shares its chunk files as hard links.

    Metadata files (`zarr.json`) are copied. Linking chunks is safe because zarr 3's
    LocalStore (3.1) writes every file to a temporary name and renames it into place, so a
    write to `target` replaces its link and never changes the file that `source` contains.
    """
    for folder, _, files in os.walk(source):
        relative = Path(folder).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            origin = Path(folder) / name
            destination = target / relative / name
            if name == "zarr.json":
                shutil.copy2(origin, destination)
            else:
                os.link(origin, destination)
