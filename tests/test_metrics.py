"""Hand-computed checks of the scores in tasks.metrics.

The 2 x 2 grid sits at latitudes 0 and 60 degrees, where cos(latitude) is 1 and 0.5.
Normalised to mean 1 the weights are 4/3 and 2/3.
"""

import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from tasks.metrics import (
    acc,
    bias,
    build_climatology,
    cell_area_weights,
    climatology_at,
    crps_ensemble,
    ensemble_spread,
    latitude_weights,
    mae,
    mse,
    power_spectrum,
    rmse,
    score_table,
    small_scale_power_ratio,
    spectrum_ratio,
    spread_skill_ratio,
)

LATITUDE = np.array([0.0, 60.0])
LONGITUDE = np.array([0.0, 1.0])


def grid(values) -> xr.DataArray:
    """Wrap a 2 x 2 array as a (latitude, longitude) field on the test grid."""
    return xr.DataArray(
        np.asarray(values, dtype=np.float64),
        dims=("latitude", "longitude"),
        coords={"latitude": LATITUDE, "longitude": LONGITUDE},
    )


@pytest.fixture
def weights() -> xr.DataArray:
    return latitude_weights(grid(np.zeros((2, 2))).latitude)


def test_latitude_weights_values(weights):
    np.testing.assert_allclose(weights.values, [4 / 3, 2 / 3], rtol=1e-12)
    assert weights.dims == ("latitude",)
    assert float(weights.mean()) == pytest.approx(1.0)


def test_latitude_weights_from_list():
    weights = latitude_weights([0.0, 60.0])
    np.testing.assert_allclose(weights.values, [4 / 3, 2 / 3], rtol=1e-12)
    np.testing.assert_array_equal(weights.latitude.values, [0.0, 60.0])


def test_latitude_weights_reject_out_of_range():
    with pytest.raises(ValueError, match="-90, 90"):
        latitude_weights([0.0, 95.0])


def test_rmse_weighted_grid(weights):
    # Squared errors 1, 9 at latitude 0 and 0, 4 at latitude 60:
    # (4/3 * 10 + 2/3 * 4) / (2 * 4/3 + 2 * 2/3) = 16 / 4 = 4, so RMSE = 2.
    truth = grid(np.zeros((2, 2)))
    prediction = grid([[1.0, -3.0], [0.0, -2.0]])
    assert float(rmse(prediction, truth, weights)) == pytest.approx(2.0, rel=1e-12)
    assert float(mse(prediction, truth, weights)) == pytest.approx(4.0, rel=1e-12)


def test_rmse_unweighted_grid():
    truth = grid(np.zeros((2, 2)))
    prediction = grid([[1.0, -3.0], [0.0, -2.0]])
    assert float(rmse(prediction, truth)) == pytest.approx(math.sqrt(14 / 4), rel=1e-12)


def test_mae_and_bias_weighted_grid(weights):
    # |e|: (4/3 * 4 + 2/3 * 2) / 4 = 5/3.  e: (4/3 * -2 + 2/3 * -2) / 4 = -1.
    truth = grid(np.zeros((2, 2)))
    prediction = grid([[1.0, -3.0], [0.0, -2.0]])
    assert float(mae(prediction, truth, weights)) == pytest.approx(5 / 3, rel=1e-12)
    assert float(bias(prediction, truth, weights)) == pytest.approx(-1.0, rel=1e-12)


def test_rmse_pools_samples_before_sqrt(weights):
    # Errors of 1 everywhere in one sample and 3 in the other: sqrt((1 + 9) / 2), not 2.
    truth = xr.concat([grid(np.zeros((2, 2)))] * 2, dim="sample")
    prediction = xr.concat([grid(np.ones((2, 2))), grid(np.full((2, 2), 3.0))], dim="sample")
    assert float(rmse(prediction, truth, weights)) == pytest.approx(math.sqrt(5.0), rel=1e-12)


