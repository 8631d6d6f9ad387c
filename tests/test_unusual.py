"""Tests of bad and unusual ERA5 input: the files of era5/unusual/ and files derived from the real ERA5 files.

Each case ends either in a dataset checked against values read with ecCodes, or in an
error that names the file and the problem and leaves no dataset behind.
"""

from __future__ import annotations

import logging

import eccodes
import numpy as np
import pytest
import xarray as xr

from data_catalog import Catalog
from era5_direct import assert_nothing_written, grib_fields, write_grib_messages, write_grib_where
from models.data import WindowDataset
from tasks.ingest import InvalidSourceError, ingest_era5
from tasks.normalise import denormalise, open_statistics

UK_TRAIN = ("2019-03-01T00:00", "2019-03-24T23:00")
UK_TEST = ("2019-03-25T00:00", "2019-03-31T23:00")
MEMBERS_TRAIN = ("2017-01-01T00:00", "2017-01-01T12:00")
MEMBERS_TEST = ("2017-01-02T00:00", "2017-01-02T12:00")


@pytest.fixture(scope="module")
def unusual(data_mirror):
    return data_mirror / "era5" / "unusual"


@pytest.fixture(scope="module")
def members_grib(data_mirror):
    return data_mirror / "era5" / "era5-levels-members.grib"


def ingest_and_restore(paths, name, train, test, catalog, **options):
    """Ingest, then return the entry, the loaded store and the denormalised store."""
    result = ingest_era5(paths, name, train, test, catalog=catalog, **options)
    store = catalog.open_dataset(name).load()
    return result.entry, store, denormalise(store, open_statistics(result.zarr_path))


def store_field(restored: xr.Dataset, field, level: float | None = None) -> np.ndarray:
    """Return the stored values at every point of one ecCodes field, in the field's point order."""
    values = restored[field.variable].sel(time=field.time)
    if level is not None:
        values = values.sel(level=level)
    longitude = (field.longitudes + 180.0) % 360.0 - 180.0
    rows = np.searchsorted(-restored["latitude"].values, -field.latitudes)
    columns = np.searchsorted(restored["longitude"].values, longitude)
    np.testing.assert_allclose(restored["latitude"].values[rows], field.latitudes)
    np.testing.assert_allclose(restored["longitude"].values[columns], longitude)
    return values.values[rows, columns]


def float32_tolerance(values: np.ndarray) -> float:
    return 4.0 * float(np.spacing(np.float32(np.nanmax(np.abs(values)))))


# --- clear errors that leave nothing behind -----------------------------------------------


def test_truncated_file_rejected(unusual, tmp_path):
    path = unusual / "era5-levels-corrupted.grib"

    with pytest.raises(InvalidSourceError, match="message 0 .* truncated or corrupted .*WrongLengthError") as raised:
        ingest_era5([path], "corrupted", MEMBERS_TRAIN, MEMBERS_TEST, catalog=Catalog(tmp_path))

    assert str(path) in str(raised.value)
    assert_nothing_written(tmp_path, "corrupted")


def test_truncated_copy_rejected(uk_t2m_grib, tmp_path):
    cut = tmp_path / "cut.grib"
    cut.write_bytes(uk_t2m_grib.read_bytes()[:-1000])

    with pytest.raises(InvalidSourceError, match="message 743 .* truncated or corrupted") as raised:
        ingest_era5([cut], "cut", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "home"))

    assert str(cut) in str(raised.value)
    assert_nothing_written(tmp_path / "home", "cut")


def test_corrupted_end_marker_rejected(uk_t2m_grib, tmp_path):
    data = bytearray(uk_t2m_grib.read_bytes())
    # Every message of this file takes 3342 bytes and starts on a multiple of 3360 bytes.
    end_of_message_5 = 5 * 3360 + 3342
    data[end_of_message_5 - 4 : end_of_message_5] = b"XXXX"
    broken = tmp_path / "broken.grib"
    broken.write_bytes(bytes(data))

    with pytest.raises(InvalidSourceError, match="message 5 .* truncated or corrupted") as raised:
        ingest_era5([broken], "broken", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "home"))

    assert str(broken) in str(raised.value)
    assert_nothing_written(tmp_path / "home", "broken")


