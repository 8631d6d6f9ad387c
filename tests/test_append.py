"""Tests of `tasks.append.append_era5` on the real UK GRIB, split by date into two files."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from data_catalog import Catalog
from era5_direct import write_grib_messages
from tasks.append import VERSIONS_FOLDER, append_era5
from tasks.ingest import InvalidSourceError, ingest_era5

NAME = "era5-t2m-uk-2019-03"
# The first 20 days hold both periods, so the first ingest can compute the statistics.
TRAIN = ("2019-03-01T00:00:00", "2019-03-14T23:00:00")
TEST = ("2019-03-15T00:00:00", "2019-03-20T23:00:00")
FIRST_STEPS = 20 * 24


@pytest.fixture
def split_grib(uk_t2m_grib, tmp_path):
    """The UK GRIB as two files: 1 to 20 March (480 messages) and 21 to 31 March (264 messages)."""
    first = write_grib_messages(uk_t2m_grib, tmp_path / "uk-01-20.grib", range(0, FIRST_STEPS))
    rest = write_grib_messages(uk_t2m_grib, tmp_path / "uk-21-31.grib", range(FIRST_STEPS, 744))
    return first, rest


def _chunk_files(store):
    return {
        str(path.relative_to(store)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in (store / "t2m" / "c").rglob("*")
        if path.is_file()
    }


def test_append_matches_single_ingest(split_grib, uk_t2m_grib, tmp_path):
    first, rest = split_grib
    catalog = Catalog(tmp_path / "appended")
    initial = ingest_era5([first], NAME, TRAIN, TEST, catalog=catalog)
    chunks_before = _chunk_files(initial.zarr_path)

    appended = append_era5([rest], NAME, catalog=catalog)
    whole = ingest_era5([uk_t2m_grib], NAME, TRAIN, TEST, catalog=Catalog(tmp_path / "whole"))

    entry = catalog.get(NAME)
    assert entry == appended.entry
    assert entry.time_count == 744
    assert entry.time_start == whole.entry.time_start
    assert entry.time_end == whole.entry.time_end
    assert entry.statistics == initial.entry.statistics == whole.entry.statistics
    assert [source.path for source in entry.provenance.sources] == [str(first), str(rest)]
    assert entry.digest not in (initial.entry.digest, whole.entry.digest)
    assert initial.entry.version == 1
    assert entry.version == 2
    assert entry.content_digest != initial.entry.content_digest
    assert appended.zarr_path == catalog.data_dir / VERSIONS_FOLDER / NAME / f"{entry.digest[:16]}.zarr"
    assert not initial.zarr_path.exists()
    assert len(chunks_before) == FIRST_STEPS // 24

    chunks_after = _chunk_files(appended.zarr_path)
    assert len(chunks_after) == 31
    for key, identity in chunks_before.items():
        assert chunks_after[key] == identity, f"chunk {key} was rewritten"

    store = catalog.open_dataset(NAME)
    with xr.open_zarr(whole.zarr_path, consolidated=False) as reference:
        assert sorted(store.variables) == sorted(reference.variables)
        for name in reference.variables:
            np.testing.assert_array_equal(store[name].values, reference[name].values, err_msg=name)
            assert store[name].attrs == reference[name].attrs, name
        assert store.attrs["statistics"] == reference.attrs["statistics"]
        assert store.attrs["digest"] == entry.digest
        assert store.attrs["content_digest"] == entry.content_digest
        assert store.attrs["version"] == 2
        assert len(store.attrs["provenance"]["sources"]) == 2


def test_append_gap_rejected_old_kept(split_grib, uk_t2m_grib, tmp_path):
    first, _ = split_grib
    late = write_grib_messages(uk_t2m_grib, tmp_path / "late.grib", range(FIRST_STEPS + 1, 744))
    catalog = Catalog(tmp_path / "home")
    initial = ingest_era5([first], NAME, TRAIN, TEST, catalog=catalog)

    with pytest.raises(InvalidSourceError, match="does not continue") as raised:
        append_era5([late], NAME, catalog=catalog)

    assert "2019-03-20T23:00:00 to 2019-03-21T01:00:00 (1 step(s) missing)" in str(raised.value)
    assert catalog.get(NAME) == initial.entry
    assert catalog.open_dataset(NAME).sizes["time"] == FIRST_STEPS
    assert not (catalog.data_dir / VERSIONS_FOLDER).exists()


def test_append_overlap_and_repeat_rejected(split_grib, uk_t2m_grib, tmp_path):
    first, _ = split_grib
    overlapping = write_grib_messages(uk_t2m_grib, tmp_path / "overlap.grib", range(FIRST_STEPS - 1, 744))
    catalog = Catalog(tmp_path / "home")
    ingest_era5([first], NAME, TRAIN, TEST, catalog=catalog)

    with pytest.raises(InvalidSourceError, match="not after the last time"):
        append_era5([overlapping], NAME, catalog=catalog)
    with pytest.raises(InvalidSourceError, match="already contains"):
        append_era5([first], NAME, catalog=catalog)


def test_append_write_failure_keeps_old(split_grib, tmp_path, monkeypatch):
    first, rest = split_grib
    catalog = Catalog(tmp_path / "home")
    initial = ingest_era5([first], NAME, TRAIN, TEST, catalog=catalog)
    chunks_before = _chunk_files(initial.zarr_path)

    def fail(self, *args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(xr.Dataset, "to_zarr", fail)
    with pytest.raises(OSError, match="injected"):
        append_era5([rest], NAME, catalog=catalog)
    monkeypatch.undo()

    assert catalog.get(NAME) == initial.entry
    assert _chunk_files(initial.zarr_path) == chunks_before
    assert catalog.open_dataset(NAME).sizes["time"] == FIRST_STEPS
    assert sorted(path.name for path in (catalog.data_dir / VERSIONS_FOLDER / NAME).iterdir()) == []

    appended = append_era5([rest], NAME, catalog=catalog)
    assert appended.entry.time_count == 744


def test_append_kill_before_publish_keeps_old(split_grib, tmp_path, monkeypatch):
    """A stop between writing the new version and publishing it leaves the old dataset published."""
    first, rest = split_grib
    catalog = Catalog(tmp_path / "home")
    initial = ingest_era5([first], NAME, TRAIN, TEST, catalog=catalog)

    def stop(self, entry):
        raise KeyboardInterrupt

    monkeypatch.setattr(Catalog, "publish", stop)
    with pytest.raises(KeyboardInterrupt):
        append_era5([rest], NAME, catalog=catalog)
    monkeypatch.undo()

    assert catalog.get(NAME) == initial.entry
    assert catalog.open_dataset(NAME).sizes["time"] == FIRST_STEPS

    appended = append_era5([rest], NAME, catalog=catalog)

    assert appended.entry.time_count == 744
    assert sorted(path.name for path in (catalog.data_dir / VERSIONS_FOLDER / NAME).iterdir()) == [
        appended.zarr_path.name
    ]


def test_params_append_flag():
    from flows.params import IngestEra5Params

    assert IngestEra5Params().append is False
    assert IngestEra5Params(append=True).append is True


def test_append_unaligned_chunk_boundary(uk_t2m_grib, tmp_path):
    """An append after 490 steps (20 full chunks of 24 and a last chunk of 10) equals one ingest of the file."""
    split = 490
    first = write_grib_messages(uk_t2m_grib, tmp_path / "uk-a.grib", range(0, split))
    rest = write_grib_messages(uk_t2m_grib, tmp_path / "uk-b.grib", range(split, 744))
    catalog = Catalog(tmp_path / "appended")
    initial = ingest_era5([first], NAME, TRAIN, TEST, catalog=catalog)
    chunks_before = _chunk_files(initial.zarr_path)
    partial = max(chunks_before, key=lambda key: int(key.split("/")[2]))

    appended = append_era5([rest], NAME, catalog=catalog)
    whole = ingest_era5([uk_t2m_grib], NAME, TRAIN, TEST, catalog=Catalog(tmp_path / "whole"))

    assert appended.entry.time_count == 744
    assert appended.entry.statistics == whole.entry.statistics
    chunks_after = _chunk_files(appended.zarr_path)
    assert len(chunks_after) == 31
    for key, identity in chunks_before.items():
        if key != partial:
            assert chunks_after[key] == identity, f"full chunk {key} was rewritten"
    assert chunks_after[partial][0] != chunks_before[partial][0], "the partial last chunk was not rewritten"

    store = catalog.open_dataset(NAME)
    with xr.open_zarr(whole.zarr_path, consolidated=False) as reference:
        for name in reference.variables:
            np.testing.assert_array_equal(store[name].values, reference[name].values, err_msg=name)