def test_rmse_keeps_unreduced_dims(weights):
    truth = xr.concat([grid(np.zeros((2, 2)))] * 2, dim="lead_time")
    prediction = xr.concat(
        [grid([[1.0, -3.0], [0.0, -2.0]]), grid(np.full((2, 2), 0.5))], dim="lead_time"
    )
    scores = rmse(prediction, truth, weights, dims=("latitude", "longitude"))
    assert scores.dims == ("lead_time",)
    np.testing.assert_allclose(scores.values, [2.0, 0.5], rtol=1e-12)


def test_rmse_skips_missing_values(weights):
    # The NaN at (60, 1) drops its weight: (4/3 * 10 + 2/3 * 0) / (2 * 4/3 + 2/3) = 4.
    truth = grid(np.zeros((2, 2)))
    prediction = grid([[1.0, -3.0], [0.0, np.nan]])
    assert float(mse(prediction, truth, weights)) == pytest.approx(4.0, rel=1e-12)


def test_rmse_numpy_inputs():
    truth = np.zeros((2, 2))
    prediction = np.array([[1.0, -3.0], [0.0, -2.0]])
    column_weights = np.array([[4 / 3], [2 / 3]])
    assert float(rmse(prediction, truth, column_weights)) == pytest.approx(2.0, rel=1e-12)
    assert float(bias(prediction, truth, column_weights)) == pytest.approx(-1.0, rel=1e-12)
    assert float(mae(prediction, truth)) == pytest.approx(1.5, rel=1e-12)


def test_rmse_numpy_rejects_dims():
    with pytest.raises(ValueError, match="dims"):
        rmse(np.zeros(3), np.ones(3), dims="time")


def test_rmse_dataset_per_variable(weights):
    truth = xr.Dataset({"t2m": grid(np.zeros((2, 2))), "u10": grid(np.zeros((2, 2)))})
    prediction = xr.Dataset({"t2m": grid([[1.0, -3.0], [0.0, -2.0]]), "u10": grid(np.full((2, 2), 0.5))})
    scores = rmse(prediction, truth, weights, dims=("latitude", "longitude"))
    assert isinstance(scores, xr.Dataset)
    assert float(scores["t2m"]) == pytest.approx(2.0, rel=1e-12)
    assert float(scores["u10"]) == pytest.approx(0.5, rel=1e-12)


# --- cell area weights --------------------------------------------------------------------


def test_cell_area_weights_equal_cosine_off_poles():
    latitude = np.arange(58.0, 49.9, -0.25)
    np.testing.assert_allclose(cell_area_weights(latitude).values, latitude_weights(latitude).values, rtol=1e-9)


def test_cell_area_weights_with_poles():
    # Bands [-90, -45], [-45, 45], [45, 90]: areas 1 - sin 45, 2 sin 45, 1 - sin 45, total 2.
    weights = cell_area_weights([90.0, 0.0, -90.0])
    cap = (1 - math.sqrt(0.5)) / (2 / 3)
    np.testing.assert_allclose(weights.values, [cap, math.sqrt(2) / (2 / 3), cap], rtol=1e-12)
    assert float(weights.mean()) == pytest.approx(1.0)


# --- climatology --------------------------------------------------------------------------


def hourly_series(start: str, values, name: str = "t2m") -> xr.DataArray:
    """Wrap values of one grid point as an hourly series starting at `start`."""
    times = pd.date_range(start, periods=len(values), freq="h")
    return xr.DataArray(np.asarray(values, dtype=np.float64), dims="time", coords={"time": times}, name=name)


def test_hour_climatology_training_only():
    # Day 1: hour h has value h, day 2: h + 100, day 3 (outside training): 1e6.
    hours = np.arange(24.0)
    series = hourly_series("2019-03-01", np.concatenate([hours, hours + 100, np.full(24, 1e6)]))
    climatology = build_climatology(series, ("2019-03-01T00", "2019-03-02T23"))
    assert climatology.attrs["climatology_kind"] == "hour"
    assert climatology.dims == ("hour",)
    np.testing.assert_allclose(climatology.values, hours + 50)