def test_variable_missing_from_some_files(members_grib, tmp_path):
    first_day = write_grib_where(members_grib, tmp_path / "day1.grib", lambda h: eccodes.codes_get(h, "dataDate") == 20170101)
    second_day_t = write_grib_where(
        members_grib,
        tmp_path / "day2-t.grib",
        lambda h: eccodes.codes_get(h, "dataDate") == 20170102 and eccodes.codes_get(h, "shortName") == "t",
    )

    with pytest.raises(InvalidSourceError, match="variable 'z' is missing from") as raised:
        ingest_era5([first_day, second_day_t], "partial", MEMBERS_TRAIN, MEMBERS_TEST, catalog=Catalog(tmp_path / "home"))

    assert str(second_day_t) in str(raised.value)
    assert "2017-01-02T00:00:00 to 2017-01-02T12:00:00" in str(raised.value)
    assert_nothing_written(tmp_path / "home", "partial")


def test_variable_missing_at_some_times_in_one_file(members_grib, tmp_path):
    def keep(handle: int) -> bool:
        last_step = eccodes.codes_get(handle, "dataDate") == 20170102 and eccodes.codes_get(handle, "dataTime") == 1200
        return not (last_step and eccodes.codes_get(handle, "shortName") == "z")

    holey = write_grib_where(members_grib, tmp_path / "holey.grib", keep)

    with pytest.raises(InvalidSourceError, match="lacks 20 field.* of variable 'z'.* 20170102 1200") as raised:
        ingest_era5([holey], "holey", MEMBERS_TRAIN, MEMBERS_TEST, catalog=Catalog(tmp_path / "home"))

    assert str(holey) in str(raised.value)
    assert_nothing_written(tmp_path / "home", "holey")


def test_mixed_grids_across_files(uk_t2m_grib, data_mirror, tmp_path):
    global_field = data_mirror / "era5" / "era5_t2m_monthly_2022-10_0p25.grib"

    with pytest.raises(InvalidSourceError, match="different grids or resolutions") as raised:
        ingest_era5(
            [uk_t2m_grib, global_field], "mixed", UK_TRAIN, ("2022-10-01", "2022-10-01"), catalog=Catalog(tmp_path)
        )

    assert str(uk_t2m_grib) in str(raised.value)
    assert str(global_field) in str(raised.value)
    assert "33 x 49 points" in str(raised.value)
    assert "721 x 1440 points" in str(raised.value)
    assert_nothing_written(tmp_path, "mixed")


def test_mixed_resolutions_netcdf(data_mirror, tmp_path):
    regional = data_mirror / "era5" / "era5-pl-2020-01-01" / "ERA5_2020-01-01_sp.nc"
    global_2deg = data_mirror / "era5" / "era5-global-2deg-2019-01-05.nc"

    with pytest.raises(InvalidSourceError, match="different grids or resolutions.*step 0.25.*step 2 degrees"):
        ingest_era5(
            [regional, global_2deg], "mixed", ("2019-01-05T01:00", "2019-01-05T10:00"),
            ("2020-01-01T00:00", "2020-01-01T23:00"), catalog=Catalog(tmp_path),
        )

    assert_nothing_written(tmp_path, "mixed")


def test_mixed_grids_in_one_file(uk_t2m_grib, data_mirror, tmp_path):
    mixed = tmp_path / "mixed.grib"
    global_field = data_mirror / "era5" / "era5_t2m_monthly_2022-10_0p25.grib"
    mixed.write_bytes(write_grib_messages(uk_t2m_grib, tmp_path / "uk.grib", [0, 1]).read_bytes() + global_field.read_bytes())

    with pytest.raises(InvalidSourceError, match="mixes 2 grids or resolutions") as raised:
        ingest_era5([mixed], "mixed", UK_TRAIN, None, catalog=Catalog(tmp_path / "home"))

    assert str(mixed) in str(raised.value)
    assert_nothing_written(tmp_path / "home", "mixed")


