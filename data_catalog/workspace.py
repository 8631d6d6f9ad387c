"""The working folder (`ATMOREP_HOME`) and the file helpers every artifact writer uses.

Layout under the working folder:

- `data/<name>.zarr`: normalised datasets
- `catalog/<name>.yaml`: catalog entries of ingested datasets
- `samples/`: downloaded sample files, laid out like the data mirror
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

ATMOREP_HOME_ENV = "ATMOREP_HOME"
DATA_MIRROR_ENV = "ATMOREP_DATA_MIRROR"
DEFAULT_HOME = "runs"

_HASH_BLOCK_BYTES = 1 << 20


def atmorep_home() -> Path:
    """Create and return the working folder: `$ATMOREP_HOME`, else `./runs`, as an absolute path."""
    configured = os.environ.get(ATMOREP_HOME_ENV)
    home = Path(configured).expanduser() if configured else Path(DEFAULT_HOME)
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def sha256_file(path: Path) -> str:
    """Return the sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`.

    Readers see either the old file or the complete new one, never a partial write.
    `durable` False skips the fsync, which costs milliseconds per call: the write then
    survives a killed process but perhaps not a power loss or an OS crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Return the installed version of each named distribution, or "not installed"."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
