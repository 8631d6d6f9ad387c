"""Tests of the statistics and the normalise / denormalise pair, on synthetic and real ERA5 data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from data_catalog import Catalog
from tasks.ingest import ingest_era5
from tasks.normalise import compute_statistics, denormalise, denormalise_array, normalise

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
