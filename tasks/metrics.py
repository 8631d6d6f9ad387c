"""Latitude-weighted verification scores: RMSE, MAE and bias.

Every score is a weighted mean over the reduced dimensions. The weight of a value is the
weight of its latitude (see `latitude_weights`), and every other reduced dimension
(samples, time steps, longitude) counts each position equally. For a squared error
``e[s, t, i, j]`` over samples ``s``, time steps ``t``, latitudes ``i`` and longitudes
``j``::

    mse  = sum_{s,t,i,j} w[i] * e[s,t,i,j] / sum_{s,t,i,j} w[i]
    rmse = sqrt(mse)

So RMSE is the square root of the pooled weighted mean squared error, not the mean of
per-sample RMSEs. Missing values (NaN) are skipped and their weights leave the
denominator.

The functions take `xarray.DataArray` inputs reduced over named dimensions, or numpy
arrays reduced over all axes with weights that broadcast against them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TypeVar

import numpy as np
import xarray as xr

ArrayT = TypeVar("ArrayT", xr.DataArray, np.ndarray)


def latitude_weights(latitude: xr.DataArray | np.ndarray | Iterable[float]) -> xr.DataArray:
    """Return cos(latitude) weights normalised to mean 1 over the given latitudes.

    ``w[i] = cos(lat[i]) / mean_k cos(lat[k])`` with latitude in degrees. Weighting by
    cos(latitude) makes each point count in proportion to the area of its cell on a
    regular latitude-longitude grid. The result is a DataArray on the dimension
    ``latitude`` (or the input's own dimension when it is a DataArray), so it broadcasts
    against fields by name.
    """
    if isinstance(latitude, xr.DataArray):
        if latitude.ndim != 1:
            raise ValueError(
                f"latitude must be one-dimensional, got dims {latitude.dims}: pass the "
                "latitude coordinate of the field"
            )
        degrees = latitude.astype(np.float64)
    else:
        values = np.asarray(latitude, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"latitude must be one-dimensional, got shape {values.shape}")
        degrees = xr.DataArray(values, dims="latitude", coords={"latitude": values})

    if degrees.size == 0:
        raise ValueError("latitude is empty: at least one latitude is needed for weights")
    if bool((np.abs(degrees) > 90).any()):
        raise ValueError(
            f"latitude values must lie in [-90, 90] degrees, got min {float(degrees.min())} "
            f"and max {float(degrees.max())}"
        )

    cosine = np.cos(np.deg2rad(degrees))
    mean_cosine = float(cosine.mean())
    if mean_cosine <= 0:
        raise ValueError("latitude weights are all zero: the latitudes are only the poles")
    return (cosine / mean_cosine).rename("latitude_weights")


def _weighted_mean(
    values: ArrayT,
    weights: xr.DataArray | np.ndarray | None,
    dims: Hashable | Iterable[Hashable] | None,
) -> ArrayT:
    """Return sum(w * values) / sum(w) over ``dims`` (all dims when None), skipping NaN."""
    if isinstance(values, xr.DataArray):
        if weights is None:
            return values.mean(dim=dims, skipna=True)
        if not isinstance(weights, xr.DataArray):
            raise TypeError(
                "weights must be an xarray.DataArray with named dims when the fields are "
                f"DataArrays, got {type(weights).__name__}"
            )
        return values.weighted(weights).mean(dim=dims, skipna=True)

    if dims is not None:
        raise ValueError(
            "dims can only be given for xarray.DataArray inputs: numpy arrays are reduced "
            "over all axes"
        )
    array = np.asarray(values, dtype=np.float64)
    if weights is None:
        return np.nanmean(array)
    broadcast_weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), array.shape)
    valid = ~np.isnan(array)
    total_weight = broadcast_weights[valid].sum()
    if total_weight == 0:
        return np.float64(np.nan)
    return (broadcast_weights[valid] * array[valid]).sum() / total_weight


def mse(
    prediction: ArrayT,
    truth: ArrayT,
    weights: xr.DataArray | np.ndarray | None = None,
    dims: Hashable | Iterable[Hashable] | None = None,
) -> ArrayT:
    """Return the weighted mean squared error ``sum w (p - t)^2 / sum w`` over ``dims``.

    Units are the square of the field's units. ``weights`` are usually
    `latitude_weights`, and None weights every value equally. ``dims=None`` reduces
    every dimension.
    """
    return _weighted_mean((prediction - truth) ** 2, weights, dims)


def rmse(
    prediction: ArrayT,
    truth: ArrayT,
    weights: xr.DataArray | np.ndarray | None = None,
    dims: Hashable | Iterable[Hashable] | None = None,
) -> ArrayT:
    """Return the weighted root mean squared error ``sqrt(sum w (p - t)^2 / sum w)``.

    The squared errors of all samples, time steps and grid points in ``dims`` are pooled
    before the square root (see the module docstring). Units are the field's units.
    """
    return np.sqrt(mse(prediction, truth, weights, dims))


def mae(
    prediction: ArrayT,
    truth: ArrayT,
    weights: xr.DataArray | np.ndarray | None = None,
    dims: Hashable | Iterable[Hashable] | None = None,
) -> ArrayT:
    """Return the weighted mean absolute error ``sum w |p - t| / sum w`` over ``dims``."""
    return _weighted_mean(abs(prediction - truth), weights, dims)


def bias(
    prediction: ArrayT,
    truth: ArrayT,
    weights: xr.DataArray | np.ndarray | None = None,
    dims: Hashable | Iterable[Hashable] | None = None,
) -> ArrayT:
    """Return the weighted mean error ``sum w (p - t) / sum w``, positive when too high."""
    return _weighted_mean(prediction - truth, weights, dims)
