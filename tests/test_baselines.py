"""Hand-checkable cases for the reference predictions in tasks.baselines, and their
scores on the real UK 2 m temperature sample."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from tasks.baselines import (
    bicubic_upsampling,
    bilinear_upsampling,
    block_average,
    climatology_forecast,
    cubic_interpolation,
    linear_interpolation,
    persistence,
)
from tasks.metrics import build_climatology, latitude_weights, rmse, small_scale_power_ratio


def test_persistence_repeats_last_step():
    context = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    forecast = persistence(context, n_steps=4)
    assert forecast.shape == (2, 4, 2, 2)
    for step in range(4):
        np.testing.assert_array_equal(forecast[:, step], context[:, -1])


def test_persistence_rejects_zero_steps():
    with pytest.raises(ValueError, match="n_steps"):
        persistence(np.zeros((1, 2, 2)), n_steps=0)


def test_linear_interpolation_values():
    before = np.zeros((1, 2))
    after = np.full((1, 2), 3.0)
    hidden = linear_interpolation(before, after, n_hidden=2)
    assert hidden.shape == (2, 1, 2)
    np.testing.assert_allclose(hidden[:, 0, 0], [1.0, 2.0])


def test_linear_interpolation_reproduces_linear_field():
    # f(t, i, j) = 280 + 0.5 t + i - j on 6 steps: hiding steps 2 to 4 from steps 1 and 5.
    time = np.arange(6.0)[:, None, None]
    field = 280.0 + 0.5 * time + np.arange(3.0)[None, :, None] - np.arange(4.0)[None, None, :]
    hidden = linear_interpolation(field[1], field[5], n_hidden=3)
    np.testing.assert_allclose(hidden, field[2:5], rtol=0, atol=1e-12)


def test_linear_interpolation_leading_axes():
    before = np.zeros((2, 1, 2, 2))
    after = np.ones((2, 1, 2, 2))
    hidden = linear_interpolation(before, after, n_hidden=1)
    assert hidden.shape == (2, 1, 1, 2, 2)
    np.testing.assert_allclose(hidden, 0.5)


def test_linear_interpolation_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        linear_interpolation(np.zeros((2, 2)), np.zeros((2, 3)), n_hidden=1)


def test_block_average_values():
    field = np.arange(16.0).reshape(4, 4)
    np.testing.assert_allclose(block_average(field, 2), [[2.5, 4.5], [10.5, 12.5]])


def test_block_average_leading_axes():
    field = np.stack([np.zeros((4, 8)), np.ones((4, 8))])
    coarse = block_average(field, 4)
    assert coarse.shape == (2, 1, 2)
    np.testing.assert_allclose(coarse[1], 1.0)


def test_block_average_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="not divisible"):
        block_average(np.zeros((33, 49)), 4)


def test_bicubic_constant_field_exact():
    coarse = np.full((2, 3, 5), 281.25, dtype=np.float32)
    fine = bicubic_upsampling(coarse, 4)
    assert fine.shape == (2, 12, 20)
    assert fine.dtype == np.float32
    np.testing.assert_allclose(fine, 281.25, rtol=0, atol=1e-4)


def test_bicubic_aligns_block_centres():
    # A single interior spike is mirrored about the centre of its 4 x 4 block.
    coarse = np.zeros((5, 5))
    coarse[2, 2] = 1.0
    fine = bicubic_upsampling(coarse, 4)
    row = fine[9]
    np.testing.assert_allclose(row[8:12], row[8:12][::-1], atol=1e-12)
    np.testing.assert_allclose(fine[8:12, 10], fine[8:12, 10][::-1], atol=1e-12)
    assert row.argmax() in (9, 10)


def test_bicubic_keeps_interior_block_means_of_ramp():
    fine = np.add.outer(np.arange(24) * 0.5, np.arange(24) * 2.0)
    upsampled = bicubic_upsampling(block_average(fine, 4), 4)
    interior = (slice(8, 16), slice(8, 16))
    np.testing.assert_allclose(
        block_average(upsampled[interior], 4), block_average(fine[interior], 4), atol=1e-9
    )


def test_climatology_forecast_by_hour():
    times = pd.date_range("2019-03-01", periods=48, freq="h")
    values = np.concatenate([np.arange(24.0), np.arange(24.0) + 2])
    field = xr.DataArray(
        values[:, None, None] * np.ones((1, 2, 3)), dims=("time", "latitude", "longitude"), coords={"time": times}
    )
    climatology = build_climatology(field, ("2019-03-01", "2019-03-02T23"))
    forecast = climatology_forecast(climatology, pd.to_datetime(["2019-03-25T06", "2019-03-25T07"]))
    assert forecast.dims == ("valid_time", "latitude", "longitude")
    np.testing.assert_allclose(forecast.values[:, 0, 0], [7.0, 8.0])


def test_cubic_interpolation_reproduces_cubic():
    # f(t) = t^3 - 2 t + 280 with context at -1, 0 and 3, 4: the hidden 1, 2 are 279, 284.
    def field(t: float) -> np.ndarray:
        return np.full((2, 3), t**3 - 2 * t + 280.0)

    before = np.stack([field(-1), field(0)])
    after = np.stack([field(3), field(4)])
    hidden = cubic_interpolation(before, after, n_hidden=2)
    assert hidden.shape == (2, 2, 3)
    np.testing.assert_allclose(hidden[:, 0, 0], [279.0, 284.0], rtol=0, atol=1e-9)


def test_cubic_interpolation_longer_context():
    # A not-a-knot spline through 6 points of a cubic is that cubic.
    time = np.arange(-2, 7, dtype=np.float64)
    values = (0.1 * time**3 - time**2 + 3)[:, None, None] * np.ones((1, 2, 2))
    hidden = cubic_interpolation(values[:3], values[6:], n_hidden=3)
    np.testing.assert_allclose(hidden, values[3:6], rtol=0, atol=1e-9)


def test_cubic_interpolation_leading_axes():
    before = np.zeros((4, 1, 2, 2, 3), dtype=np.float32)
    hidden = cubic_interpolation(before, before + 1, n_hidden=3)
    assert hidden.shape == (4, 1, 3, 2, 3)
    assert hidden.dtype == np.float32


def test_cubic_interpolation_rejects_one_context_step():
    with pytest.raises(ValueError, match="at least 2 context steps"):
        cubic_interpolation(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), n_hidden=1)


def test_bilinear_constant_field_exact():
    fine = bilinear_upsampling(np.full((3, 5), 281.25, dtype=np.float32), 4)
    assert fine.shape == (12, 20)
    assert fine.dtype == np.float32
    np.testing.assert_allclose(fine, 281.25, rtol=0, atol=1e-4)


def test_bilinear_reproduces_ramp_between_block_centres():
    # Block averages of a linear field are its values at the block centres, and bilinear
    # interpolation between them is exact. Pixels 2 .. 21 lie between the first and last
    # centres (1.5 and 21.5). Outside them the edge value is repeated.
    fine = np.add.outer(np.arange(24) * 0.5, np.arange(24) * 2.0)
    upsampled = bilinear_upsampling(block_average(fine, 4), 4)
    np.testing.assert_allclose(upsampled[2:22, 2:22], fine[2:22, 2:22], rtol=0, atol=1e-9)
    np.testing.assert_allclose(upsampled[0, 2:22], upsampled[1, 2:22])


# --- reference scores on the real UK sample -----------------------------------------------

# ERA5 hourly 2 m temperature over the UK, March 2019: training before 25 March 00 UTC.
TRAIN_PERIOD = ("2019-03-01T00", "2019-03-24T23")
TEST_START = np.datetime64("2019-03-25T00", "ns")


@pytest.fixture(scope="module")
def uk_t2m(uk_t2m_grib) -> xr.DataArray:
    """The whole UK sample in kelvin as float64, dims (time, latitude, longitude)."""
    with xr.open_dataset(uk_t2m_grib, engine="cfgrib", backend_kwargs={"indexpath": ""}) as ds:
        return ds["t2m"].astype(np.float64).load()


def as_samples(values: np.ndarray, latitude: np.ndarray) -> xr.DataArray:
    """Wrap [N, S, H, W] values as (sample, step, latitude, longitude) for scoring."""
    return xr.DataArray(values, dims=("sample", "step", "latitude", "longitude"), coords={"latitude": latitude})


def score(prediction: np.ndarray, truth: np.ndarray, latitude: np.ndarray) -> float:
    """Pooled cos-latitude weighted RMSE in kelvin over every sample, step and point."""
    weights = latitude_weights(latitude)
    return float(rmse(as_samples(prediction, latitude), as_samples(truth, latitude), weights))


def test_uk_persistence_rmse(uk_t2m):
    # Every test-period valid time is scored at every lead, so the first initial times lie
    # in the training period.
    values = uk_t2m.values
    latitude = uk_t2m.latitude.values
    first_test = int(np.searchsorted(uk_t2m.time.values, TEST_START))
    for lead, expected in ((1, 0.58), (3, 1.56), (6, 2.68)):
        initial = np.arange(first_test - lead, len(values) - lead)
        forecast = persistence(values[initial][:, None], lead)[:, -1:]
        truth = values[initial + lead][:, None]
        assert score(forecast, truth, latitude) == pytest.approx(expected, abs=0.01), f"lead {lead} h"


def test_uk_climatology_rmse(uk_t2m):
    climatology = build_climatology(uk_t2m, TRAIN_PERIOD)
    assert climatology.attrs["climatology_kind"] == "hour"
    test = uk_t2m.sel(time=slice(TEST_START, None))
    forecast = climatology_forecast(climatology, test.time.values)
    rmse_kelvin = score(forecast.values[:, None], test.values[:, None], uk_t2m.latitude.values)
    assert rmse_kelvin == pytest.approx(1.80, abs=0.01)


def test_uk_interpolation_rmse(uk_t2m):
    # Every gap whose two bounding steps lie in the test period. The cubic spline also
    # uses one more step on each side, and the first gap's extra step lies in training.
    values = uk_t2m.values
    latitude = uk_t2m.latitude.values
    first_test = int(np.searchsorted(uk_t2m.time.values, TEST_START))
    for n_hidden, expected_linear in ((3, 0.39), (5, 0.63)):
        before = np.arange(first_test, len(values) - n_hidden - 2)
        after = before + n_hidden + 1
        truth = np.stack([values[before + step] for step in range(1, n_hidden + 1)], axis=1)

        linear = linear_interpolation(values[before], values[after], n_hidden)
        linear_rmse = score(linear, truth, latitude)
        assert linear_rmse == pytest.approx(expected_linear, abs=0.01), f"gap {n_hidden}"

        cubic = cubic_interpolation(
            np.stack([values[before - 1], values[before]], axis=1),
            np.stack([values[after], values[after + 1]], axis=1),
            n_hidden,
        )
        cubic_rmse = score(cubic, truth, latitude)
        assert cubic_rmse < 0.8 * linear_rmse, f"gap {n_hidden}: cubic {cubic_rmse:.3f}, linear {linear_rmse:.3f}"


def test_uk_downscaling_rmse(uk_t2m):
    # The 32 x 48 grid points at the north-west corner, 4 x 4 block averages, every test step.
    test = uk_t2m.sel(time=slice(TEST_START, None)).isel(latitude=slice(0, 32), longitude=slice(0, 48))
    latitude = test.latitude.values
    coarse = block_average(test.values, 4)

    bicubic = bicubic_upsampling(coarse, 4)
    bilinear = bilinear_upsampling(coarse, 4)
    bicubic_rmse = score(bicubic[:, None], test.values[:, None], latitude)
    bilinear_rmse = score(bilinear[:, None], test.values[:, None], latitude)
    assert bicubic_rmse == pytest.approx(0.67, abs=0.01)
    assert bicubic_rmse < bilinear_rmse

    # Upsampling from 1 degree blocks cannot restore wavelengths under 4 grid spacings
    # (1 degree): bicubic keeps about 1 % of their variance (0.010 measured).
    small_scale_share = float(small_scale_power_ratio(test.copy(data=bicubic), test))
    assert 0 < small_scale_share < 0.05