def test_identical_duplicate_in_file_dropped(uk_t2m_grib, tmp_path, caplog):
    repeated = write_grib_messages(uk_t2m_grib, tmp_path / "repeated.grib", [*range(0, 11), 10, *range(11, 48)])
    catalog = Catalog(tmp_path / "home")

    with caplog.at_level(logging.INFO, logger="tasks.grib"):
        entry, _, restored = ingest_and_restore(
            [repeated], "repeated", ("2019-03-01T00:00", "2019-03-01T23:00"), ("2019-03-02T00:00", "2019-03-02T23:00"), catalog
        )

    assert entry.time_count == 48
    assert "repeats field" in caplog.text
    assert "identical values: the repeats are dropped" in caplog.text
    field = grib_fields(uk_t2m_grib, {10})[0]
    np.testing.assert_allclose(store_field(restored, field), field.values, atol=float32_tolerance(field.values))


def test_different_duplicate_in_file_rejected(uk_t2m_grib, tmp_path):
    shifted = write_grib_where(
        uk_t2m_grib, tmp_path / "shifted.grib",
        lambda h: eccodes.codes_get(h, "dataDate") == 20190301 and eccodes.codes_get(h, "dataTime") == 1000,
        lambda h: eccodes.codes_set_values(h, eccodes.codes_get_values(h) + 0.5),
    )
    repeated = tmp_path / "repeated.grib"
    repeated.write_bytes(
        write_grib_messages(uk_t2m_grib, tmp_path / "day.grib", range(0, 24)).read_bytes() + shifted.read_bytes()
    )

    with pytest.raises(InvalidSourceError, match="dataTime=1000.* twice with different values .messages 10 and 24") as raised:
        ingest_era5([repeated], "repeated", ("2019-03-01T00:00", "2019-03-01T23:00"), None, catalog=Catalog(tmp_path / "home"))

    assert str(repeated) in str(raised.value)
    assert_nothing_written(tmp_path / "home", "repeated")


def test_duplicate_across_files_identical(uk_t2m_grib, tmp_path):
    early = write_grib_messages(uk_t2m_grib, tmp_path / "early.grib", range(0, 30))
    late = write_grib_messages(uk_t2m_grib, tmp_path / "late.grib", range(24, 48))

    with pytest.raises(InvalidSourceError, match="6 identical time.*with the same values") as raised:
        ingest_era5([early, late], "overlap", ("2019-03-01T00:00", "2019-03-01T23:00"), None, catalog=Catalog(tmp_path / "home"))

    assert str(early) in str(raised.value)
    assert str(late) in str(raised.value)
    assert_nothing_written(tmp_path / "home", "overlap")


def test_duplicate_across_files_different(uk_t2m_grib, tmp_path):
    early = write_grib_messages(uk_t2m_grib, tmp_path / "early.grib", range(0, 24))
    shifted = write_grib_where(
        uk_t2m_grib, tmp_path / "shifted.grib",
        lambda h: eccodes.codes_get(h, "dataDate") == 20190301 and eccodes.codes_get(h, "dataTime") >= 2000,
        lambda h: eccodes.codes_set_values(h, eccodes.codes_get_values(h) - 1.0),
    )

    with pytest.raises(InvalidSourceError, match="4 identical time.*different values at 4 of them .first 2019-03-01T20:00:00"):
        ingest_era5([early, shifted], "overlap", ("2019-03-01T00:00", "2019-03-01T23:00"), None, catalog=Catalog(tmp_path / "home"))

    assert_nothing_written(tmp_path / "home", "overlap")


# --- unusual input that ingests correctly -------------------------------------------------