def test_climatology_auto_chooses_dayofyear_for_two_years():
    times = pd.date_range("2017-01-01", "2018-12-31T18", freq="6h")
    series = xr.DataArray(np.where(times.year == 2017, 0.0, 2.0), dims="time", coords={"time": times})
    climatology = build_climatology(series, ("2017-01-01", "2018-12-31T18"))
    assert climatology.attrs["climatology_kind"] == "dayofyear_hour"
    assert climatology.dims == ("dayofyear", "hour")
    np.testing.assert_array_equal(climatology["hour"].values, [0, 6, 12, 18])
    # Every window contains as many 2017 days as 2018 days, so every mean is 1.
    np.testing.assert_allclose(climatology.values, 1.0)


def test_dayofyear_climatology_window():
    # Daily values 1, 2, 6 at 00 UTC on 1 to 3 January, window +-1 day, wrapping the year.
    times = pd.date_range("2019-01-01", periods=3, freq="D")
    series = xr.DataArray([1.0, 2.0, 6.0], dims="time", coords={"time": times})
    climatology = build_climatology(
        series, ("2019-01-01", "2019-01-03"), kind="dayofyear_hour", window_days=1
    ).sel(hour=0)
    assert float(climatology.sel(dayofyear=1)) == pytest.approx(1.5)
    assert float(climatology.sel(dayofyear=2)) == pytest.approx(3.0)
    assert float(climatology.sel(dayofyear=3)) == pytest.approx(4.0)
    assert float(climatology.sel(dayofyear=4)) == pytest.approx(6.0)
    assert float(climatology.sel(dayofyear=366)) == pytest.approx(1.0)
    assert np.isnan(float(climatology.sel(dayofyear=5)))


def test_climatology_rejects_empty_period():
    series = hourly_series("2019-03-01", np.zeros(24))
    with pytest.raises(ValueError, match="selects no time step"):
        build_climatology(series, ("2020-01-01", "2020-01-02"))


def test_climatology_at_valid_time_dims():
    hours = np.arange(24.0)
    climatology = build_climatology(hourly_series("2019-03-01", hours * 10), ("2019-03-01", "2019-03-01T23"))
    valid_time = xr.DataArray(
        np.array([["2019-03-25T01", "2019-03-25T02"], ["2019-03-26T23", "2019-03-27T00"]], dtype="datetime64[ns]"),
        dims=("sample", "lead_time"),
    )
    values = climatology_at(climatology, valid_time)
    assert values.dims == ("sample", "lead_time")
    np.testing.assert_allclose(values.values, [[10.0, 20.0], [230.0, 0.0]])


def test_climatology_at_missing_hour():
    times = pd.date_range("2019-03-01", periods=4, freq="6h")
    climatology = build_climatology(
        xr.DataArray(np.zeros(4), dims="time", coords={"time": times}), ("2019-03-01", "2019-03-01T18")
    )
    with pytest.raises(ValueError, match=r"no value at hours \[3\]"):
        climatology_at(climatology, ["2019-03-25T03"])


# --- anomaly correlation ------------------------------------------------------------------


def test_acc_uncentred_hand_case(weights):
    # sum w a b / sum w = 1/3, sum w a^2 / sum w = 2/3, sum w b^2 / sum w = 1/2.
    climatology = grid(np.full((2, 2), 280.0))
    prediction = climatology + grid([[1.0, 1.0], [0.0, 0.0]])
    truth = climatology + grid([[1.0, 0.0], [0.0, 1.0]])
    assert float(acc(prediction, truth, climatology, weights)) == pytest.approx(1 / math.sqrt(3), rel=1e-12)


def test_acc_centred_hand_case(weights):
    # Weighted means 2/3 and 1/2 removed: the anomalies no longer co-vary.
    climatology = grid(np.zeros((2, 2)))
    prediction = grid([[1.0, 1.0], [0.0, 0.0]])
    truth = grid([[1.0, 0.0], [0.0, 1.0]])
    assert float(acc(prediction, truth, climatology, weights, centred=True)) == pytest.approx(0.0, abs=1e-12)


