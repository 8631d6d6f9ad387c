"""Hand-computed checks of the latitude-weighted scores in tasks.metrics.

The 2 x 2 grid sits at latitudes 0 and 60 degrees, where cos(latitude) is 1 and 0.5.
Normalised to mean 1 the weights are 4/3 and 2/3.
"""

import math

import numpy as np
import pytest
import xarray as xr

from tasks.metrics import bias, latitude_weights, mae, mse, rmse

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