def test_pa_and_hpa_levels_converted(unusual, tmp_path):
    path = unusual / "hpa_and_pa.grib"

    entry, store, restored = ingest_and_restore([path], "hpa-pa", ("2017-09-27", "2017-09-27"), None, Catalog(tmp_path))

    assert store["level"].values.tolist() == [0.01, 0.1, 1.0]
    assert store["level"].attrs["units"] == "hPa"
    assert entry.levels == [0.01, 0.1, 1.0]
    fields = grib_fields(path)
    assert [field.level for field in fields] == [1.0, 0.1, 0.01]
    for field in fields:
        expected = field.values
        stored = store_field(restored, field, level=field.level)
        np.testing.assert_array_equal(np.isnan(stored), np.isnan(expected))
        if not np.isnan(expected).all():
            np.testing.assert_allclose(stored, expected, atol=float32_tolerance(expected))
    # The 1 Pa field is entirely missing: NaN with its mask set, and no statistics drawn from it.
    assert store["t_mask"].sel(level=0.01).values.all()
    assert not store["t_mask"].sel(level=[0.1, 1.0]).values.any()
    assert entry.statistics["t"].count == [0, 37 * 72, 37 * 72]


def test_pa_levels_netcdf_converted(data_mirror, tmp_path):
    source = data_mirror / "era5" / "era5-pl-2020-01-01" / "ERA5_2020-01-01_pl_u.nc"
    with xr.open_dataset(source, engine="h5netcdf") as dataset:
        in_pa = dataset.assign_coords(level=("level", dataset["level"].values * 100.0, {"units": "Pa"})).load()
    converted = tmp_path / "u_pa.nc"
    in_pa.to_netcdf(converted, engine="h5netcdf")

    entry, _, restored = ingest_and_restore(
        [converted], "u-pa", ("2020-01-01T00:00", "2020-01-01T17:00"), ("2020-01-01T18:00", "2020-01-01T23:00"),
        Catalog(tmp_path / "home"),
    )

    assert entry.levels == sorted(in_pa["level"].values / 100.0)
    expected = in_pa["u"].sel(level=50000.0).sortby("latitude", ascending=False).values
    np.testing.assert_allclose(restored["u"].sel(level=500.0).values, expected, atol=float32_tolerance(expected))


def test_scanning_mode_oriented(unusual, tmp_path):
    path = unusual / "scanning_mode_64.grib"
    (field,) = grib_fields(path)

    entry, store, restored = ingest_and_restore([path], "scan", (str(field.time), str(field.time)), None, Catalog(tmp_path))

    assert field.latitudes[0] == -90.0
    assert store["latitude"].values[0] == 90.0
    assert entry.grid.latitude_step == -5.0
    np.testing.assert_allclose(store_field(restored, field), field.values, atol=float32_tolerance(field.values))


def test_missing_values_masked(unusual, tmp_path):
    path = unusual / "fields_with_missing_values.grib"
    fields = grib_fields(path)
    missing = [int(np.isnan(field.values).sum()) for field in fields]

    entry, store, restored = ingest_and_restore(
        [path], "missing", ("2017-10-18T00:00", "2017-10-18T00:00"), ("2017-10-18T12:00", "2017-10-18T12:00"), Catalog(tmp_path)
    )

    assert missing == [10808, 10891]
    assert entry.variables["t2m"].missing_values == sum(missing)
    assert entry.variables["t2m"].mask == "t2m_mask"
    assert store["t2m"].attrs["ancillary_variables"] == "t2m_mask"
    assert store["t2m_mask"].dtype == bool
    assert entry.statistics["t2m"].count == [91 * 180 - missing[0]]
    for field in fields:
        stored = store_field(restored, field)
        mask = store_field(store, field.__class__(**{**field.__dict__, "variable": "t2m_mask"}))
        np.testing.assert_array_equal(np.isnan(stored), np.isnan(field.values))
        np.testing.assert_array_equal(mask, np.isnan(field.values))
        np.testing.assert_allclose(stored, field.values, atol=float32_tolerance(field.values))


