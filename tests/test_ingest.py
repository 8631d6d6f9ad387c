"""Tests of `tasks.ingest.ingest_era5` on real ERA5 GRIB and NetCDF files."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from pydantic import ValidationError

from data_catalog import Catalog
from data_catalog.workspace import sha256_file
from era5_direct import assert_nothing_written, grib_points, mismatches, netcdf_points, write_grib_messages
from flows.params import IngestEra5Params
from tasks.ingest import InvalidPeriodError, InvalidSourceError, ingest_era5
from tasks.normalise import denormalise, open_statistics

UK_NAME = "era5-t2m-uk-2019-03"
UK_TRAIN = ("2019-03-01T00:00:00", "2019-03-24T23:00:00")
UK_TEST = ("2019-03-25T00:00:00", "2019-03-31T23:00:00")
UK_TRAIN_STEPS = 24 * 24

PL_TRAIN = ("2020-01-01T00:00:00", "2020-01-01T17:00:00")
PL_TEST = ("2020-01-01T18:00:00", "2020-01-01T23:00:00")
PL_LEVELS = [100, 200, 300, 400, 500, 550, 600, 650, 700, 750, 775, 800, 825, 850, 875, 900, 925, 950, 975, 1000]


@pytest.fixture(scope="module")
def uk_ingest(uk_t2m_grib, tmp_path_factory):
    """The UK t2m GRIB ingested once into a temporary ATMOREP_HOME, set for the whole module."""
    home = tmp_path_factory.mktemp("atmorep-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATMOREP_HOME", str(home))
        result = ingest_era5([uk_t2m_grib], UK_NAME, UK_TRAIN, UK_TEST)
        yield home, result


@pytest.fixture(scope="module")
def uk_source(uk_t2m_grib):
    """t2m [744, 33, 49] in K as float64, decoded directly by cfgrib."""
    with xr.open_dataset(uk_t2m_grib, engine="cfgrib", backend_kwargs={"indexpath": ""}) as dataset:
        return dataset["t2m"].values.astype(np.float64)


@pytest.fixture
def pl_files(data_mirror):
    folder = data_mirror / "era5" / "era5-pl-2020-01-01"
    return [folder / "ERA5_2020-01-01_pl_u.nc", folder / "ERA5_2020-01-01_pl_q.nc", folder / "ERA5_2020-01-01_sp.nc"]


# --- the demo GRIB ------------------------------------------------------------------------


def test_uk_store_layout(uk_ingest):
    home, result = uk_ingest
    store = Catalog().open_dataset(UK_NAME)

    assert result.reused is False
    assert result.zarr_path == home.resolve() / "data" / f"{UK_NAME}.zarr"
    assert list(store.data_vars) == ["t2m"]
    assert store["t2m"].dims == ("time", "latitude", "longitude")
    assert store["t2m"].shape == (744, 33, 49)
    assert store["t2m"].dtype == np.float32
    assert store["t2m"].chunks[0][0] == 24
    assert store["t2m"].attrs["units"] == "K"
    assert zarr.open_group(result.zarr_path, mode="r").metadata.zarr_format == 3


def test_uk_coordinates(uk_ingest):
    store = Catalog().open_dataset(UK_NAME)
    latitude = store["latitude"].values
    times = store["time"].values

    assert latitude[0] == 58.0
    assert latitude[-1] == 50.0
    assert np.all(np.diff(latitude) < 0)
    assert np.all(np.diff(store["longitude"].values) > 0)
    assert times.size == 744
    assert times[0] == np.datetime64("2019-03-01T00:00")
    assert times[-1] == np.datetime64("2019-03-31T23:00")
    assert np.all(np.diff(times) == np.timedelta64(1, "h"))


def test_uk_statistics_match_numpy(uk_ingest, uk_source):
    _, result = uk_ingest
    store = Catalog().open_dataset(UK_NAME)
    train = uk_source[:UK_TRAIN_STEPS]

    stored = store.attrs["statistics"]["t2m"]
    assert stored["mean"] == pytest.approx([train.mean()], rel=1e-12)
    assert stored["std"] == pytest.approx([train.std()], rel=1e-12)
    assert result.entry.statistics["t2m"].mean == stored["mean"]
    assert result.entry.statistics["t2m"].std == stored["std"]


def test_uk_test_period_excluded(uk_ingest, uk_source):
    store = Catalog().open_dataset(UK_NAME)
    stored = store.attrs["statistics"]["t2m"]
    normalised = store["t2m"].values

    # The test week averages 0.51 K warmer than the train period, so the full-month mean is 0.11 K higher.
    assert abs(stored["mean"][0] - uk_source.mean()) > 0.05
    assert abs(stored["mean"][0] - uk_source[UK_TRAIN_STEPS:].mean()) > 0.3
    assert float(normalised[:UK_TRAIN_STEPS].mean(dtype=np.float64)) == pytest.approx(0.0, abs=1e-5)
    assert abs(float(normalised[UK_TRAIN_STEPS:].mean(dtype=np.float64))) > 0.05


def test_uk_entry_and_attrs(uk_ingest, uk_t2m_grib):
    home, result = uk_ingest
    entry = Catalog().get(UK_NAME)
    attrs = Catalog().open_dataset(UK_NAME).attrs

    assert entry == result.entry
    assert entry.zarr_path == str(home.resolve() / "data" / f"{UK_NAME}.zarr")
    assert entry.time_count == 744
    assert entry.grid.shape == (33, 49)
    assert entry.grid.latitude_step == -0.25
    assert entry.levels is None
    assert attrs["train_period"] == list(UK_TRAIN)
    assert attrs["test_period"] == list(UK_TEST)
    assert attrs["digest"] == entry.digest
    assert attrs["content_digest"] == entry.content_digest
    assert attrs["version"] == entry.version == 1
    assert attrs["name"] == UK_NAME
    source = attrs["provenance"]["sources"][0]
    assert source["path"] == str(uk_t2m_grib.resolve())
    assert source["sha256"] == sha256_file(uk_t2m_grib)
    assert source["size"] == uk_t2m_grib.stat().st_size
    packages = attrs["provenance"]["packages"]
    for package in ("xarray", "zarr", "cfgrib", "eccodes", "numpy", "dask"):
        assert package in packages


def test_uk_rerun_reuses_store(uk_ingest, uk_t2m_grib):
    home, first = uk_ingest
    store_metadata = first.zarr_path / "zarr.json"
    entry_file = home / "catalog" / f"{UK_NAME}.yaml"
    before = (store_metadata.stat().st_mtime_ns, entry_file.stat().st_mtime_ns)

    again = ingest_era5([uk_t2m_grib], UK_NAME, UK_TRAIN, UK_TEST)

    assert again.reused is True
    assert again.entry == first.entry
    assert again.entry.version == 1
    assert (store_metadata.stat().st_mtime_ns, entry_file.stat().st_mtime_ns) == before


def test_no_index_files_beside_inputs(uk_ingest, uk_t2m_grib):
    assert list(uk_t2m_grib.parent.glob("*.idx")) == []


# --- replacement and failures -------------------------------------------------------------


def test_new_recipe_replaces_dataset(uk_t2m_grib, tmp_path):
    catalog = Catalog(tmp_path)
    first = ingest_era5([uk_t2m_grib], UK_NAME, UK_TRAIN, UK_TEST, catalog=catalog)

    second = ingest_era5(
        [uk_t2m_grib], UK_NAME, UK_TRAIN, UK_TEST, time_chunk=48, catalog=catalog
    )

    assert second.reused is False
    assert second.entry.digest != first.entry.digest
    assert second.entry.content_digest != first.entry.content_digest
    assert (first.entry.version, second.entry.version) == (1, 2)
    assert catalog.get(UK_NAME).digest == second.entry.digest
    assert catalog.open_dataset(UK_NAME)["t2m"].chunks[0][0] == 48
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == [f"{UK_NAME}.zarr"]


def test_content_digest_same_in_two_homes(uk_ingest, uk_t2m_grib, tmp_path):
    _, first = uk_ingest

    second = ingest_era5([uk_t2m_grib], UK_NAME, UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path))

    assert second.reused is False
    assert second.entry.created != first.entry.created
    assert second.entry.content_digest == first.entry.content_digest
    assert second.entry.digest == first.entry.digest


def test_content_digest_changes_with_one_value(uk_t2m_grib, tmp_path):
    with xr.open_dataset(uk_t2m_grib, engine="cfgrib", backend_kwargs={"indexpath": ""}) as decoded:
        source = decoded[["t2m"]].load()
    original, changed = tmp_path / "original.nc", tmp_path / "changed.nc"
    source.to_netcdf(original, engine="h5netcdf")
    source["t2m"][-1, 0, 0] = source["t2m"][-1, 0, 0] + 1.0
    source.to_netcdf(changed, engine="h5netcdf")

    first = ingest_era5([original], UK_NAME, UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "original"))
    second = ingest_era5([changed], UK_NAME, UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "changed"))

    # The change lies in the test period, so the statistics are equal and only a chunk differs.
    assert second.entry.statistics == first.entry.statistics
    assert second.entry.content_digest != first.entry.content_digest


def test_recipe_change_without_content_change_keeps_version(uk_t2m_grib, tmp_path):
    catalog = Catalog(tmp_path)
    first = ingest_era5([uk_t2m_grib], UK_NAME, UK_TRAIN, UK_TEST, catalog=catalog)

    # The data have no time gaps, so the gap policy changes the recipe but not the store.
    second = ingest_era5([uk_t2m_grib], UK_NAME, UK_TRAIN, UK_TEST, on_time_gaps="keep", catalog=catalog)

    assert second.reused is False
    assert second.entry.digest != first.entry.digest
    assert second.entry.content_digest == first.entry.content_digest
    assert second.entry.version == first.entry.version == 1


def test_write_failure_leaves_nothing(uk_t2m_grib, tmp_path, monkeypatch):
    original = xr.Dataset.to_zarr
    calls = []

    def fail_on_third_call(self, *args, **kwargs):
        calls.append(kwargs.get("region"))
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", fail_on_third_call)

    with pytest.raises(OSError, match="injected"):
        ingest_era5([uk_t2m_grib], UK_NAME, UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path))

    assert len(calls) == 3
    assert_nothing_written(tmp_path, UK_NAME)


def test_publish_failure_leaves_nothing(uk_t2m_grib, tmp_path, monkeypatch):
    def fail(self, entry):
        raise OSError("catalog not writable (injected)")

    monkeypatch.setattr(Catalog, "publish", fail)

    with pytest.raises(OSError, match="injected"):
        ingest_era5([uk_t2m_grib], UK_NAME, UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path))

    assert_nothing_written(tmp_path, UK_NAME)


def test_truncated_grib_names_file(data_mirror, tmp_path):
    corrupted = data_mirror / "era5" / "unusual" / "era5-levels-corrupted.grib"

    with pytest.raises(InvalidSourceError, match="WrongLengthError") as raised:
        ingest_era5([corrupted], "corrupted", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path))

    assert str(corrupted) in str(raised.value)
    assert_nothing_written(tmp_path, "corrupted")


def test_south_to_north_grib_flipped(data_mirror):
    from tasks.ingest import open_sources

    path = data_mirror / "era5" / "unusual" / "scanning_mode_64.grib"
    with xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""}) as raw:
        source = raw["skt"].values
        source_latitude = raw["latitude"].values

    dataset = open_sources([path])

    assert source_latitude[0] < source_latitude[-1]
    assert dataset["skt"].dims == ("time", "latitude", "longitude")
    assert dataset["latitude"].values[0] == 90.0
    np.testing.assert_array_equal(dataset["skt"].values[0], source[::-1])


# --- several files ------------------------------------------------------------------------


def test_grib_split_by_time_combined(uk_t2m_grib, uk_source, tmp_path):
    late = write_grib_messages(uk_t2m_grib, tmp_path / "late.grib", range(300, 744))
    early = write_grib_messages(uk_t2m_grib, tmp_path / "early.grib", range(0, 300))
    catalog = Catalog(tmp_path / "home")

    result = ingest_era5([late, early], UK_NAME, UK_TRAIN, UK_TEST, catalog=catalog)
    store = catalog.open_dataset(UK_NAME)

    assert store.sizes["time"] == 744
    assert result.entry.statistics["t2m"].mean == pytest.approx([uk_source[:UK_TRAIN_STEPS].mean()], rel=1e-12)
    assert list(tmp_path.glob("*.idx")) == []


def test_grib_time_gap_rejected(uk_t2m_grib, tmp_path):
    gappy = write_grib_messages(uk_t2m_grib, tmp_path / "gap.grib", [*range(0, 100), *range(101, 744)])

    with pytest.raises(InvalidSourceError, match="not regular") as raised:
        ingest_era5([gappy], UK_NAME, UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "home"))

    message = str(raised.value)
    assert str(gappy) in message
    assert "2019-03-05T03:00:00" in message


def test_overlapping_files_rejected(uk_t2m_grib, tmp_path):
    early = write_grib_messages(uk_t2m_grib, tmp_path / "early.grib", range(0, 400))
    late = write_grib_messages(uk_t2m_grib, tmp_path / "late.grib", range(390, 744))

    with pytest.raises(InvalidSourceError, match="10 identical time") as raised:
        ingest_era5([early, late], UK_NAME, UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "home"))

    assert str(early) in str(raised.value)
    assert str(late) in str(raised.value)


def test_netcdf_levels(pl_files, tmp_path):
    catalog = Catalog(tmp_path)

    result = ingest_era5(pl_files, "era5-pl-2020-01-01", PL_TRAIN, PL_TEST, catalog=catalog)
    store = catalog.open_dataset("era5-pl-2020-01-01")

    assert sorted(store.data_vars) == ["q", "sp", "u"]
    assert store["u"].dims == ("time", "level", "latitude", "longitude")
    assert store["u"].shape == (24, 20, 41, 41)
    assert store["sp"].dims == ("time", "latitude", "longitude")
    assert store["level"].values.tolist() == PL_LEVELS
    assert result.entry.levels == PL_LEVELS
    assert result.entry.variables["u"].has_levels is True
    assert result.entry.variables["sp"].units == "Pa"
    assert store["latitude"].values[0] == 55.0
    assert len(store.attrs["statistics"]["u"]["mean"]) == 20
    assert len(store.attrs["statistics"]["sp"]["mean"]) == 1


def test_netcdf_statistics_per_level(pl_files, tmp_path):
    catalog = Catalog(tmp_path)
    result = ingest_era5(pl_files[:1], "era5-u-2020-01-01", PL_TRAIN, PL_TEST, catalog=catalog)
    with xr.open_dataset(pl_files[0], engine="h5netcdf") as raw:
        source = raw["u"].transpose("time", "level", "latitude", "longitude").sortby("level").values

    train = source[:18].astype(np.float64)

    np.testing.assert_allclose(result.entry.statistics["u"].mean, train.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(result.entry.statistics["u"].std, train.std(axis=(0, 2, 3)), rtol=1e-12)


def test_variable_selection(pl_files, tmp_path):
    catalog = Catalog(tmp_path)

    result = ingest_era5(pl_files, "u-only", PL_TRAIN, PL_TEST, variables=["u"], catalog=catalog)

    assert list(catalog.open_dataset("u-only").data_vars) == ["u"]
    assert list(result.entry.statistics) == ["u"]


def test_missing_variable_lists_available(pl_files, tmp_path):
    with pytest.raises(InvalidSourceError, match=r"\['t'\] not found") as raised:
        ingest_era5(pl_files, "missing", PL_TRAIN, PL_TEST, variables=["t"], catalog=Catalog(tmp_path))

    assert "['q', 'sp', 'u']" in str(raised.value)


def test_same_file_twice_rejected(pl_files, tmp_path):
    with pytest.raises(ValueError, match="listed twice"):
        ingest_era5([pl_files[2], pl_files[2]], "twice", PL_TRAIN, PL_TEST, catalog=Catalog(tmp_path))


def test_same_file_through_symlink_rejected(pl_files, tmp_path):
    link = tmp_path / "link.grib"
    link.symlink_to(pl_files[2])

    with pytest.raises(ValueError, match="listed twice") as raised:
        ingest_era5([pl_files[2], link], "twice", PL_TRAIN, PL_TEST, catalog=Catalog(tmp_path / "home"))

    assert str(link) in str(raised.value)


def test_symlinked_source_path_kept(data_mirror, tmp_path):
    corrupted = data_mirror / "era5" / "unusual" / "era5-levels-corrupted.grib"
    link = tmp_path / "mirror" / "corrupted.grib"
    link.parent.mkdir()
    link.symlink_to(corrupted)

    with pytest.raises(InvalidSourceError, match="WrongLengthError") as raised:
        ingest_era5([link], "corrupted", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "home"))

    assert str(link) in str(raised.value)
    assert str(corrupted.resolve()) not in str(raised.value)


# --- periods ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "test", "match"),
    [
        (("2020-01-01T00:00:00", "2020-01-01T12:00:00"), ("2020-01-01T12:00:00", "2020-01-01T23:00:00"), "overlaps"),
        (("2020-01-01T10:00:00", "2020-01-01T23:00:00"), ("2020-01-01T00:00:00", "2020-01-01T15:00:00"), "overlaps"),
        (("2019-12-31T00:00:00", "2020-01-01T12:00:00"), PL_TEST, "train_period .* is outside the data"),
        (PL_TRAIN, ("2020-01-01T18:00:00", "2020-01-02T06:00:00"), "test_period .* is outside the data"),
        (("2020-01-01T12:00:00", "2020-01-01T00:00:00"), PL_TEST, "after its end"),
        (PL_TRAIN, ("2020-01-01T18:10:00", "2020-01-01T18:50:00"), "contains no time step"),
        (PL_TRAIN, "2020-01-01", "not a .start, end. pair"),
    ],
)
def test_invalid_periods(pl_files, tmp_path, train, test, match):
    with pytest.raises(InvalidPeriodError, match=match):
        ingest_era5(pl_files[2:], "periods", train, test, catalog=Catalog(tmp_path))

    assert_nothing_written(tmp_path, "periods")


def test_period_error_names_single_time(data_mirror, tmp_path):
    path = data_mirror / "era5" / "era5_t2m_monthly_2022-10_0p25.grib"

    with pytest.raises(InvalidPeriodError, match="outside the data") as raised:
        ingest_era5([path], "monthly", ("2022-10-01", "2022-10-31"), None, catalog=Catalog(tmp_path))

    assert "single valid time, 2022-10-01T00:00:00" in str(raised.value)
    assert "--test-period none none" in str(raised.value)
    assert_nothing_written(tmp_path, "monthly")


@pytest.mark.parametrize(
    ("step", "text"),
    [
        (np.timedelta64(1, "h"), "1 h"),
        (np.timedelta64(6, "h"), "6 h"),
        (np.timedelta64(1, "D"), "1 day"),
        (np.timedelta64(2, "D"), "2 days"),
        (np.timedelta64(30, "m"), "30 min"),
        (np.timedelta64(90, "s"), "90 s"),
    ],
)
def test_format_step(step, text):
    from tasks.ingest import format_step

    assert format_step(step) == text


def test_test_period_none(data_mirror, tmp_path):
    catalog = Catalog(tmp_path)
    path = data_mirror / "era5" / "era5_t2m_monthly_2022-10_0p25.grib"

    result = ingest_era5([path], "monthly", ("2022-10-01", "2022-10-01"), None, catalog=catalog)
    attrs = catalog.open_dataset("monthly").attrs

    assert result.entry.test_period is None
    assert result.entry.time_count == 1
    assert attrs["test_period"] is None
    assert catalog.get("monthly") == result.entry


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"on_time_gaps": "fill"}, "on_time_gaps 'fill'"),
        ({"normalisation": {"sp": "regional"}}, "normalisation of 'sp' is 'regional'"),
        ({"area": (40.0, 0.0, 50.0, 10.0)}, "south"),
    ],
)
def test_invalid_options_rejected(pl_files, tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        ingest_era5(pl_files[2:], "options", PL_TRAIN, PL_TEST, catalog=Catalog(tmp_path), **options)

    assert_nothing_written(tmp_path, "options")


def test_normalisation_changes_digest(pl_files, tmp_path):
    catalog = Catalog(tmp_path)

    first = ingest_era5(pl_files[2:], "sp", PL_TRAIN, PL_TEST, catalog=catalog)
    second = ingest_era5(pl_files[2:], "sp", PL_TRAIN, PL_TEST, catalog=catalog, normalisation={"sp": "local"})

    assert second.reused is False
    assert second.entry.digest != first.entry.digest
    assert second.entry.statistics["sp"].scheme == "local"
    assert second.entry.provenance.parameters["normalisation"] == {"sp": "local"}


# --- every real ERA5 file -----------------------------------------------------------------

PL_SET = [
    f"era5-pl-2020-01-01/ERA5_2020-01-01_{name}.nc"
    for name in ("d2m", "e", "pl_q", "pl_u", "pl_v", "sp", "tcw", "tp", "u10", "v10")
]
# Each file alone, or the set it belongs to, with train and test periods that fit its times.
# Single-step files have no test period, so they are ingested for training only.
ERA5_SETS = {
    "uk-t2m": (["era5-2mt-2019-03-uk.grib"], UK_TRAIN, UK_TEST),
    "pl-set": (PL_SET, PL_TRAIN, PL_TEST),
    "members": (
        ["era5-levels-members.grib"], ("2017-01-01T00:00", "2017-01-01T12:00"), ("2017-01-02T00:00", "2017-01-02T12:00")
    ),
    "global-2deg": (
        ["era5-global-2deg-2019-01-05.nc"], ("2019-01-05T01:00", "2019-01-05T07:00"), ("2019-01-05T08:00", "2019-01-05T10:00")
    ),
    "monthly-0p25": (["era5_t2m_monthly_2022-10_0p25.grib"], ("2022-10-01T00:00", "2022-10-01T00:00"), None),
    "missing-values": (
        ["unusual/fields_with_missing_values.grib"], ("2017-10-18T00:00", "2017-10-18T00:00"), ("2017-10-18T12:00", "2017-10-18T12:00")
    ),
    "hpa-and-pa": (["unusual/hpa_and_pa.grib"], ("2017-09-27T00:00", "2017-09-27T00:00"), None),
    "scanning-mode-64": (["unusual/scanning_mode_64.grib"], ("2017-10-18T12:00", "2017-10-18T12:00"), None),
}
# Rejected with an error instead; see tests/test_unusual.py.
BROKEN_FILES = {"unusual/era5-levels-corrupted.grib"}


def test_every_era5_file_listed(data_mirror):
    folder = data_mirror / "era5"
    found = {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and not path.name.endswith(".idx")}

    listed = {name for files, _, _ in ERA5_SETS.values() for name in files} | BROKEN_FILES

    assert found == listed


@pytest.mark.parametrize("name", sorted(ERA5_SETS))
def test_every_era5_file_matches_source(data_mirror, tmp_path, name):
    files, train, test = ERA5_SETS[name]
    paths = [data_mirror / "era5" / file for file in files]
    catalog = Catalog(tmp_path)

    result = ingest_era5(paths, name, train, test, catalog=catalog)
    store = catalog.open_dataset(name).load()
    restored = denormalise(store, open_statistics(result.zarr_path))

    rng = np.random.default_rng(sorted(ERA5_SETS).index(name))
    points = []
    for path in paths:
        points.extend(grib_points(path, rng) if path.suffix == ".grib" else netcdf_points(path, rng))
    assert len(points) >= 40
    failures = mismatches(restored, points)
    assert failures == [], f"{len(failures)} of {len(points)} points differ, first: {failures[:3]}"
    for variable, info in result.entry.variables.items():
        if info.mask is not None:
            np.testing.assert_array_equal(store[info.mask].values, np.isnan(store[variable].values))


# --- flow parameters ----------------------------------------------------------------------


def test_params_parse_command_line_forms():
    params = IngestEra5Params(
        train_period=("2022-10-01T00:00", "2022-10-01T00:00"),
        test_period=["none", "none"],
        normalisation=["t2m=local", "sp=global"],
        area=(60, -10, 50, 2),
    )

    assert params.test_period is None
    assert params.normalisation == {"t2m": "local", "sp": "global"}
    assert params.area == (60.0, -10.0, 50.0, 2.0)
    assert params.longitude_convention == "-180..180"
    assert params.on_time_gaps == "error"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"normalisation": ["t2m"]}, "not VARIABLE=SCHEME"),
        ({"normalisation": {"t2m": "regional"}}, "normalisation"),
        ({"longitude_convention": "east"}, "longitude_convention"),
        ({"coarsen_factor": 0}, "coarsen_factor"),
        ({"on_time_gaps": "fill"}, "on_time_gaps"),
    ],
)
def test_params_reject_invalid_options(fields, match):
    with pytest.raises(ValidationError, match=match):
        IngestEra5Params(**fields)


def test_cf_standard_names_become_short_names(data_mirror):
    from tasks.ingest import open_sources

    dataset = open_sources([data_mirror / "era5" / "era5-global-2deg-2019-01-05.nc"])

    assert {"t", "u", "v", "w", "q", "z"} <= set(dataset.data_vars)
    assert "air_temperature" not in dataset.data_vars
    assert "eastward_wind" not in dataset.data_vars
    assert dataset["t"].attrs["units"] == "K"


def test_non_era5_variable_skipped_with_warning(data_mirror, tmp_path, caplog):
    path = data_mirror / "era5" / "era5-global-2deg-2019-01-05.nc"
    train, test = ("2019-01-05T01:00", "2019-01-05T07:00"), ("2019-01-05T08:00", "2019-01-05T10:00")

    with caplog.at_level(logging.WARNING, logger="tasks.ingest"):
        result = ingest_era5([path], "global-2deg", train, test, catalog=Catalog(tmp_path / "default"))

    assert sorted(result.entry.variables) == ["ciwc", "q", "t", "u", "v", "w", "z"]
    assert "skipping variables ['tau_cirrus']" in caplog.text
    assert "select them by name with `variables`" in caplog.text

    kept = ingest_era5(
        [path], "global-2deg", train, test, variables=["t", "tau_cirrus"], catalog=Catalog(tmp_path / "selected")
    )
    assert sorted(kept.entry.variables) == ["t", "tau_cirrus"]
    assert kept.entry.variables["tau_cirrus"].long_name == "Cirrus optical depth"


def test_cf_surface_names_become_short_names(tmp_path):
    from tasks.ingest import canonicalise

    times = pd.date_range("2020-01-01", periods=2, freq="h")
    grid = {"latitude": [50.0, 49.0], "longitude": [0.0, 1.0]}
    field = np.zeros((2, 2, 2), dtype=np.float32)
    dims = ("time", "latitude", "longitude")
    source = xr.Dataset(
        {
            "air_temperature": (dims, field, {"units": "K", "long_name": "2 metre temperature"}),
            "eastward_wind": (dims, field, {"units": "m s**-1"}),
            "northward_wind": (dims, field, {"units": "m s**-1", "long_name": "100 metre V wind component"}),
            "surface_air_pressure": (dims, field, {"units": "Pa"}),
            "dew_point_temperature": (dims, field, {"units": "K", "long_name": "2 metre dewpoint temperature"}),
            "air_pressure_at_mean_sea_level": (dims, field, {"units": "Pa"}),
            "sea_surface_temperature": (dims, field, {"units": "K"}),
        },
        coords={"time": times, **grid},
    )
    # A scalar height coordinate applies to every variable of the file.
    at_10_m = source[["eastward_wind"]].assign_coords(height=xr.DataArray(10.0, attrs={"units": "m"}))

    dataset = canonicalise(source, tmp_path / "surface.nc")

    assert sorted(dataset.data_vars) == ["d2m", "eastward_wind", "msl", "sp", "sst", "t2m", "v100"]
    assert list(canonicalise(at_10_m, tmp_path / "wind.nc").data_vars) == ["u10"]


def test_cf_name_without_height_kept(tmp_path):
    from tasks.ingest import canonicalise

    source = xr.Dataset(
        {"air_temperature": (("time", "latitude", "longitude"), np.zeros((1, 2, 2), np.float32), {"units": "K"})},
        coords={"time": pd.date_range("2020-01-01", periods=1), "latitude": [50.0, 49.0], "longitude": [0.0, 1.0]},
    )

    assert list(canonicalise(source, tmp_path / "ambiguous.nc").data_vars) == ["air_temperature"]
