"""Tests of the sample list and `fetch_sample`, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from data_catalog import fetch_sample
from data_catalog.samples import (
    ChecksumMismatchError,
    SampleNotFoundError,
    SampleUnavailableError,
    get_sample,
    load_samples,
)
from data_catalog.workspace import sha256_file

DEMO = "era5-2mt-2019-03-uk"
DEMO_URL = "https://github.com/pydata/xarray-data/raw/master/era5-2mt-2019-03-uk.grib"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


class LocalServer:
    """A static file server on 127.0.0.1 that counts GET requests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class CountingHandler(_QuietHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

        handler = functools.partial(CountingHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def publish(self, url: str, source: Path) -> Path:
        """Copy `source` to the folder path that the server serves at the path of `url`."""
        path = self.root / urlsplit(url).path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return path


@pytest.fixture
def server(tmp_path):
    local = LocalServer(tmp_path / "served")
    local.root.mkdir()
    local.thread.start()
    yield local
    local.httpd.shutdown()
    local.httpd.server_close()
    local.thread.join(timeout=5)


@pytest.fixture
def no_mirror(monkeypatch):
    monkeypatch.delenv("ATMOREP_DATA_MIRROR", raising=False)
    monkeypatch.delenv("ATMOREP_SAMPLE_BASE_URL", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def leftover_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob("*") if path.is_file() and path.name.startswith("."))


# --- the sample list ----------------------------------------------------------------------


def test_demo_sample_entry():
    sample = get_sample(DEMO)

    assert sample.url == DEMO_URL
    assert sample.mirror_path == "era5/era5-2mt-2019-03-uk.grib"
    assert "Copernicus" in sample.attribution


def test_sample_list_matches_mirror(data_mirror):
    samples = load_samples()

    assert len(samples) >= 5
    for sample in samples.values():
        path = data_mirror / sample.mirror_path
        assert path.is_file(), f"{sample.name}: {path} missing"
        assert sha256_file(path) == sample.sha256, f"{sample.name}: sha256 differs for {path}"


def test_unknown_sample_lists_names():
    with pytest.raises(SampleNotFoundError, match=DEMO) as raised:
        get_sample("no-such-sample")

    assert "'no-such-sample'" in str(raised.value)


# --- mirror -------------------------------------------------------------------------------


def test_mirror_returns_file_in_place(data_mirror, monkeypatch, tmp_path):
    monkeypatch.setenv("ATMOREP_DATA_MIRROR", str(data_mirror))

    path = fetch_sample(DEMO, dest=tmp_path / "unused")

    assert path == data_mirror / "era5" / "era5-2mt-2019-03-uk.grib"
    assert not (tmp_path / "unused").exists()


def test_mirror_missing_file_names_path(monkeypatch, tmp_path):
    monkeypatch.setenv("ATMOREP_DATA_MIRROR", str(tmp_path))

    with pytest.raises(SampleUnavailableError) as raised:
        fetch_sample(DEMO)

    message = str(raised.value)
    assert str(tmp_path / "era5" / "era5-2mt-2019-03-uk.grib") in message
    assert "ATMOREP_DATA_MIRROR" in message


def test_mirror_wrong_sha256_names_path(uk_t2m_grib, monkeypatch, tmp_path):
    altered = tmp_path / "era5" / "era5-2mt-2019-03-uk.grib"
    altered.parent.mkdir()
    altered.write_bytes(uk_t2m_grib.read_bytes()[:-10])
    monkeypatch.setenv("ATMOREP_DATA_MIRROR", str(tmp_path))

    with pytest.raises(ChecksumMismatchError) as raised:
        fetch_sample(DEMO)

    message = str(raised.value)
    assert str(altered) in message
    assert get_sample(DEMO).sha256 in message


# --- download -----------------------------------------------------------------------------


def test_download_verifies_and_reuses(server, uk_t2m_grib, no_mirror, monkeypatch, tmp_path):
    server.publish(DEMO_URL, uk_t2m_grib)
    monkeypatch.setenv("ATMOREP_SAMPLE_BASE_URL", server.base_url)
    dest = tmp_path / "samples"

    path = fetch_sample(DEMO, dest=dest)

    assert path == dest / "era5" / "era5-2mt-2019-03-uk.grib"
    assert sha256_file(path) == get_sample(DEMO).sha256
    assert server.requests == ["/pydata/xarray-data/raw/master/era5-2mt-2019-03-uk.grib"]
    assert leftover_files(dest) == []

    again = fetch_sample(DEMO, dest=dest)

    assert again == path
    assert len(server.requests) == 1


def test_download_default_dest_under_home(server, uk_t2m_grib, no_mirror, monkeypatch, tmp_path):
    server.publish(DEMO_URL, uk_t2m_grib)
    monkeypatch.setenv("ATMOREP_HOME", str(tmp_path / "home"))

    path = fetch_sample(DEMO, base_url=server.base_url)

    assert path == (tmp_path / "home" / "samples" / "era5" / "era5-2mt-2019-03-uk.grib").resolve()
    assert path.is_file()


def test_download_replaces_corrupted_file(server, uk_t2m_grib, no_mirror, tmp_path):
    server.publish(DEMO_URL, uk_t2m_grib)
    dest = tmp_path / "samples"
    stale = dest / "era5" / "era5-2mt-2019-03-uk.grib"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a grib file")

    path = fetch_sample(DEMO, dest=dest, base_url=server.base_url)

    assert path == stale
    assert sha256_file(path) == get_sample(DEMO).sha256
    assert len(server.requests) == 1


def test_download_sha256_mismatch(server, uk_t2m_grib, no_mirror, tmp_path):
    served = server.publish(DEMO_URL, uk_t2m_grib)
    served.write_bytes(served.read_bytes()[:-3360])
    dest = tmp_path / "samples"

    with pytest.raises(ChecksumMismatchError) as raised:
        fetch_sample(DEMO, dest=dest, base_url=server.base_url)

    message = str(raised.value)
    assert f"{server.base_url}/pydata/xarray-data/raw/master/era5-2mt-2019-03-uk.grib" in message
    assert get_sample(DEMO).sha256 in message
    assert sha256_file(served) in message
    assert not (dest / "era5" / "era5-2mt-2019-03-uk.grib").exists()
    assert leftover_files(dest) == []


def test_download_offline_suggests_mirror(no_mirror, tmp_path):
    base_url = f"http://127.0.0.1:{closed_port()}"

    with pytest.raises(SampleUnavailableError) as raised:
        fetch_sample(DEMO, dest=tmp_path, base_url=base_url)

    message = str(raised.value)
    assert "set ATMOREP_DATA_MIRROR to a folder that contains era5/era5-2mt-2019-03-uk.grib" in message
    assert base_url in message
    assert leftover_files(tmp_path) == []


def test_download_http_error_names_url(server, no_mirror, tmp_path):
    with pytest.raises(SampleUnavailableError, match="404") as raised:
        fetch_sample(DEMO, dest=tmp_path, base_url=server.base_url)

    assert f"{server.base_url}/pydata/xarray-data/raw/master/era5-2mt-2019-03-uk.grib" in str(raised.value)
    assert leftover_files(tmp_path) == []


def test_sample_without_url_needs_mirror(no_mirror, tmp_path):
    with pytest.raises(SampleUnavailableError, match="no public URL") as raised:
        fetch_sample("era5-pl-2020-01-01-u", dest=tmp_path)

    assert "era5/era5-pl-2020-01-01/ERA5_2020-01-01_pl_u.nc" in str(raised.value)