# --- time gaps ----------------------------------------------------------------------------

# Messages 100 (2019-03-05T04:00) and 300 to 302 (2019-03-13T12:00 to 14:00) removed.
GAPPY_INDICES = [*range(0, 100), *range(101, 300), *range(303, 744)]


def test_time_gaps_listed_in_error(uk_t2m_grib, tmp_path):
    gappy = write_grib_messages(uk_t2m_grib, tmp_path / "gappy.grib", GAPPY_INDICES)

    with pytest.raises(InvalidSourceError, match="not regular: the step is 1 h, but 2 interval") as raised:
        ingest_era5([gappy], "gappy", UK_TRAIN, UK_TEST, catalog=Catalog(tmp_path / "home"))

    message = str(raised.value)
    assert str(gappy) in message
    assert "2019-03-05T03:00:00 to 2019-03-05T05:00:00 (1 step(s) missing)" in message
    assert "2019-03-13T11:00:00 to 2019-03-13T15:00:00 (3 step(s) missing)" in message
    assert "on_time_gaps='keep'" in message
    assert_nothing_written(tmp_path / "home", "gappy")


def test_time_gaps_kept_and_windows_skip_them(uk_t2m_grib, tmp_path):
    gappy = write_grib_messages(uk_t2m_grib, tmp_path / "gappy.grib", GAPPY_INDICES)
    catalog = Catalog(tmp_path / "home")

    entry, store, _ = ingest_and_restore([gappy], "gappy", UK_TRAIN, UK_TEST, catalog, on_time_gaps="keep")
    windows = WindowDataset(store, ["t2m"], UK_TRAIN, (12, 8, 8), random_crop=False)

    assert store.sizes["time"] == 740
    assert entry.time_step.total_seconds() == 3600
    assert [(str(before), str(after)) for before, after in entry.time_gaps] == [
        ("2019-03-05 03:00:00", "2019-03-05 05:00:00"),
        ("2019-03-13 11:00:00", "2019-03-13 15:00:00"),
    ]
    assert store.attrs["time_gaps"] == [
        ["2019-03-05T03:00:00", "2019-03-05T05:00:00"],
        ["2019-03-13T11:00:00", "2019-03-13T15:00:00"],
    ]
    # Runs of 100, 199 and 273 hourly steps in the train period hold 89 + 188 + 262 windows of 12 steps.
    assert len(windows) == 89 + 188 + 262
    for index in range(len(windows)):
        assert np.all(np.diff(windows.window_times(index)) == np.timedelta64(1, "h"))


# --- ensemble members ---------------------------------------------------------------------


def test_members_kept_as_dimension(members_grib, tmp_path):
    entry, store, restored = ingest_and_restore([members_grib], "members", MEMBERS_TRAIN, MEMBERS_TEST, Catalog(tmp_path))

    assert store["t"].dims == ("time", "member", "level", "latitude", "longitude")
    assert entry.members == list(range(10))
    assert entry.levels == [500.0, 850.0]
    assert entry.time_step.total_seconds() == 12 * 3600
    for field in grib_fields(members_grib, {0, 57, 159}):
        stored = store_field(restored.sel(member=field.member), field, level=field.level)
        np.testing.assert_allclose(stored, field.values, atol=float32_tolerance(field.values))


def test_members_are_separate_samples(members_grib, tmp_path):
    _, store, _ = ingest_and_restore([members_grib], "members", MEMBERS_TRAIN, MEMBERS_TEST, Catalog(tmp_path))

    windows = WindowDataset(store, ["t"], MEMBERS_TRAIN, (1, 16, 32), levels={"t": [500]}, random_crop=False)

    assert len(windows) == 10 * 2
    for index in (0, 1, 2, 13, 19):
        member, window = divmod(index, 2)
        x, _ = windows[index]
        expected = store["t"].isel(time=window, member=member).sel(level=500.0).values[:16, :32]
        np.testing.assert_array_equal(x.numpy()[0, 0], expected)