def test_acc_averages_per_field(weights):
    climatology = grid(np.zeros((2, 2)))
    truth = xr.concat([grid([[1.0, 0.0], [0.0, 1.0]])] * 2, dim="time")
    prediction = xr.concat([grid([[1.0, 1.0], [0.0, 0.0]]), grid([[2.0, 0.0], [0.0, 2.0]])], dim="time")
    per_field = acc(prediction, truth, climatology, weights)
    np.testing.assert_allclose(per_field.values, [1 / math.sqrt(3), 1.0], rtol=1e-12)
    mean = acc(prediction, truth, climatology, weights, sample_dims="time")
    assert float(mean) == pytest.approx((1 / math.sqrt(3) + 1) / 2, rel=1e-12)


def test_acc_zero_anomaly_is_nan(weights):
    climatology = grid(np.ones((2, 2)))
    assert np.isnan(float(acc(climatology, grid(np.zeros((2, 2))), climatology, weights)))


# --- ensemble scores ----------------------------------------------------------------------


def ensemble(values) -> xr.DataArray:
    """Wrap [M] or [M, N] values as members on dims (member, point)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    return xr.DataArray(array, dims=("member", "point"))


def test_crps_fair_two_members():
    # mean |x - y| = 1, pair sum 4: fair 1 - 4 / (2 * 2 * 1) = 0, empirical 1 - 4 / 8 = 0.5.
    members = ensemble([0.0, 2.0])
    truth = xr.DataArray([1.0], dims="point")
    assert float(crps_ensemble(members, truth)) == pytest.approx(0.0, abs=1e-12)
    assert float(crps_ensemble(members, truth, fair=False)) == pytest.approx(0.5, rel=1e-12)


def test_crps_three_members_matches_cdf_integral():
    # Members 1, 2, 4 and truth 0. The empirical CRPS, the integral of (F - H)^2, is
    # 1 * 1 + 1 * (2/3)^2 + 2 * (1/3)^2 = 5/3. The fair one: 7/3 - 12 / (2 * 3 * 2) = 4/3.
    members = ensemble([1.0, 2.0, 4.0])
    truth = xr.DataArray([0.0], dims="point")
    assert float(crps_ensemble(members, truth, fair=False)) == pytest.approx(5 / 3, rel=1e-12)
    assert float(crps_ensemble(members, truth)) == pytest.approx(4 / 3, rel=1e-12)


def test_crps_sorted_pairs_match_all_pairs():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(7, 50))
    truth_values = rng.normal(size=50)
    pair_sum = np.abs(values[:, None, :] - values[None, :, :]).sum(axis=(0, 1))
    expected = np.abs(values - truth_values).mean(axis=0) - pair_sum / (2 * 7 * 6)
    result = crps_ensemble(ensemble(values), xr.DataArray(truth_values, dims="point"), dims=[])
    np.testing.assert_allclose(result.values, expected, rtol=1e-12)


def test_crps_latitude_weighted(weights):
    # Members {0, 2} against 1 score 0 at latitude 0. Members {0, 0} against 1 score 1 at 60.
    member_values = np.zeros((2, 2, 2))
    member_values[1, 0, :] = 2.0
    members = xr.DataArray(
        member_values,
        dims=("member", "latitude", "longitude"),
        coords={"latitude": LATITUDE, "longitude": LONGITUDE},
    )
    truth = grid(np.ones((2, 2)))
    assert float(crps_ensemble(members, truth, weights=weights)) == pytest.approx(1 / 3, rel=1e-12)


def test_crps_fair_rejects_one_member():
    with pytest.raises(ValueError, match="at least 2 ensemble members"):
        crps_ensemble(ensemble([[1.0]]), xr.DataArray([0.0], dims="point"))


def test_spread_skill_ratio_hand_case():
    # Members 0, 2 against 3: mean 1, squared error 4, s^2 = 2, spread^2 = 3/2 * 2 = 3.
    members = ensemble([0.0, 2.0])
    truth = xr.DataArray([3.0], dims="point")
    assert float(ensemble_spread(members)) == pytest.approx(math.sqrt(2), rel=1e-12)
    assert float(spread_skill_ratio(members, truth)) == pytest.approx(math.sqrt(3) / 2, rel=1e-12)


def test_spread_skill_ratio_reliable_ensemble():
    # Truth drawn like a sixth member: the ratio is 1 up to sampling noise (about 0.5 %).
    rng = np.random.default_rng(1)
    centre = rng.normal(size=40_000)
    members = ensemble(centre + rng.normal(size=(5, 40_000)))
    truth = xr.DataArray(centre + rng.normal(size=40_000), dims="point")
    assert float(spread_skill_ratio(members, truth)) == pytest.approx(1.0, abs=0.02)


# --- power spectra ------------------------------------------------------------------------


def zonal_lines(values) -> xr.DataArray:
    """Wrap [rows, n] values as lines along longitude on a 0.25 degree grid."""
    array = np.atleast_2d(np.asarray(values, dtype=np.float64))
    longitude = np.arange(array.shape[-1]) * 0.25
    return xr.DataArray(array, dims=("latitude", "longitude"), coords={"longitude": longitude})


def test_power_spectrum_of_cosine():
    # Amplitude 2 at 3 cycles over 16 points: P_3 = 2^2 / 2 = 2, nothing elsewhere.
    points = np.arange(16)
    spectrum = power_spectrum(zonal_lines(2 * np.cos(2 * np.pi * 3 * points / 16)), detrend="none")
    expected = np.zeros(8)
    expected[2] = 2.0
    np.testing.assert_allclose(spectrum.values, expected, atol=1e-12)
    np.testing.assert_array_equal(spectrum["wavenumber"].values, np.arange(1, 9))
    assert float(spectrum["wavelength"].sel(wavenumber=4)) == pytest.approx(1.0)


def test_power_spectrum_sums_to_variance():
    rng = np.random.default_rng(2)
    lines = rng.normal(size=(3, 15))
    spectrum = power_spectrum(zonal_lines(lines), dims=[], detrend="none")
    np.testing.assert_allclose(spectrum.sum("wavenumber").values, lines.var(axis=1), rtol=1e-12)
    even = rng.normal(size=(3, 16))
    spectrum = power_spectrum(zonal_lines(even), dims=[], detrend="none")
    np.testing.assert_allclose(spectrum.sum("wavenumber").values, even.var(axis=1), rtol=1e-12)


def test_power_spectrum_endpoints_remove_ramp():
    spectrum = power_spectrum(zonal_lines(280.0 + 0.5 * np.arange(12)))
    np.testing.assert_allclose(spectrum.values, 0.0, atol=1e-20)


def test_power_spectrum_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        power_spectrum(zonal_lines([1.0, np.nan, 2.0, 3.0]))


def test_spectrum_ratio_of_halved_field():
    rng = np.random.default_rng(3)
    truth = zonal_lines(rng.normal(size=(4, 20)))
    ratio = spectrum_ratio(truth * 0.5, truth)
    np.testing.assert_allclose(ratio.values, 0.25, rtol=1e-12)
    assert float(small_scale_power_ratio(truth * 0.5, truth)) == pytest.approx(0.25, rel=1e-12)


def test_small_scale_ratio_without_small_scales():
    # Truth: waves at 2 and 7 cycles over 16 points (K = 8, small scales k > 4).
    # The prediction keeps only the large wave.
    points = np.arange(16)
    large = np.cos(2 * np.pi * 2 * points / 16)
    small = 0.5 * np.cos(2 * np.pi * 7 * points / 16)
    ratio = spectrum_ratio(zonal_lines(large), zonal_lines(large + small), detrend="none")
    assert float(ratio.sel(wavenumber=2)) == pytest.approx(1.0, rel=1e-12)
    assert float(ratio.sel(wavenumber=7)) == pytest.approx(0.0, abs=1e-12)
    small_scale_share = small_scale_power_ratio(zonal_lines(large), zonal_lines(large + small), detrend="none")
    assert float(small_scale_share) == pytest.approx(0.0, abs=1e-12)


# --- score tables -------------------------------------------------------------------------


def test_score_table_dims_and_values(weights):
    truth_field = grid(np.zeros((2, 2)))
    truth = xr.Dataset({"t2m": xr.concat([truth_field] * 2, dim="lead_time").assign_coords(lead_time=[1, 3])})
    prediction = xr.Dataset(
        {
            "t2m": xr.concat([grid([[1.0, -3.0], [0.0, -2.0]]), grid(np.full((2, 2), 0.5))], dim="lead_time")
            .assign_coords(lead_time=[1, 3])
        }
    )
    table = score_table(prediction, truth, weights, dims=("latitude", "longitude"))
    assert table["t2m"].dims == ("metric", "lead_time")
    assert table["metric"].values.tolist() == ["rmse", "mae", "bias"]
    np.testing.assert_allclose(table["t2m"].sel(metric="rmse").values, [2.0, 0.5], rtol=1e-12)
    np.testing.assert_allclose(table["t2m"].sel(metric="mae").values, [5 / 3, 0.5], rtol=1e-12)
    np.testing.assert_allclose(table["t2m"].sel(metric="bias").values, [-1.0, 0.5], rtol=1e-12)


def test_score_table_ensemble():
    members = ensemble([0.0, 2.0]).rename("t2m")
    truth = xr.DataArray([3.0], dims="point", name="t2m")
    table = score_table(members, truth, scores=("rmse", "crps", "spread_skill_ratio"), member_dim="member")
    # Ensemble mean 1 against 3 gives RMSE 2. The fair CRPS is 2 - 4 / 4 = 1.
    np.testing.assert_allclose(table["t2m"].values, [2.0, 1.0, math.sqrt(3) / 2], rtol=1e-12)


def test_score_table_rejects_unknown_score():
    with pytest.raises(ValueError, match="unknown scores"):
        score_table(grid(np.zeros((2, 2))).rename("t2m"), grid(np.zeros((2, 2))).rename("t2m"), scores=("rsme",))


def test_power_spectrum_dataset_per_variable():
    points = np.arange(16)
    fields = xr.Dataset(
        {
            "t2m": zonal_lines(2 * np.cos(2 * np.pi * 3 * points / 16)),
            "u10": zonal_lines(np.cos(2 * np.pi * 5 * points / 16)),
        }
    )
    spectra = power_spectrum(fields, detrend="none")
    assert float(spectra["t2m"].sel(wavenumber=3)) == pytest.approx(2.0, rel=1e-12)
    assert float(spectra["u10"].sel(wavenumber=5)) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        power_spectrum(fields.where(fields["t2m"] > 1.9), detrend="none")


def test_crps_dataset_per_variable():
    # t2m: members 0, 2 against 1 give 0. u10: members 1, 3 against 0 give 2 - 4 / 4 = 1.
    members = xr.Dataset({"t2m": ensemble([0.0, 2.0]), "u10": ensemble([1.0, 3.0])})
    truth = xr.Dataset({"t2m": xr.DataArray([1.0], dims="point"), "u10": xr.DataArray([0.0], dims="point")})
    scores = crps_ensemble(members, truth)
    assert float(scores["t2m"]) == pytest.approx(0.0, abs=1e-12)
    assert float(scores["u10"]) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="no member dimension 'number'"):
        crps_ensemble(members, truth, member_dim="number")


def test_climatology_rejects_overlapping_window():
    series = hourly_series("2019-03-01", np.zeros(24))
    with pytest.raises(ValueError, match="window_days"):
        build_climatology(series, ("2019-03-01", "2019-03-01T23"), kind="dayofyear_hour", window_days=183)
