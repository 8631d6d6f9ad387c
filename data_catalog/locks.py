"""Exclusive locks on dataset names, so two ingests or appends never write the same dataset at once.

The lock of dataset `<name>` is an advisory `fcntl.flock` lock on `<root>/locks/<name>.lock`.
The kernel releases it when its process ends, also on `kill -9`, so a dead process never
leaves a lock that blocks later runs. The file contains the holder's pid, host and start
time, which the error of a second writer names.

NOTE: flock locks are reliable on local file systems. Over NFS, Linux emulates them with
POSIX byte-range locks, which work across hosts when the server supports locking. Other
network file systems may not lock at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from data_catalog.catalog import Catalog

logger = logging.getLogger(__name__)

LOCKS_FOLDER = "locks"


class DatasetLockedError(RuntimeError):
    """Error for a dataset name that another running ingest or append is writing."""


def lock_path(catalog: Catalog, name: str) -> Path:
    """Return the lock file of dataset `name`: `<root>/locks/<name>.lock`."""
    return catalog.root / LOCKS_FOLDER / f"{catalog.entry_path(name).stem}.lock"


@contextlib.contextmanager
def dataset_lock(catalog: Catalog, name: str, operation: str = "ingest") -> Iterator[Path]:
    """Hold the exclusive lock of dataset `name` for the block, or raise DatasetLockedError at once.

    The lock is not re-entrant: a second `dataset_lock` on the same name raises, even in the
    same process. `operation` ("ingest", "append") is recorded for the error of a second writer.
    """
    path = lock_path(catalog, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_CREAT without O_TRUNC, so a process that fails to take the lock leaves the holder's record intact.
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetLockedError(
                f"dataset {name!r} is being written by another process ({_describe_holder(path)}), which holds the "
                f"lock file {path}. Wait until it finishes, or stop it. A process that died releases the lock itself."
            ) from None

        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "operation": operation,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(record).encode("utf-8"), 0)
        logger.debug("took the lock %s of dataset %s", path, name)
        yield path
    finally:
        # Closing the descriptor releases the lock. The file stays, since removing it would let a
        # waiting process lock a file that a third process then replaces.
        os.close(descriptor)


def holds_dataset_lock(operation: str) -> Callable[[Callable], Callable]:
    """Decorate a function with `name` and `catalog` parameters so each call holds the lock of `name`.

    A `catalog` of None becomes `Catalog()` before the call, so the lock and the function
    use the same workspace.
    """

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: object, **kwargs: object) -> object:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if bound.arguments["catalog"] is None:
                bound.arguments["catalog"] = Catalog()
            with dataset_lock(bound.arguments["catalog"], bound.arguments["name"], operation):
                return function(*bound.args, **bound.kwargs)

        return locked

    return decorate


def _describe_holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return f"{record['operation']} with pid {record['pid']} on host {record['host']}, since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: its record is missing or being written"
