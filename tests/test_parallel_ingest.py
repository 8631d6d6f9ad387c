"""The parallel ecCodes path of `ingest_era5` (`tasks.decode`) writes the stores the cfgrib path writes."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from data_catalog import Catalog
from era5_direct import assert_nothing_written, write_grib_messages
from tasks import decode
from tasks.ingest import InvalidSourceError, canonicalise, ingest_era5, open_sources

REPO_ROOT = Path(__file__).resolve().parents[1]
UK_TRAIN = ("2019-03-01T00:00:00", "2019-03-24T23:00:00")
UK_TEST = ("2019-03-25T00:00:00", "2019-03-31T23:00:00")

# name: (files under era5/, train period, test period, options, whether the fast path applies)
GRIB_CASES = {
    "uk-t2m": (["era5-2mt-2019-03-uk.grib"], UK_TRAIN, UK_TEST, {}, True),
    "uk-crop": (
        ["era5-2mt-2019-03-uk.grib"], UK_TRAIN, UK_TEST,
        {"area": (57.0, -5.0, 51.0, 1.0), "time_chunk": 48}, True,
    ),
    "uk-chunk-10": (["era5-2mt-2019-03-uk.grib"], UK_TRAIN, UK_TEST, {"time_chunk": 10}, True),
    "uk-local": (["era5-2mt-2019-03-uk.grib"], UK_TRAIN, UK_TEST, {"normalisation": {"t2m": "local"}}, True),
    "monthly-0p25": (["era5_t2m_monthly_2022-10_0p25.grib"], ("2022-10-01", "2022-10-01"), None, {}, True),
    "scanning-mode-64": (
        ["unusual/scanning_mode_64.grib"], ("2017-10-18T12:00", "2017-10-18T12:00"), None, {}, True
    ),
    "members": (
        ["era5-levels-members.grib"], ("2017-01-01T00:00", "2017-01-01T12:00"),
        ("2017-01-02T00:00", "2017-01-02T12:00"), {}, False,
    ),
    "missing-values": (
        ["unusual/fields_with_missing_values.grib"], ("2017-10-18T00:00", "2017-10-18T00:00"),
        ("2017-10-18T12:00", "2017-10-18T12:00"), {}, False,
    ),
    "uk-coarsened": (["era5-2mt-2019-03-uk.grib"], UK_TRAIN, UK_TEST, {"coarsen_factor": 2}, False),
}


def _without_created(attrs: dict) -> dict:
    attrs = json.loads(json.dumps(attrs))
    attrs["provenance"].pop("created")
    return attrs


def assert_same_store(first, second) -> None:
    """Assert equal arrays, variable attrs, chunks and root attrs (creation times aside) of two stores."""
    with xr.open_zarr(first, consolidated=False) as one, xr.open_zarr(second, consolidated=False) as other:
        assert sorted(one.variables) == sorted(other.variables)
        for name in one.variables:
            np.testing.assert_array_equal(one[name].values, other[name].values, err_msg=name)
            assert one[name].attrs == other[name].attrs, name
            assert one[name].encoding.get("chunks") == other[name].encoding.get("chunks"), name
        assert _without_created(one.attrs) == _without_created(other.attrs)
    for group in ("statistics",):
        if (first / group).is_dir():
            with xr.open_zarr(first, group=group, consolidated=False) as one, xr.open_zarr(
                second, group=group, consolidated=False
            ) as other:
                xr.testing.assert_identical(one.load(), other.load())


@pytest.mark.parametrize("name", sorted(GRIB_CASES))
def test_eccodes_path_matches_cfgrib(data_mirror, tmp_path, caplog, name):
    files, train, test, options, fast = GRIB_CASES[name]
    paths = [data_mirror / "era5" / file for file in files]

    with caplog.at_level(logging.INFO, logger="tasks.decode"):
        quick = ingest_era5(paths, name, train, test, catalog=Catalog(tmp_path / "eccodes"), grib_decoder="eccodes", **options)
    reference = ingest_era5(paths, name, train, test, catalog=Catalog(tmp_path / "cfgrib"), grib_decoder="cfgrib", **options)

    assert ("not the fast ecCodes path" in caplog.text) is not fast
    assert quick.entry.statistics == reference.entry.statistics
    assert_same_store(quick.zarr_path, reference.zarr_path)


def test_eccodes_path_several_files(uk_t2m_grib, tmp_path, caplog):
    late = write_grib_messages(uk_t2m_grib, tmp_path / "late.grib", range(300, 744))
    early = write_grib_messages(uk_t2m_grib, tmp_path / "early.grib", range(0, 300))

    with caplog.at_level(logging.INFO, logger="tasks.decode"):
        quick = ingest_era5([late, early], "split", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "a"), grib_decoder="eccodes")
    reference = ingest_era5([uk_t2m_grib], "split", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "b"), grib_decoder="cfgrib")

    assert "not the fast ecCodes path" not in caplog.text
    assert quick.entry.statistics == reference.entry.statistics
    with xr.open_zarr(quick.zarr_path, consolidated=False) as one, xr.open_zarr(reference.zarr_path, consolidated=False) as other:
        np.testing.assert_array_equal(one["t2m"].values, other["t2m"].values)


def test_eccodes_path_on_dask_cluster(uk_t2m_grib, tmp_path):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        quick = ingest_era5(
            [uk_t2m_grib], "uk", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "dask"),
            grib_decoder="eccodes", scheduler_address=cluster.scheduler_address,
        )
    reference = ingest_era5([uk_t2m_grib], "uk", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "cfgrib"), grib_decoder="cfgrib")

    assert_same_store(quick.zarr_path, reference.zarr_path)


def test_eccodes_worker_failure_leaves_nothing(uk_t2m_grib, tmp_path, monkeypatch):
    original = decode.plan_fast_path
    missing = tmp_path / "injected-missing.grib"

    def plan_with_missing_file(*args, **kwargs):
        # Workers get the plan from this process, so the message of step 5 * 24 fails to open there.
        plan = original(*args, **kwargs)
        plan.messages["t2m"][5 * 24] = decode.MessageRef(str(missing), 0)
        return plan

    monkeypatch.setattr(decode, "plan_fast_path", plan_with_missing_file)

    with pytest.raises(OSError, match="injected-missing"):
        ingest_era5([uk_t2m_grib], "uk", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path), grib_decoder="eccodes")

    assert_nothing_written(tmp_path, "uk")


def test_unknown_grib_decoder_rejected(uk_t2m_grib, tmp_path):
    with pytest.raises(ValueError, match="grib_decoder 'fast' is unknown"):
        ingest_era5([uk_t2m_grib], "uk", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path), grib_decoder="fast")


@pytest.mark.parametrize(
    "file", ["era5-2mt-2019-03-uk.grib", "era5_t2m_monthly_2022-10_0p25.grib", "unusual/scanning_mode_64.grib"]
)
def test_header_dataset_matches_cfgrib(data_mirror, file):
    path = data_mirror / "era5" / file

    from_headers, plan = decode.open_grib_fast([path], 24, canonicalise)
    from_cfgrib = open_sources([path], 24)

    assert plan.variables == tuple(from_cfgrib.data_vars)
    xr.testing.assert_identical(from_headers.load(), from_cfgrib.load())


def test_header_scan_rejects_truncated_file(data_mirror, tmp_path):
    with pytest.raises(InvalidSourceError, match="truncated or corrupted"):
        ingest_era5(
            [data_mirror / "era5" / "unusual" / "era5-levels-corrupted.grib"], "corrupt", UK_TRAIN, UK_TEST,
            catalog=Catalog(tmp_path), grib_decoder="eccodes",
        )

    assert_nothing_written(tmp_path, "corrupt")


@pytest.fixture
def external_cluster(tmp_path):
    """Start a dask scheduler and one worker with two processes as separate programs on 127.0.0.1; yield the address."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--host", "127.0.0.1", "--nworkers", "2", "--nthreads", "1",
         "--no-dashboard", "--local-directory", str(tmp_path / "dask-worker")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        from dask.distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in (worker, scheduler):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_local_and_external_cluster_identical(uk_t2m_grib, tmp_path, caplog, monkeypatch, external_cluster):
    # distributed sets OMP_NUM_THREADS and others for its workers, and the ingest must
    # restore them in its own process.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with caplog.at_level(logging.INFO, logger="tasks.decode"):
        local = ingest_era5(
            [uk_t2m_grib], "uk", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "local"), grib_decoder="eccodes",
            normalisation={"t2m": "local"},
        )
    assert "started a local dask cluster" in caplog.text
    assert "OMP_NUM_THREADS" not in os.environ

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tasks.decode"):
        external = ingest_era5(
            [uk_t2m_grib], "uk", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "external"), grib_decoder="eccodes",
            normalisation={"t2m": "local"}, scheduler_address=external_cluster,
        )
    assert "started a local dask cluster" not in caplog.text
    assert f"dask scheduler at {external_cluster}" in caplog.text

    assert local.entry.content_digest == external.entry.content_digest
    assert_same_store(local.zarr_path, external.zarr_path)


