"""An ingest killed with SIGKILL half way resumes on re-run and writes the store an uninterrupted run writes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from data_catalog import Catalog
from data_catalog.locks import DatasetLockedError, dataset_lock, lock_path
from tasks import writer
from tasks.ingest import ingest_era5

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "era5-t2m-uk-2019-03"
TRAIN = ("2019-03-01T00:00:00", "2019-03-24T23:00:00")
TEST = ("2019-03-25T00:00:00", "2019-03-31T23:00:00")
TIME_CHUNK = 6
REGIONS = 744 // TIME_CHUNK

# Runs the ingest with a pause after each journal update, so the test can kill it half way.
SLOW_INGEST = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from data_catalog import Catalog
    from tasks import writer
    from tasks.ingest import ingest_era5

    save = writer.save_journal

    def save_slowly(target, journal):
        save(target, journal)
        time.sleep(0.2)

    writer.save_journal = save_slowly
    ingest_era5([Path(sys.argv[1])], sys.argv[2], (sys.argv[3], sys.argv[4]), (sys.argv[5], sys.argv[6]),
                time_chunk=int(sys.argv[7]), catalog=Catalog(Path(sys.argv[8])), grib_decoder=sys.argv[9])
    """
)


def _completed_regions(journal: Path) -> int:
    try:
        return len(json.loads(journal.read_text())["completed"])
    except (OSError, ValueError, KeyError):
        return 0


def _start_slow_ingest(grib: Path, root: Path, grib_decoder: str, regions: int) -> subprocess.Popen:
    """Start the slow ingest in a subprocess and return it once its journal lists at least `regions` regions."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", SLOW_INGEST, str(grib), NAME, *TRAIN, *TEST, str(TIME_CHUNK), str(root), grib_decoder]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment)
    target = Catalog(root).default_zarr_path(NAME)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        journals = list(target.parent.glob(f".{target.name}.journal-*.json")) if target.parent.exists() else []
        if journals and _completed_regions(journals[0]) >= regions:
            break
        time.sleep(0.05)
    return process


def _kill_half_way(grib: Path, root: Path, grib_decoder: str) -> None:
    """Start the slow ingest in a subprocess and SIGKILL it once the journal lists at least two regions."""
    process = _start_slow_ingest(grib, root, grib_decoder, regions=2)
    try:
        assert process.poll() is None, f"the slow ingest ended (exit status {process.returncode}) before the kill"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL


def _without_created(attrs: dict) -> dict:
    attrs = json.loads(json.dumps(attrs))
    attrs["provenance"].pop("created")
    return attrs


@pytest.mark.parametrize("grib_decoder", ["cfgrib", "eccodes"])
def test_killed_ingest_resumes_identically(uk_t2m_grib, tmp_path, caplog, grib_decoder):
    killed_root, reference_root = tmp_path / "killed", tmp_path / "reference"
    _kill_half_way(uk_t2m_grib, killed_root, grib_decoder)

    catalog = Catalog(killed_root)
    target = catalog.default_zarr_path(NAME)
    journals = list(target.parent.glob(f".{target.name}.journal-*.json"))
    assert NAME not in catalog.names()
    assert not target.exists()
    assert len(journals) == 1
    done_before = _completed_regions(journals[0])
    assert 2 <= done_before < REGIONS

    written = []
    original = writer.save_journal

    def record(target_path, journal):
        written.append(len(journal.completed))
        original(target_path, journal)

    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO, logger="tasks.ingest"):
        patch.setattr(writer, "save_journal", record)
        resumed = ingest_era5(
            [uk_t2m_grib], NAME, TRAIN, TEST, time_chunk=TIME_CHUNK, catalog=catalog, grib_decoder=grib_decoder
        )
    reference = ingest_era5(
        [uk_t2m_grib], NAME, TRAIN, TEST, time_chunk=TIME_CHUNK, catalog=Catalog(reference_root), grib_decoder="cfgrib"
    )

    assert "resuming the ingest" in caplog.text
    # The first finished region is saved at once, later ones at most every writer.SAVE_INTERVAL_S.
    assert written[0] == done_before + 1
    assert written[-1] == REGIONS
    assert written == sorted(set(written))
    assert sorted(path.name for path in target.parent.iterdir()) == [f"{NAME}.zarr"]
    assert catalog.get(NAME).digest == reference.entry.digest

    with xr.open_zarr(resumed.zarr_path, consolidated=False) as first, xr.open_zarr(
        reference.zarr_path, consolidated=False
    ) as second:
        assert sorted(first.variables) == sorted(second.variables)
        for name in first.variables:
            np.testing.assert_array_equal(first[name].values, second[name].values, err_msg=name)
            assert first[name].attrs == second[name].attrs, name
            assert first[name].encoding.get("chunks") == second[name].encoding.get("chunks"), name
        assert _without_created(first.attrs) == _without_created(second.attrs)

    first_entry = resumed.entry.model_dump(mode="json", exclude={"created", "zarr_path"})
    second_entry = reference.entry.model_dump(mode="json", exclude={"created", "zarr_path"})
    first_entry["provenance"].pop("created")
    second_entry["provenance"].pop("created")
    assert first_entry == second_entry


def test_stale_journal_of_other_recipe_removed(uk_t2m_grib, tmp_path):
    catalog = Catalog(tmp_path)
    target = catalog.default_zarr_path(NAME)
    target.parent.mkdir(parents=True)
    stale_store = writer.temporary_store_path(target, "0" * 64)
    stale_store.mkdir()
    writer.journal_path(target, "0" * 64).write_text("{}")

    ingest_era5([uk_t2m_grib], NAME, TRAIN, TEST, time_chunk=48, catalog=catalog)

    assert sorted(path.name for path in target.parent.iterdir()) == [f"{NAME}.zarr"]


def test_concurrent_ingest_fails_fast_then_lock_released_by_kill(uk_t2m_grib, tmp_path):
    holder = _start_slow_ingest(uk_t2m_grib, tmp_path, "cfgrib", regions=1)
    catalog = Catalog(tmp_path)
    try:
        assert holder.poll() is None, "the slow ingest ended before the second ingest started"

        started = time.monotonic()
        with pytest.raises(DatasetLockedError) as raised:
            ingest_era5([uk_t2m_grib], NAME, TRAIN, TEST, time_chunk=TIME_CHUNK, catalog=catalog)
        assert time.monotonic() - started < 5
        message = str(raised.value)
        assert f"dataset {NAME!r}" in message
        assert str(lock_path(catalog, NAME)) in message
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message

        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    # The kernel released the dead holder's lock, so the next ingest runs and resumes its work.
    result = ingest_era5([uk_t2m_grib], NAME, TRAIN, TEST, time_chunk=TIME_CHUNK, catalog=catalog)
    assert result.entry.time_count == 744
    assert catalog.get(NAME).digest == result.entry.digest


def test_lock_held_in_same_process_rejected(tmp_path):
    catalog = Catalog(tmp_path)

    with dataset_lock(catalog, "held", "append"):
        with pytest.raises(DatasetLockedError, match=f"append with pid {os.getpid()}"):
            with dataset_lock(catalog, "held"):
                pass
    with dataset_lock(catalog, "held"):
        pass
