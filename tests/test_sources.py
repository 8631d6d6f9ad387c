"""Tests of `tasks.sources` on real ERA5 data: CDS requests through cdsapi against a fake CDS
API, and Zarr stores in ARCO-ERA5 and WeatherBench 2 layouts, read locally and over HTTP.

Every server here is started by the tests on 127.0.0.1.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from datetime import date, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from data_catalog import Catalog
from data_catalog.workspace import sha256_file
from fake_cds import FakeCds, FakeJobFailure
from flows.ingest import resolve_sources
from tasks.ingest import SOURCE_RECORD_ATTR, InvalidSourceError, ingest_era5
from tasks.sources import (
    CdsCredentialsError,
    CdsRequest,
    CdsRetrievalError,
    RemoteZarrSource,
    attach_source_record,
    open_cds,
    open_remote_zarr,
    parse_cds_source,
    parse_zarr_source,
    retrieve_cds,
)
from tasks.sources.remote_zarr import _longitude_indexer

KEY = "fake-token-7c1d9e04b2"
UK_TRAIN = ("2019-03-01T00:00:00", "2019-03-24T23:00:00")
UK_TEST = ("2019-03-25T00:00:00", "2019-03-31T23:00:00")
UK_AREA = (58.0, -10.0, 50.0, 2.0)
FAILING_VARIABLE = "sea_surface_temperature"


# --- shared data --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uk_t2m(uk_t2m_grib) -> xr.DataArray:
    """t2m [744, 33, 49] in K (float32) as cfgrib decodes it: latitude 58..50, longitude -10..2."""
    with xr.open_dataset(uk_t2m_grib, engine="cfgrib", backend_kwargs={"indexpath": ""}) as dataset:
        return dataset["t2m"].load()


@pytest.fixture(scope="module")
def pl_folder(data_mirror) -> Path:
    return data_mirror / "era5" / "era5-pl-2020-01-01"


@pytest.fixture(scope="module")
def uk_file_ingest(uk_t2m_grib, tmp_path_factory):
    """The UK t2m GRIB ingested as a file, for comparison with the other sources."""
    catalog = Catalog(tmp_path_factory.mktemp("file-home"))
    return ingest_era5([uk_t2m_grib], "uk-file", UK_TRAIN, UK_TEST, catalog=catalog)


def assert_same_dataset(result, reference) -> None:
    """Check that two ingests of the same data agree in everything but provenance and digest."""
    assert result.entry.statistics == reference.entry.statistics
    assert result.entry.grid == reference.entry.grid
    assert result.entry.variables == reference.entry.variables
    assert result.entry.time_start == reference.entry.time_start
    assert result.entry.time_count == reference.entry.time_count


# --- fake CDS -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_cds(uk_t2m_grib, pl_folder) -> Iterator[FakeCds]:
    """Serves the UK t2m GRIB for single-level requests and a zip of u and q NetCDF files for
    pressure-level requests. A request for FAILING_VARIABLE fails. Jobs succeed on the first
    status poll, so the client does not wait between polls."""

    def files_for_request(dataset: str, inputs: dict) -> list[Path]:
        if FAILING_VARIABLE in inputs["variable"]:
            raise FakeJobFailure(f"{FAILING_VARIABLE} is not available in the fake archive")
        if dataset == "reanalysis-era5-single-levels":
            return [uk_t2m_grib]
        return [pl_folder / "ERA5_2020-01-01_pl_u.nc", pl_folder / "ERA5_2020-01-01_pl_q.nc"]

    with FakeCds(KEY, files_for_request, polls_until_done=0) as server:
        yield server


@pytest.fixture
def cds_rc(fake_cds, tmp_path, monkeypatch) -> Path:
    """A temporary .cdsapirc for the fake CDS, named by CDSAPI_RC, with no CDSAPI_URL or CDSAPI_KEY."""
    rc_file = tmp_path / "cdsapirc"
    rc_file.write_text(f"url: {fake_cds.url}\nkey: {KEY}\n", encoding="utf-8")
    monkeypatch.setenv("CDSAPI_RC", str(rc_file))
    monkeypatch.delenv("CDSAPI_URL", raising=False)
    monkeypatch.delenv("CDSAPI_KEY", raising=False)
    return rc_file


@pytest.fixture
def no_credentials(tmp_path, monkeypatch) -> Path:
    missing = tmp_path / "no-such-cdsapirc"
    monkeypatch.setenv("CDSAPI_RC", str(missing))
    monkeypatch.delenv("CDSAPI_URL", raising=False)
    monkeypatch.delenv("CDSAPI_KEY", raising=False)
    return missing


def uk_request(**changes) -> CdsRequest:
    fields = {
        "dataset": "reanalysis-era5-single-levels",
        "variables": ["t2m"],
        "dates": ("2019-03-01", "2019-03-31"),
        "area": UK_AREA,
    }
    return CdsRequest(**{**fields, **changes})


# --- CDS requests -------------------------------------------------------------------------


def test_cds_request_body():
    request = CdsRequest(
        dataset="reanalysis-era5-pressure-levels",
        variables=["u", "specific_humidity"],
        levels=[850, 500],
        dates=("2020-01-01", "2020-01-02"),
        times=["12:00", "00:00"],
        area=(55, 0, 45, 10),
        grid=(0.5, 0.5),
        data_format="netcdf",
    )

    assert request.api_request() == {
        "product_type": ["reanalysis"],
        "variable": ["u_component_of_wind", "specific_humidity"],
        "year": ["2020"],
        "month": ["01"],
        "day": ["01", "02"],
        "time": ["00:00", "12:00"],
        "data_format": "netcdf",
        "download_format": "unarchived",
        "pressure_level": ["500", "850"],
        "area": [55.0, 0.0, 45.0, 10.0],
        "grid": [0.5, 0.5],
    }


def test_cds_request_split_by_month():
    request = uk_request(dates=("2019-02-27", "2019-04-02"))

    months = request.monthly_requests()

    assert [month.dates for month in months] == [
        (date(2019, 2, 27), date(2019, 2, 28)),
        (date(2019, 3, 1), date(2019, 3, 31)),
        (date(2019, 4, 1), date(2019, 4, 2)),
    ]
    assert months[0].api_request()["day"] == ["27", "28"]
    assert len(months[1].api_request()["day"]) == 31
    with pytest.raises(ValueError, match="span several months"):
        request.api_request()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"levels": [500]}, "has no pressure levels"),
        ({"dataset": "reanalysis-era5-pressure-levels"}, "needs levels"),
        ({"area": (50, -10, 58, 2)}, "south <= north"),
        ({"times": ["01:30"]}, "HH:00"),
        ({"dates": ("2019-03-31", "2019-03-01")}, "after their end"),
        ({"variables": ["t2m", "2m_temperature"]}, "more than once"),
        ({"grid": (0.0, 0.25)}, "positive"),
        ({"format": "grib"}, "format"),
    ],
)
def test_cds_request_invalid(changes, match):
    with pytest.raises(ValueError, match=match):
        uk_request(**changes)


def test_parse_cds_source_forms(tmp_path):
    inline = parse_cds_source('cds:{"dataset": "reanalysis-era5-single-levels", "variables": ["t2m"]}',
                              default_dates=(date(2019, 3, 1), date(2019, 3, 31)))
    request_file = tmp_path / "request.yaml"
    request_file.write_text(
        "dataset: reanalysis-era5-single-levels\nvariables: [t2m]\ndates: [2019-03-01, 2019-03-31]\n",
        encoding="utf-8",
    )
    from_file = parse_cds_source(f"cds:{request_file}")

    assert inline == from_file
    assert inline.variables == ["2m_temperature"]
    assert parse_cds_source(inline.to_source_string()) == inline
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_cds_source(f"cds:{tmp_path / 'missing.yaml'}")
    with pytest.raises(ValueError, match="dates"):
        parse_cds_source('cds:{"dataset": "reanalysis-era5-single-levels", "variables": ["t2m"]}')


# --- CDS retrieval against the fake API ---------------------------------------------------


def test_cds_round_trip_grib(fake_cds, cds_rc, uk_t2m_grib, tmp_path, monkeypatch):
    monkeypatch.setattr(fake_cds, "polls_until_done", 2)
    jobs_before = len(fake_cds.submissions)

    paths = retrieve_cds(uk_request(), tmp_path / "cds")

    assert len(paths) == 1
    assert paths[0].suffix == ".grib"
    assert sha256_file(paths[0]) == sha256_file(uk_t2m_grib)
    job = fake_cds.submissions[-1]
    assert len(fake_cds.submissions) == jobs_before + 1
    assert job.dataset == "reanalysis-era5-single-levels"
    assert job.inputs["variable"] == ["2m_temperature"]
    assert job.inputs["day"] == [f"{day:02d}" for day in range(1, 32)]
    assert job.inputs["area"] == list(UK_AREA)
    assert job.polls >= 3, "the client must poll the job status until it succeeds"
    assert sorted(path.name for path in (tmp_path / "cds").iterdir()) == sorted(
        [paths[0].name, paths[0].with_suffix(".json").name]
    )


def test_cds_cache_reuse(fake_cds, cds_rc, tmp_path, monkeypatch):
    first = retrieve_cds(uk_request(), tmp_path)
    jobs_after_first = len(fake_cds.submissions)
    monkeypatch.setenv("CDSAPI_RC", str(tmp_path / "no-such-cdsapirc"))

    second = retrieve_cds(uk_request(), tmp_path)

    assert second == first
    assert len(fake_cds.submissions) == jobs_after_first


def test_cds_changed_cache_downloaded_again(fake_cds, cds_rc, uk_t2m_grib, tmp_path):
    first = retrieve_cds(uk_request(), tmp_path)
    first[0].write_bytes(b"GRIB truncated")
    jobs_after_first = len(fake_cds.submissions)

    second = retrieve_cds(uk_request(), tmp_path)

    assert second == first
    assert len(fake_cds.submissions) == jobs_after_first + 1
    assert sha256_file(second[0]) == sha256_file(uk_t2m_grib)


def test_cds_key_not_logged(fake_cds, cds_rc, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)

    paths = retrieve_cds(uk_request(dates=("2019-03-01", "2019-03-02")), tmp_path)

    assert "Request ID is" in caplog.text
    assert str(cds_rc) in caplog.text
    assert KEY not in caplog.text
    assert KEY not in paths[0].with_suffix(".json").read_text(encoding="utf-8")


def test_cds_env_credentials(fake_cds, no_credentials, tmp_path, monkeypatch):
    monkeypatch.setenv("CDSAPI_URL", fake_cds.url)
    monkeypatch.setenv("CDSAPI_KEY", KEY)

    paths = retrieve_cds(uk_request(dates=("2019-03-03", "2019-03-03")), tmp_path)

    assert fake_cds.submissions[-1].inputs["day"] == ["03"]
    assert paths[0].is_file()


def test_cds_missing_credentials(fake_cds, no_credentials, tmp_path):
    jobs_before = len(fake_cds.submissions)

    with pytest.raises(CdsCredentialsError) as raised:
        retrieve_cds(uk_request(), tmp_path)

    message = str(raised.value)
    assert "url and key not found" in message
    assert str(no_credentials) in message
    assert "~/.cdsapirc" in message
    assert "url: https://cds.climate.copernicus.eu/api" in message
    assert "CDSAPI_KEY" in message
    assert len(fake_cds.submissions) == jobs_before


def test_cds_old_key_form_rejected(no_credentials, tmp_path, monkeypatch):
    monkeypatch.setenv("CDSAPI_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("CDSAPI_KEY", "12345:0123abcd")

    with pytest.raises(CdsCredentialsError, match="UID:KEY") as raised:
        retrieve_cds(uk_request(), tmp_path)

    assert "0123abcd" not in str(raised.value)


def test_cds_wrong_key(fake_cds, cds_rc, tmp_path):
    wrong_key = "wrong-token-55aa"
    cds_rc.write_text(f"url: {fake_cds.url}\nkey: {wrong_key}\n", encoding="utf-8")
    rejected_before = fake_cds.rejected_requests

    with pytest.raises(CdsRetrievalError, match="Authentication failed") as raised:
        retrieve_cds(uk_request(), tmp_path / "cds")

    message = str(raised.value)
    assert "401" in message
    assert str(cds_rc) in message
    assert wrong_key not in message
    assert fake_cds.rejected_requests > rejected_before
    assert list((tmp_path / "cds").iterdir()) == []


def test_cds_job_failure(fake_cds, cds_rc, tmp_path):
    request = uk_request(variables=[FAILING_VARIABLE])

    with pytest.raises(CdsRetrievalError, match="not available in the fake archive"):
        retrieve_cds(request, tmp_path / "cds")

    assert fake_cds.submissions[-1].status == "failed"
    assert list((tmp_path / "cds").iterdir()) == []


def test_cds_zip_of_netcdf(fake_cds, cds_rc, pl_folder, tmp_path):
    request = CdsRequest(
        dataset="reanalysis-era5-pressure-levels",
        variables=["u", "q"],
        levels=[500, 850],
        dates=("2020-01-01", "2020-01-01"),
        data_format="netcdf",
    )

    datasets = open_cds(request, tmp_path)

    records = [dataset.attrs[SOURCE_RECORD_ATTR] for dataset in datasets]
    assert [record["path"].rpartition("#")[2] for record in records] == [
        "ERA5_2020-01-01_pl_q.nc",
        "ERA5_2020-01-01_pl_u.nc",
    ]
    assert parse_cds_source(records[0]["path"].rpartition("#")[0]) == request
    assert records[1]["sha256"] == sha256_file(pl_folder / "ERA5_2020-01-01_pl_u.nc")
    assert list(datasets[1].data_vars) == ["u"]
    assert datasets[1]["u"].shape == (24, 20, 41, 41)


def test_cds_ingest_end_to_end(fake_cds, cds_rc, uk_t2m_grib, uk_file_ingest, tmp_path):
    source = 'cds:{"dataset": "reanalysis-era5-single-levels", "variables": ["t2m"], "area": [58, -10, 50, 2]}'
    catalog = Catalog(tmp_path / "home")
    time_range = (UK_TRAIN[0], UK_TEST[1])

    resolved = resolve_sources([source], time_range=time_range, download_dir=tmp_path / "cds")
    result = ingest_era5(resolved, "uk-cds", UK_TRAIN, UK_TEST, catalog=catalog)
    jobs_after_first = len(fake_cds.submissions)
    again = ingest_era5(
        resolve_sources([source], time_range=time_range, download_dir=tmp_path / "cds"),
        "uk-cds", UK_TRAIN, UK_TEST, catalog=catalog,
    )

    assert_same_dataset(result, uk_file_ingest)
    recorded = result.entry.provenance.sources[0]
    assert recorded.path.startswith('cds:{"area":[58.0,-10.0,50.0,2.0]')
    assert recorded.sha256 == sha256_file(uk_t2m_grib)
    # The digest covers source sha256s and parameters, not paths, so it matches the file ingest.
    assert result.entry.digest == uk_file_ingest.entry.digest
    assert KEY not in catalog.entry_path("uk-cds").read_text(encoding="utf-8")
    assert again.reused is True
    assert len(fake_cds.submissions) == jobs_after_first


# --- Zarr stores in ARCO-ERA5 and WeatherBench 2 layouts -----------------------------------


def _coordinate_attrs(name: str) -> dict[str, str]:
    return {
        "latitude": {"long_name": "latitude", "units": "degrees_north"},
        "longitude": {"long_name": "longitude", "units": "degrees_east"},
        "level": {"long_name": "pressure_level", "units": "millibars"},
    }.get(name, {})


def write_arco_uk(uk_t2m: xr.DataArray, path: Path) -> None:
    """ARCO-ERA5 layout: `2m_temperature (time, latitude, longitude)`, latitude 58..50 descending,
    longitude in 0..360 (0..2, then 350..359.75), Zarr format 2 with consolidated metadata."""
    store = xr.Dataset(
        {
            "2m_temperature": (
                ("time", "latitude", "longitude"),
                uk_t2m.values,
                {"long_name": "2 metre temperature", "short_name": "t2m", "units": "K"},
            )
        },
        coords={
            "time": uk_t2m["time"].values,
            "latitude": ("latitude", uk_t2m["latitude"].values, _coordinate_attrs("latitude")),
            "longitude": ("longitude", np.mod(uk_t2m["longitude"].values, 360.0), _coordinate_attrs("longitude")),
        },
    ).sortby("longitude")
    store.to_zarr(path, zarr_format=2, consolidated=True, encoding={"2m_temperature": {"chunks": (24, 33, 49)}})


def write_wb2_uk(uk_t2m: xr.DataArray, path: Path) -> None:
    """WeatherBench 2 layout: dims `(time, lon, lat)`, latitude ascending, longitude in 0..360."""
    store = xr.Dataset(
        {
            "2m_temperature": (
                ("time", "lat", "lon"),
                uk_t2m.values,
                {"long_name": "2 metre temperature", "units": "K"},
            )
        },
        coords={
            "time": uk_t2m["time"].values,
            "lat": ("lat", uk_t2m["latitude"].values, _coordinate_attrs("latitude")),
            "lon": ("lon", np.mod(uk_t2m["longitude"].values, 360.0), _coordinate_attrs("longitude")),
        },
    )
    store = store.sortby("lat").sortby("lon").transpose("time", "lon", "lat")
    store.to_zarr(path, zarr_format=2, consolidated=True, encoding={"2m_temperature": {"chunks": (48, 49, 33)}})


def write_arco_levels(pl_folder: Path, path: Path) -> None:
    """ARCO-ERA5 layout with pressure levels: u, q (time, level, latitude, longitude) and sp as float32."""
    variables = {}
    for file_name, short, long_name in (
        ("ERA5_2020-01-01_pl_u.nc", "u", "u_component_of_wind"),
        ("ERA5_2020-01-01_pl_q.nc", "q", "specific_humidity"),
        ("ERA5_2020-01-01_sp.nc", "sp", "surface_pressure"),
    ):
        with xr.open_dataset(pl_folder / file_name, engine="h5netcdf") as source:
            values = source[short].load().astype(np.float32)
        values.attrs = {"units": source[short].attrs["units"], "short_name": short}
        variables[long_name] = values
    store = xr.Dataset(variables).drop_encoding()
    for name in ("level", "latitude", "longitude"):
        store[name].attrs = _coordinate_attrs(name)
    encoding = {name: {"chunks": (6,) + store[name].shape[1:]} for name in variables}
    store.to_zarr(path, zarr_format=2, consolidated=True, encoding=encoding)


@pytest.fixture(scope="module")
def zarr_root(uk_t2m, pl_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zarr-stores")
    write_arco_uk(uk_t2m, root / "arco-uk.zarr")
    write_wb2_uk(uk_t2m, root / "wb2-uk.zarr")
    write_arco_levels(pl_folder, root / "arco-levels.zarr")
    return root


class _LoggedFileHandler(SimpleHTTPRequestHandler):
    request_paths: list[str]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (name fixed by the base class)
        self.request_paths.append(self.path)


@pytest.fixture(scope="module")
def zarr_http(zarr_root) -> Iterator[tuple[str, list[str]]]:
    """`zarr_root` served over HTTP on 127.0.0.1: the base URL and the list of requested paths."""
    request_paths: list[str] = []
    handler = type("Handler", (_LoggedFileHandler,), {"request_paths": request_paths})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(zarr_root)))
    thread = threading.Thread(target=server.serve_forever, name="zarr-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", request_paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def store_url(store: str, access: str, zarr_root: Path, zarr_http) -> str:
    return f"{zarr_http[0]}/{store}" if access == "http" else str(zarr_root / store)


def test_zarr_source_string_round_trip():
    text = (
        "zarr:https://user:secret@example.org/era5.zarr?variables=t2m,u&levels=500,850&area=58,-10,50,2"
        "&time=2019-03-01T00:00,2019-03-02T23:00"
    )

    source = parse_zarr_source(text)

    assert source.url == "https://user:secret@example.org/era5.zarr"
    assert source.variables == ["t2m", "u"]
    assert source.levels == [500.0, 850.0]
    assert source.area == (58.0, -10.0, 50.0, 2.0)
    assert source.time == (datetime(2019, 3, 1), datetime(2019, 3, 2, 23))
    recorded = source.to_source_string()
    assert "secret" not in recorded
    assert recorded.startswith("zarr:https://example.org/era5.zarr?variables=t2m,u&levels=500,850")
    assert parse_zarr_source(recorded) == source.model_copy(update={"url": "https://example.org/era5.zarr"})
    inline = parse_zarr_source('zarr:{"url": "https://example.org/era5.zarr", "variables": ["t2m"]}',
                               default_time=(datetime(2019, 3, 1), datetime(2019, 3, 2)))
    assert inline.time == (datetime(2019, 3, 1), datetime(2019, 3, 2))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("zarr:https://example.org/era5.zarr?variables=t2m&step=6", "invalid parameter 'step=6'"),
        ("zarr:https://example.org/era5.zarr?variables=t2m&variables=u", "variables twice"),
        ("zarr:https://example.org/era5.zarr?levels=500", "no variables"),
        ("zarr:https://example.org/era5.zarr?variables=t2m&area=50,-10,58,2", "south <= north"),
        ("zarr:?variables=t2m", "no URL"),
        ('zarr:{"url": "https://example.org/era5.zarr"', "not valid JSON"),
    ],
)
def test_zarr_source_string_invalid(text, match):
    with pytest.raises(ValueError, match=match):
        parse_zarr_source(text)


@pytest.mark.parametrize("access", ["local", "http"])
@pytest.mark.parametrize("store", ["arco-uk.zarr", "wb2-uk.zarr"])
def test_zarr_selection_matches_grib(store, access, uk_t2m, zarr_root, zarr_http):
    url = store_url(store, access, zarr_root, zarr_http)

    dataset = open_remote_zarr(
        url, ["t2m"], time=("2019-03-02T06:00", "2019-03-03T05:00"), area=(57, -5, 52, 1.5)
    )

    expected = uk_t2m.sel(
        time=slice("2019-03-02T06:00", "2019-03-03T05:00"), latitude=slice(57, 52), longitude=slice(-5, 1.5)
    )
    assert list(dataset.data_vars) == ["t2m"]
    assert dataset["t2m"].dims == ("time", "latitude", "longitude")
    assert dataset["t2m"].shape == (24, 21, 27)
    np.testing.assert_array_equal(dataset["latitude"].values, expected["latitude"].values)
    np.testing.assert_array_equal(dataset["longitude"].values, expected["longitude"].values)
    np.testing.assert_array_equal(dataset["time"].values, expected["time"].values)
    np.testing.assert_array_equal(dataset["t2m"].values, expected.values)
    assert dataset["t2m"].attrs["units"] == "K"


def test_zarr_levels_match_netcdf(pl_folder, zarr_root, zarr_http):
    url = store_url("arco-levels.zarr", "http", zarr_root, zarr_http)

    dataset = open_remote_zarr(url, ["u", "specific_humidity"], levels=[850, 500], area=(54, 1, 50, 6))

    with xr.open_dataset(pl_folder / "ERA5_2020-01-01_pl_u.nc", engine="h5netcdf") as source:
        expected = source["u"].sel(level=[500, 850], latitude=slice(54, 50), longitude=slice(1, 6)).load()
    assert sorted(dataset.data_vars) == ["q", "u"]
    assert dataset["u"].dims == ("time", "level", "latitude", "longitude")
    assert dataset["level"].values.tolist() == [500, 850]
    assert dataset["u"].shape == (24, 2, 17, 21)
    np.testing.assert_array_equal(dataset["u"].values, expected.values.astype(np.float32))


@pytest.mark.parametrize(
    ("longitudes", "west", "east", "expected"),
    [
        (np.arange(0.0, 360.0, 90.0), -90.0, 90.0, [-90.0, 0.0, 90.0]),
        (np.arange(-180.0, 180.0, 90.0), 170.0, -170.0, [-180.0]),
        (np.arange(-180.0, 180.0, 10.0), 160.0, -160.0, [160.0, 170.0, 180.0, 190.0, 200.0]),
        (np.arange(0.0, 360.0, 5.0), 355.0, 5.0, [-5.0, 0.0, 5.0]),
        (np.arange(-180.0, 180.0, 90.0), -180.0, 180.0, [-180.0, -90.0, 0.0, 90.0]),
        (np.arange(0.0, 360.0, 90.0), 0.0, 360.0, [0.0, 90.0, 180.0, 270.0]),
        (np.arange(0.0, 360.0, 90.0), 90.0, 90.0, [90.0]),
    ],
)
def test_longitude_selection_wraps(longitudes, west, east, expected):
    indexer, selected = _longitude_indexer(longitudes, west, east, "test grid")

    assert selected.tolist() == expected
    assert np.mod(longitudes[indexer], 360.0).tolist() == np.mod(expected, 360.0).tolist()


def test_zarr_reads_only_selected_chunks(zarr_root, zarr_http):
    base_url, request_paths = zarr_http
    request_paths.clear()

    dataset = open_remote_zarr(f"{base_url}/arco-uk.zarr", ["t2m"], time=("2019-03-02T00:00", "2019-03-02T23:00"))
    fetched_on_open = [path for path in request_paths if path.startswith("/arco-uk.zarr/2m_temperature/")]
    dataset.load()
    fetched_on_load = [path for path in request_paths if path.startswith("/arco-uk.zarr/2m_temperature/")]

    assert fetched_on_open == []
    assert sorted(set(fetched_on_load)) == ["/arco-uk.zarr/2m_temperature/1.0.0"]


def test_zarr_selection_errors(zarr_root):
    url = str(zarr_root / "arco-levels.zarr")

    with pytest.raises(InvalidSourceError, match=r"\['t2m'\] not found .*available: q \(specific_humidity\)"):
        open_remote_zarr(url, ["t2m"])
    with pytest.raises(InvalidSourceError, match="level 450 hPa not found .*available: 100, 200"):
        open_remote_zarr(url, ["u"], levels=[450])
    with pytest.raises(InvalidSourceError, match="selects no time step"):
        open_remote_zarr(url, ["u"], time=("2021-01-01", "2021-01-02"))
    with pytest.raises(InvalidSourceError, match="no selected variable .* has levels"):
        open_remote_zarr(url, ["sp"], levels=[500])
    with pytest.raises(InvalidSourceError, match="not found"):
        open_remote_zarr(str(zarr_root / "missing.zarr"), ["u"])


def test_zarr_record_digest(zarr_root, zarr_http):
    local = open_remote_zarr(str(zarr_root / "arco-uk.zarr"), ["t2m"], area=(57, -5, 52, 1.5))
    remote = open_remote_zarr(f"{zarr_http[0]}/arco-uk.zarr", ["2m_temperature"], area=(57, -5, 52, 1.5))
    other_area = open_remote_zarr(str(zarr_root / "arco-uk.zarr"), ["t2m"], area=(57, -5, 52, 1.0))

    local_record = local.attrs[SOURCE_RECORD_ATTR]
    assert local_record["sha256"] == remote.attrs[SOURCE_RECORD_ATTR]["sha256"]
    assert local_record["sha256"] != other_area.attrs[SOURCE_RECORD_ATTR]["sha256"]
    assert local_record["size"] == 744 * 21 * 27 * 4
    assert local_record["path"] == f"zarr:{zarr_root / 'arco-uk.zarr'}?variables=t2m&area=57,-5,52,1.5"
    assert parse_zarr_source(local_record["path"]) == RemoteZarrSource(
        url=str(zarr_root / "arco-uk.zarr"), variables=["t2m"], area=(57, -5, 52, 1.5)
    )


def test_zarr_ingest_end_to_end(zarr_http, uk_file_ingest, tmp_path):
    source = f"zarr:{zarr_http[0]}/arco-uk.zarr?variables=t2m&area=58,-10,50,2"
    catalog = Catalog(tmp_path)
    time_range = (UK_TRAIN[0], UK_TEST[1])

    result = ingest_era5(resolve_sources([source], time_range), "uk-zarr", UK_TRAIN, UK_TEST, catalog=catalog)
    again = ingest_era5(resolve_sources([source], time_range), "uk-zarr", UK_TRAIN, UK_TEST, catalog=catalog)

    assert_same_dataset(result, uk_file_ingest)
    recorded = result.entry.provenance.sources[0]
    assert recorded.path == f"{source}&time=2019-03-01T00:00:00,2019-03-31T23:00:00"
    assert result.entry.digest != uk_file_ingest.entry.digest
    assert again.reused is True
    assert again.entry.digest == result.entry.digest
    file_catalog = Catalog(uk_file_ingest.zarr_path.parents[1])
    np.testing.assert_array_equal(
        catalog.open_dataset("uk-zarr")["t2m"].values, file_catalog.open_dataset("uk-file")["t2m"].values
    )


def test_zarr_0_360_region_across_0_without_area(zarr_http, uk_file_ingest, tmp_path):
    """A WeatherBench 2 store in 0..360 whose region crosses 0° ingests into -180..180 without `area`."""
    source = f"zarr:{zarr_http[0]}/wb2-uk.zarr?variables=2m_temperature"
    catalog = Catalog(tmp_path)
    time_range = (UK_TRAIN[0], UK_TEST[1])

    result = ingest_era5(resolve_sources([source], time_range), "uk-wb2", UK_TRAIN, UK_TEST, catalog=catalog)

    assert_same_dataset(result, uk_file_ingest)
    file_catalog = Catalog(uk_file_ingest.zarr_path.parents[1])
    stored = catalog.open_dataset("uk-wb2")
    reference = file_catalog.open_dataset("uk-file")
    np.testing.assert_array_equal(stored["longitude"].values, reference["longitude"].values)
    np.testing.assert_array_equal(stored["t2m"].values, reference["t2m"].values)
    with pytest.raises(ValueError, match="seam of the longitude convention 0..360"):
        ingest_era5(
            resolve_sources([source], time_range), "uk-wb2-360", UK_TRAIN, UK_TEST, catalog=catalog,
            longitude_convention="0..360",
        )


# --- opened datasets in ingest ------------------------------------------------------------


def test_ingest_in_memory_dataset(pl_folder, tmp_path):
    with xr.open_dataset(pl_folder / "ERA5_2020-01-01_sp.nc", engine="h5netcdf") as source:
        surface_pressure = source.load()
    train = ("2020-01-01T00:00:00", "2020-01-01T17:00:00")
    test = ("2020-01-01T18:00:00", "2020-01-01T23:00:00")

    with pytest.raises(InvalidSourceError, match="attach_source_record"):
        ingest_era5([surface_pressure], "sp", train, test, catalog=Catalog(tmp_path))
    recorded = attach_source_record(surface_pressure, "memory:sp-2020-01-01")
    result = ingest_era5([recorded], "sp", train, test, catalog=Catalog(tmp_path))

    expected = surface_pressure["sp"].values[:18].astype(np.float64)
    assert result.entry.provenance.sources[0].path == "memory:sp-2020-01-01"
    assert result.entry.statistics["sp"].mean == pytest.approx([expected.mean()], rel=1e-12)
    assert attach_source_record(surface_pressure, "again").attrs[SOURCE_RECORD_ATTR]["sha256"] == (
        recorded.attrs[SOURCE_RECORD_ATTR]["sha256"]
    )