NO_GUARD_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from data_catalog import Catalog
from tasks.ingest import ingest_era5
result = ingest_era5([sys.argv[1]], "uk", {train!r}, {test!r}, catalog=Catalog(sys.argv[2]), grib_decoder="eccodes")
print("time steps:", result.entry.time_count)
"""


def test_script_without_main_guard(uk_t2m_grib, tmp_path):
    """A script calling ingest_era5 at top level, which every worker re-runs on import, still ingests."""
    script = tmp_path / "ingest_no_guard.py"
    script.write_text(NO_GUARD_SCRIPT.format(train=UK_TRAIN, test=UK_TEST), encoding="utf-8")
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    finished = subprocess.run(
        [sys.executable, str(script), str(uk_t2m_grib), str(tmp_path / "home")],
        capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path,
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "time steps: 744" in finished.stdout
    assert "the local dask cluster failed to start" in finished.stderr
    assert 'if __name__ == "__main__":' in finished.stderr
    assert str(script) in finished.stderr
    reference = ingest_era5([uk_t2m_grib], "uk", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "cfgrib"), grib_decoder="cfgrib")
    assert_same_store(tmp_path / "home" / "data" / "uk.zarr", reference.zarr_path)


class _RecordList(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_local_cluster_logs_quietly(uk_t2m_grib, tmp_path, caplog):
    # distributed's loggers do not propagate to the root logger, so they get a handler of their own.
    captured = _RecordList()
    watched = [logging.getLogger(name) for name in ("distributed", "distributed.client", "tornado")]
    levels = [each.level for each in watched]
    for each in watched:
        each.addHandler(captured)
    try:
        with caplog.at_level(logging.INFO):
            ingest_era5([uk_t2m_grib], "uk", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path), grib_decoder="eccodes")
    finally:
        for each in watched:
            each.removeHandler(captured)

    records = captured.records + caplog.records
    assert "started a local dask cluster" in caplog.text
    assert [record.getMessage() for record in records if record.name.startswith("distributed")] == []
    assert [record.getMessage() for record in records if record.levelno >= logging.ERROR] == []
    assert [record.getMessage() for record in records if record.exc_info] == []
    assert [each.level for each in watched] == levels
