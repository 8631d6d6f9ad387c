"""Tests of the statistics and the normalise / denormalise pair, on synthetic and real ERA5 data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from data_catalog import Catalog
from tasks.ingest import ingest_era5
from tasks.normalise import (
    compute_statistics,
    denormalise,
    denormalise_array,
    merge_moments,
    normalise,
    open_statistics,
    statistics_attrs,
    statistics_dataset,
    summarise,
)

TRAIN = ("2020-01-01T00:00:00", "2020-01-01T15:00:00")
TIMES = pd.date_range("2020-01-01", periods=24, freq="h").values
LEVELS = np.array([500.0, 850.0, 1000.0])


def synthetic_dataset(seed: int = 0) -> xr.Dataset:
    """t2m [24, 5, 6] around 280 K, and t [24, 3, 5, 6] with a different mean and spread per level."""
    rng = np.random.default_rng(seed)
    t2m = (280.0 + 4.0 * rng.standard_normal((24, 5, 6))).astype(np.float32)
    level_mean = np.array([250.0, 275.0, 285.0])[None, :, None, None]
    level_spread = np.array([1.0, 3.0, 6.0])[None, :, None, None]
    t = (level_mean + level_spread * rng.standard_normal((24, 3, 5, 6))).astype(np.float32)
    return xr.Dataset(
        {
            "t2m": (("time", "latitude", "longitude"), t2m, {"units": "K"}),
            "t": (("time", "level", "latitude", "longitude"), t, {"units": "K"}),
        },
        coords={
            "time": TIMES,
            "level": LEVELS,
            "latitude": np.linspace(55.0, 54.0, 5),
            "longitude": np.linspace(0.0, 1.25, 6),
        },
    )


def float32_tolerance(values: np.ndarray) -> float:
    """Two float32 units in the last place of the largest magnitude in `values`."""
    return 2.0 * float(np.spacing(np.float32(np.abs(values).max())))


def test_statistics_known_values():
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0]).reshape(5, 1, 1)
    dataset = xr.Dataset(
        {"x": (("time", "latitude", "longitude"), values)},
        coords={"time": TIMES[:5], "latitude": [0.0], "longitude": [0.0]},
    )

    statistics = compute_statistics(dataset, (str(TIMES[0]), str(TIMES[3])))

    assert statistics["x"]["mean"] == [2.5]
    assert statistics["x"]["std"] == pytest.approx([np.sqrt(1.25)], rel=1e-15)


def test_statistics_per_level_match_numpy():
    dataset = synthetic_dataset()

    statistics = compute_statistics(dataset, TRAIN)

    train_t = dataset["t"].values[:16].astype(np.float64)
    assert len(statistics["t"]["mean"]) == 3
    np.testing.assert_allclose(statistics["t"]["mean"], train_t.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(statistics["t"]["std"], train_t.std(axis=(0, 2, 3)), rtol=1e-12)
    train_t2m = dataset["t2m"].values[:16].astype(np.float64)
    assert statistics["t2m"]["mean"] == pytest.approx([train_t2m.mean()], rel=1e-12)
    assert statistics["t2m"]["std"] == pytest.approx([train_t2m.std()], rel=1e-12)


def test_statistics_exclude_values_outside_period():
    dataset = synthetic_dataset()
    altered = dataset.copy(deep=True)
    altered["t2m"][16:] = 1.0e6

    assert compute_statistics(altered, TRAIN) == compute_statistics(dataset, TRAIN)


def test_statistics_dask_equals_numpy():
    dataset = synthetic_dataset()

    from_numpy = compute_statistics(dataset, TRAIN)
    from_dask = compute_statistics(dataset.chunk({"time": 5}), TRAIN)

    for variable in from_numpy:
        np.testing.assert_allclose(from_dask[variable]["mean"], from_numpy[variable]["mean"], rtol=1e-12)
        np.testing.assert_allclose(from_dask[variable]["std"], from_numpy[variable]["std"], rtol=1e-12)


def test_statistics_empty_period_rejected():
    with pytest.raises(ValueError, match="selects no time step"):
        compute_statistics(synthetic_dataset(), ("2021-01-01", "2021-01-02"))


def test_statistics_constant_field_rejected():
    dataset = synthetic_dataset()
    dataset["t2m"][:] = 273.15

    with pytest.raises(ValueError, match="'t2m' has standard deviation 0.0"):
        compute_statistics(dataset, TRAIN)


def test_normalise_train_period_standardised():
    dataset = synthetic_dataset()
    statistics = compute_statistics(dataset, TRAIN)

    normalised = normalise(dataset, statistics)
    train = normalised.sel(time=slice(*TRAIN))

    assert normalised["t"].dtype == np.float32
    assert normalised["t"].attrs == {"units": "K"}
    np.testing.assert_allclose(train["t"].mean(dim=["time", "latitude", "longitude"]), 0.0, atol=1e-5)
    np.testing.assert_allclose(train["t"].std(dim=["time", "latitude", "longitude"]), 1.0, rtol=1e-5)
    assert float(train["t2m"].mean()) == pytest.approx(0.0, abs=1e-5)


def test_round_trip_synthetic():
    dataset = synthetic_dataset()
    statistics = compute_statistics(dataset, TRAIN)

    restored = denormalise(normalise(dataset, statistics), statistics)

    for variable in ("t2m", "t"):
        source = dataset[variable].values
        assert restored[variable].dtype == np.float32
        np.testing.assert_allclose(restored[variable].values, source, rtol=0, atol=float32_tolerance(source))


def test_round_trip_float64_stays_float64():
    dataset = synthetic_dataset().astype(np.float64)
    statistics = compute_statistics(dataset, TRAIN)

    restored = denormalise(normalise(dataset, statistics), statistics)

    assert restored["t"].dtype == np.float64
    np.testing.assert_allclose(restored["t"].values, dataset["t"].values, rtol=1e-12)


def test_denormalise_array_matches_dataset():
    dataset = synthetic_dataset()
    statistics = compute_statistics(dataset, TRAIN)
    normalised = normalise(dataset, statistics)

    level_850 = denormalise_array(normalised["t"].values[:, 1], statistics, "t", level_index=1)
    surface = denormalise_array(normalised["t2m"].values, statistics, "t2m")

    np.testing.assert_allclose(level_850, dataset["t"].values[:, 1], rtol=0, atol=float32_tolerance(level_850))
    np.testing.assert_allclose(surface, dataset["t2m"].values, rtol=0, atol=float32_tolerance(surface))
    assert surface.dtype == np.float32


def test_denormalise_array_level_index_checks():
    statistics = {"t": {"mean": [250.0, 275.0], "std": [1.0, 3.0]}}

    with pytest.raises(ValueError, match="pass level_index"):
        denormalise_array(np.zeros(3), statistics, "t")
    with pytest.raises(IndexError, match="level_index 2"):
        denormalise_array(np.zeros(3), statistics, "t", level_index=2)
    with pytest.raises(KeyError, match="'q'"):
        denormalise_array(np.zeros(3), statistics, "q")


def test_normalise_level_count_mismatch():
    dataset = synthetic_dataset()
    statistics = compute_statistics(dataset, TRAIN)

    with pytest.raises(ValueError, match="2 levels but its statistics have 3 values"):
        normalise(dataset.isel(level=[0, 1]), statistics)
    with pytest.raises(ValueError, match="no 'level' dimension"):
        normalise(dataset.isel(level=0), statistics)


def test_round_trip_real_grib(uk_t2m_grib, tmp_path):
    catalog = Catalog(tmp_path)
    ingest_era5(
        [uk_t2m_grib],
        "era5-t2m-uk-2019-03",
        ("2019-03-01T00:00:00", "2019-03-24T23:00:00"),
        ("2019-03-25T00:00:00", "2019-03-31T23:00:00"),
        catalog=catalog,
    )
    stored = catalog.open_dataset("era5-t2m-uk-2019-03")
    direct = xr.open_dataset(uk_t2m_grib, engine="cfgrib", backend_kwargs={"indexpath": ""})

    restored = denormalise(stored, stored.attrs["statistics"])["t2m"].values
    source = direct["t2m"].values

    assert source.dtype == np.float32
    assert restored.shape == source.shape == (744, 33, 49)
    np.testing.assert_allclose(restored, source, rtol=0, atol=float32_tolerance(source))


# --- one-pass statistics: Chan's merge over dask chunks -----------------------------------


def test_merge_moments_matches_two_pass():
    rng = np.random.default_rng(1)
    values = rng.normal(5.0, 2.0, 1000)
    first, second = values[:137], values[137:]

    def moments(part: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.array(part.size), np.array(part.mean()), np.array(((part - part.mean()) ** 2).sum())

    count, mean, m2 = merge_moments(moments(first), moments(second))

    assert int(count) == 1000
    assert float(mean) == pytest.approx(values.mean(), rel=1e-14)
    assert float(m2) == pytest.approx(((values - values.mean()) ** 2).sum(), rel=1e-12)


def test_statistics_stable_with_large_offset():
    # Geopotential-like values: a spread of 0.5 on top of 1e9, where E[x^2] - E[x]^2 loses every digit.
    rng = np.random.default_rng(2)
    values = 1.0e9 + 0.5 * rng.standard_normal((48, 4, 5))
    dataset = xr.Dataset(
        {"z": (("time", "latitude", "longitude"), values)},
        coords={"time": pd.date_range("2020-01-01", periods=48, freq="h").values, "latitude": np.arange(4.0), "longitude": np.arange(5.0)},
    ).chunk({"time": 7})

    statistics = compute_statistics(dataset, ("2020-01-01", "2020-01-02T23:00"))

    naive = np.sqrt(np.mean(values**2) - np.mean(values) ** 2)
    assert abs(naive - values.std()) > 1e-3
    assert statistics["z"]["std"] == pytest.approx([values.std()], rel=1e-6)
    assert statistics["z"]["mean"] == pytest.approx([values.mean()], rel=1e-15)


def test_statistics_read_each_chunk_once():
    dataset = synthetic_dataset()
    calls = []

    def record(block: np.ndarray, block_info=None) -> np.ndarray:
        calls.append(block_info[0]["chunk-location"])
        return block

    counted = dataset["t"].copy(data=dataset["t"].chunk({"time": 5}).data.map_blocks(record, dtype=np.float32))
    summarise(dataset[["t"]].assign(t=counted), TRAIN, {"t": "local"})

    assert sorted(calls) == [(index, 0, 0, 0) for index in range(5)]


def test_statistics_count_and_missing_ignore_nan():
    dataset = synthetic_dataset()
    dataset["t"][0, 1, 0, :] = np.nan
    dataset["t"][20, 2, :, 0] = np.nan

    summary = summarise(dataset.chunk({"time": 7}), TRAIN)

    train = dataset["t"].values[:16].astype(np.float64)
    assert summary.statistics["t"]["count"] == [16 * 30, 16 * 30 - 6, 16 * 30]
    np.testing.assert_allclose(summary.statistics["t"]["mean"], np.nanmean(train, axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(summary.statistics["t"]["std"], np.nanstd(train, axis=(0, 2, 3)), rtol=1e-12)
    assert summary.missing == {"t2m": 0, "t": 6 + 5}


def test_level_without_values_kept_nan():
    dataset = synthetic_dataset()
    dataset["t"][:, 0] = np.nan

    statistics = compute_statistics(dataset, TRAIN)
    restored = denormalise(normalise(dataset, statistics), statistics)

    assert statistics["t"]["count"][0] == 0
    assert statistics["t"]["mean"][0] == 0.0
    assert statistics["t"]["std"][0] == 1.0
    assert np.isnan(restored["t"].values[:, 0]).all()


def test_level_with_values_only_outside_train_rejected():
    dataset = synthetic_dataset()
    dataset["t"][:16, 2] = np.nan

    with pytest.raises(ValueError, match="'t' has 240 valid values at level index 2, but none in the train period"):
        compute_statistics(dataset, TRAIN)


def test_unknown_scheme_rejected():
    with pytest.raises(ValueError, match="scheme 'regional' of variable 't'"):
        compute_statistics(synthetic_dataset(), TRAIN, {"t": "regional"})
    with pytest.raises(ValueError, match=r"names variables \['q'\]"):
        compute_statistics(synthetic_dataset(), TRAIN, {"q": "local"})


# --- the local scheme: per calendar month and grid point ----------------------------------


def two_month_dataset(seed: int = 3) -> xr.Dataset:
    """t [120, 2, 3, 4] every 12 h in January and February 2020, with a mean and spread per month, level and point."""
    rng = np.random.default_rng(seed)
    times = pd.date_range("2020-01-01", periods=120, freq="12h")
    months = times.month.to_numpy()[:, None, None, None]
    level_offset = np.array([220.0, 280.0])[None, :, None, None]
    point_offset = np.arange(12.0).reshape(1, 1, 3, 4)
    spread = 1.0 + point_offset / 4.0
    values = level_offset + 5.0 * months + point_offset + spread * rng.standard_normal((120, 2, 3, 4))
    return xr.Dataset(
        {"t": (("time", "level", "latitude", "longitude"), values.astype(np.float32), {"units": "K"})},
        coords={"time": times.values, "level": [500.0, 850.0], "latitude": [50.0, 49.0, 48.0], "longitude": [0.0, 1.0, 2.0, 3.0]},
    )


# 62 steps in January and 40 in February; the test period is 21 to 29 February.
LOCAL_TRAIN = ("2020-01-01T00:00", "2020-02-20T12:00")


def test_local_statistics_match_numpy():
    dataset = two_month_dataset()

    statistics = compute_statistics(dataset.chunk({"time": 11}), LOCAL_TRAIN, {"t": "local"})["t"]

    times = pd.DatetimeIndex(dataset["time"].values)
    values = dataset["t"].values.astype(np.float64)
    in_train = np.asarray(times <= pd.Timestamp(LOCAL_TRAIN[1]))
    assert statistics["scheme"] == "local"
    assert statistics["months"] == [1, 2]
    assert statistics["mean"].dims == ("month", "level", "latitude", "longitude")
    for position, month in enumerate((1, 2)):
        rows = in_train & (times.month == month)
        np.testing.assert_allclose(statistics["mean"].values[position], values[rows].mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(statistics["std"].values[position], values[rows].std(axis=0), rtol=1e-10)
        np.testing.assert_array_equal(statistics["count"].values[position], rows.sum())


def test_local_round_trip_and_standardised():
    dataset = two_month_dataset()
    statistics = compute_statistics(dataset, LOCAL_TRAIN, {"t": "local"})

    normalised = normalise(dataset.chunk({"time": 7}), statistics)
    restored = denormalise(normalised, statistics)

    train = normalised["t"].sel(time=slice(*LOCAL_TRAIN)).values.astype(np.float64)
    january = pd.DatetimeIndex(normalised["time"].sel(time=slice(*LOCAL_TRAIN)).values).month == 1
    np.testing.assert_allclose(train[january].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train[january].std(axis=0), 1.0, rtol=1e-5)
    source = dataset["t"].values
    assert restored["t"].dtype == np.float32
    np.testing.assert_allclose(restored["t"].values, source, rtol=0, atol=float32_tolerance(source))


def test_local_dask_equals_numpy():
    dataset = two_month_dataset()
    statistics = compute_statistics(dataset, LOCAL_TRAIN, {"t": "local"})

    eager = normalise(dataset, statistics)["t"].values
    lazy = normalise(dataset.chunk({"time": 13}), statistics)["t"].values

    np.testing.assert_array_equal(lazy, eager)


def test_local_month_without_training_rejected():
    dataset = two_month_dataset()

    with pytest.raises(ValueError, match=r"no value in calendar month\(s\) \[2\]"):
        compute_statistics(dataset, ("2020-01-01", "2020-01-31T12:00"), {"t": "local"})


def test_local_point_without_training_rejected():
    dataset = two_month_dataset()
    dataset["t"][62:102, 1, 2, 3] = np.nan

    with pytest.raises(ValueError, match="1 grid point.*month 2.*level 850.0, latitude 48.0, longitude 3.0"):
        compute_statistics(dataset, LOCAL_TRAIN, {"t": "local"})


def test_local_constant_point_rejected():
    dataset = two_month_dataset()
    dataset["t"][:, 0, 0, 0] = 250.0

    with pytest.raises(ValueError, match="standard deviation 0 at 1 grid point"):
        compute_statistics(dataset, LOCAL_TRAIN, {"t": "local"})


def test_local_statistics_serialised():
    dataset = two_month_dataset()
    statistics = compute_statistics(dataset, LOCAL_TRAIN, {"t": "local"})

    document = statistics_attrs(statistics)
    arrays = statistics_dataset(statistics)

    assert document["t"] == {"scheme": "local", "months": [1, 2], "count": [102 * 12, 102 * 12], "group": "statistics"}
    assert sorted(arrays.data_vars) == ["t_count", "t_mean", "t_std"]
    with pytest.raises(ValueError, match="open_statistics"):
        denormalise(dataset, document)
    with pytest.raises(ValueError, match="local scheme"):
        denormalise_array(np.zeros(3), statistics, "t", level_index=0)


# --- round trips of every scheme on real files ---------------------------------------------


def test_round_trip_real_grib_local(uk_t2m_grib, tmp_path):
    catalog = Catalog(tmp_path)
    result = ingest_era5(
        [uk_t2m_grib],
        "uk-local",
        ("2019-03-01T00:00:00", "2019-03-24T23:00:00"),
        ("2019-03-25T00:00:00", "2019-03-31T23:00:00"),
        catalog=catalog,
        normalisation={"t2m": "local"},
    )
    stored = catalog.open_dataset("uk-local")
    statistics = open_statistics(result.zarr_path)
    with xr.open_dataset(uk_t2m_grib, engine="cfgrib", backend_kwargs={"indexpath": ""}) as direct:
        source = direct["t2m"].values

    restored = denormalise(stored, statistics)["t2m"].values

    assert stored.attrs["statistics"]["t2m"] == {"scheme": "local", "months": [3], "count": [576 * 33 * 49], "group": "statistics"}
    assert statistics["t2m"]["mean"].dims == ("month", "latitude", "longitude")
    train = source[:576].astype(np.float64)
    np.testing.assert_allclose(statistics["t2m"]["mean"].values[0], train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(statistics["t2m"]["std"].values[0], train.std(axis=0), rtol=1e-10)
    np.testing.assert_allclose(restored, source, rtol=0, atol=float32_tolerance(source))


def test_round_trip_real_netcdf_mixed_schemes(data_mirror, tmp_path):
    folder = data_mirror / "era5" / "era5-pl-2020-01-01"
    files = [folder / "ERA5_2020-01-01_pl_u.nc", folder / "ERA5_2020-01-01_sp.nc", folder / "ERA5_2020-01-01_tp.nc"]
    catalog = Catalog(tmp_path)
    result = ingest_era5(
        files,
        "pl-mixed",
        ("2020-01-01T00:00:00", "2020-01-01T17:00:00"),
        ("2020-01-01T18:00:00", "2020-01-01T23:00:00"),
        catalog=catalog,
        normalisation={"u": "local", "sp": "local"},
    )
    statistics = open_statistics(result.zarr_path)

    restored = denormalise(catalog.open_dataset("pl-mixed"), statistics)

    assert [statistics[name]["scheme"] for name in ("u", "sp", "tp")] == ["local", "local", "global"]
    for path, variable in zip(files, ("u", "sp", "tp"), strict=True):
        with xr.open_dataset(path, engine="h5netcdf") as direct:
            source = direct[variable].sortby("latitude", ascending=False)
            if "level" in source.dims:
                source = source.sortby("level")
            source = source.values
        np.testing.assert_allclose(restored[variable].values, source, rtol=0, atol=float32_tolerance(source))


def test_round_trip_real_members_local(data_mirror, tmp_path):
    path = data_mirror / "era5" / "era5-levels-members.grib"
    catalog = Catalog(tmp_path)
    result = ingest_era5(
        [path],
        "members-local",
        ("2017-01-01T00:00:00", "2017-01-02T12:00:00"),
        None,
        catalog=catalog,
        normalisation={"t": "local", "z": "local"},
    )
    statistics = open_statistics(result.zarr_path)
    with xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""}) as direct:
        # The file's longitudes run 0 to 357, the store's -180 to 177 (the default convention).
        wrapped = direct["t"].assign_coords(longitude=(direct["longitude"] + 180.0) % 360.0 - 180.0)
        source = wrapped.sortby(["isobaricInhPa", "longitude"])
        source = source.transpose("time", "number", "isobaricInhPa", "latitude", "longitude").values

    restored = denormalise(catalog.open_dataset("members-local"), statistics)["t"]

    assert restored.dims == ("time", "member", "level", "latitude", "longitude")
    assert statistics["t"]["count"].values.max() == 4 * 10
    np.testing.assert_allclose(restored.values, source, rtol=0, atol=float32_tolerance(source))
