"""Public sample files: look them up in `samples.yaml`, take them from a mirror or download them.

A sample comes from one of two places. When `ATMOREP_DATA_MIRROR` is set, the file
`<mirror>/<mirror_path>` is checked against its sha256 and used where it is, without a
copy. Otherwise the file is downloaded from its canonical URL to `<dest>/<mirror_path>`
(default `dest` is `$ATMOREP_HOME/samples`), so that folder is itself laid out like a mirror.

`ATMOREP_SAMPLE_BASE_URL` replaces the scheme and host of every sample URL, for a local
copy of the public files.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pydantic
import requests
import yaml
from tqdm.auto import tqdm

from data_catalog.schema import SampleEntry
from data_catalog.workspace import DATA_MIRROR_ENV, atmorep_home, sha256_file

logger = logging.getLogger(__name__)

SAMPLES_FILE = Path(__file__).with_name("samples.yaml")
SAMPLE_BASE_URL_ENV = "ATMOREP_SAMPLE_BASE_URL"

_DOWNLOAD_BLOCK_BYTES = 1 << 20
_CONNECT_TIMEOUT_S = 15.0
_READ_TIMEOUT_S = 60.0


class SampleNotFoundError(KeyError):
    """No sample with the requested name in `samples.yaml`."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ChecksumMismatchError(ValueError):
    """A sample file's sha256 differs from the one recorded in `samples.yaml`."""


class SampleUnavailableError(RuntimeError):
    """A sample can neither be taken from a mirror nor downloaded."""


@functools.cache
def load_samples(path: Path = SAMPLES_FILE) -> dict[str, SampleEntry]:
    """Load and validate the sample list, keyed by name."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        entries = [SampleEntry.model_validate(item) for item in document["samples"]]
    except (OSError, KeyError, TypeError, yaml.YAMLError, pydantic.ValidationError) as error:
        raise ValueError(f"sample list {path} is invalid: {error}") from error

    samples: dict[str, SampleEntry] = {}
    for entry in entries:
        if entry.name in samples:
            raise ValueError(f"sample list {path} names sample {entry.name!r} twice")
        samples[entry.name] = entry
    return samples


def get_sample(name: str) -> SampleEntry:
    """Return the entry `name`, or raise SampleNotFoundError listing the known names."""
    samples = load_samples()
    try:
        return samples[name]
    except KeyError:
        raise SampleNotFoundError(
            f"sample {name!r} not found in {SAMPLES_FILE} (known samples: {', '.join(sorted(samples))})"
        ) from None


def fetch_sample(name: str, dest: Path | None = None, *, base_url: str | None = None) -> Path:
    """Return a local path to the verified sample `name`, downloading it if needed.

    With `ATMOREP_DATA_MIRROR` set, returns `<mirror>/<mirror_path>` after checking its
    sha256, and raises when the file is missing or differs. Otherwise downloads the
    sample URL to `<dest>/<mirror_path>` (default `dest`: `$ATMOREP_HOME/samples`),
    reusing a file already there when its sha256 matches. `base_url` (or
    `ATMOREP_SAMPLE_BASE_URL`) replaces the scheme and host of the sample URL.

    Raises ChecksumMismatchError, SampleUnavailableError (offline, no URL, HTTP error)
    or SampleNotFoundError, each naming the path or URL involved.
    """
    sample = get_sample(name)

    mirror = os.environ.get(DATA_MIRROR_ENV)
    if mirror:
        return _sample_from_mirror(sample, Path(mirror).expanduser())

    root = Path(dest).expanduser() if dest is not None else atmorep_home() / "samples"
    target = root.resolve() / sample.mirror_path
    if target.is_file():
        actual = sha256_file(target)
        if actual == sample.sha256:
            logger.info("reusing verified sample %s at %s", name, target)
            return target
        logger.warning(
            "sample file %s has sha256 %s, expected %s, so it is downloaded again", target, actual, sample.sha256
        )

    if sample.url is None:
        raise SampleUnavailableError(
            f"sample {name!r} has no public URL. Set {DATA_MIRROR_ENV} to a folder that "
            f"contains {sample.mirror_path}."
        )
    url = _with_base_url(sample.url, base_url or os.environ.get(SAMPLE_BASE_URL_ENV))
    _download(url, target, sample)
    return target


def _sample_from_mirror(sample: SampleEntry, mirror: Path) -> Path:
    path = mirror / sample.mirror_path
    if not path.is_file():
        raise SampleUnavailableError(
            f"sample {sample.name!r} not found at {path}. {DATA_MIRROR_ENV}={mirror} must be a folder "
            f"that contains {sample.mirror_path}, or unset it to download from {sample.url or 'the public URL'}."
        )

    actual = sha256_file(path)
    if actual != sample.sha256:
        raise ChecksumMismatchError(
            f"mirror file {path} has sha256 {actual}, expected {sample.sha256}. "
            "Replace it with an unchanged copy of the public file."
        )
    logger.info("using sample %s from mirror %s", sample.name, path)
    return path


def _with_base_url(url: str, base_url: str | None) -> str:
    """Replace the scheme and host of `url` by `base_url`, keeping the path and query."""
    if not base_url:
        return url
    parts = urlsplit(url)
    replaced = base_url.rstrip("/") + parts.path
    return f"{replaced}?{parts.query}" if parts.query else replaced


def _download(url: str, target: Path, sample: SampleEntry) -> None:
    """Stream `url` into a temporary file beside `target`, check its sha256 and rename it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    temporary = Path(temporary_name)
    digest = hashlib.sha256()
    logger.info("downloading sample %s from %s to %s", sample.name, url, target)

    try:
        with os.fdopen(descriptor, "wb") as stream:
            try:
                with requests.get(url, stream=True, timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S)) as response:
                    response.raise_for_status()
                    total = int(response.headers.get("Content-Length", 0)) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=sample.name, disable=None) as progress:
                        for block in response.iter_content(chunk_size=_DOWNLOAD_BLOCK_BYTES):
                            stream.write(block)
                            digest.update(block)
                            progress.update(len(block))
            except (requests.ConnectionError, requests.Timeout) as error:
                raise SampleUnavailableError(
                    f"cannot download sample {sample.name!r} from {url}: {error}. Without network "
                    f"access, set {DATA_MIRROR_ENV} to a folder that contains {sample.mirror_path}."
                ) from error
            except requests.RequestException as error:
                raise SampleUnavailableError(
                    f"download of sample {sample.name!r} from {url} failed: {error}. Check the URL, or set "
                    f"{DATA_MIRROR_ENV} to a folder that contains {sample.mirror_path}."
                ) from error
            stream.flush()
            os.fsync(stream.fileno())

        actual = digest.hexdigest()
        if actual != sample.sha256:
            raise ChecksumMismatchError(
                f"file downloaded from {url} has sha256 {actual}, expected {sample.sha256}. "
                "The remote file changed or the download was corrupted; the file was not kept."
            )
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()

    logger.info("downloaded sample %s (%d bytes) to %s", sample.name, target.stat().st_size, target)
