"""Verification scores: area-weighted errors, ACC, ensemble CRPS and spread, spectra.

Each score is one function whose docstring gives its formula. Scores are meant for
fields in physical units, after denormalising. They take `xarray.DataArray` or
`xarray.Dataset` inputs (a Dataset is scored per data variable, so each variable and
level keeps its own score) and return the same type, reduced over named dimensions and
keeping the others (``lead_time``, ``level``, a gap length). RMSE, MAE and bias also take
numpy arrays, reduced over all axes.

Weighting. A value's weight is the weight of its latitude, ``latitude_weights``: cos(lat)
normalised to mean 1. On a regular latitude-longitude grid this is exactly proportional
to the area of a grid cell away from the poles (see `cell_area_weights` for grids that
contain a pole). Every other reduced dimension (samples, time steps, longitude) counts
each position equally. For a squared error ``e[s, t, i, j]`` over samples ``s``, time
steps ``t``, latitudes ``i`` and longitudes ``j``::

    mse  = sum_{s,t,i,j} w[i] * e[s,t,i,j] / sum_{s,t,i,j} w[i]
    rmse = sqrt(mse)

So RMSE is the square root of the pooled weighted mean squared error, not the mean of
per-sample RMSEs. Missing values (NaN) are skipped and their weights leave the
denominator.

Contents:

- weights: `latitude_weights`, `cell_area_weights`
- deterministic errors: `mse`, `rmse`, `mae`, `bias`
- climatology and ACC: `build_climatology`, `climatology_at`, `acc`
- ensembles: `crps_ensemble` (fair by default), `ensemble_spread`, `spread_skill_ratio`
- spectra for downscaling: `power_spectrum`, `spectrum_ratio`, `small_scale_power_ratio`
- `score_table`: several scores of Datasets gathered along a ``metric`` dimension
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Literal, TypeVar

import numpy as np
import pandas as pd
import xarray as xr

ArrayT = TypeVar("ArrayT", xr.DataArray, xr.Dataset, np.ndarray)
XarrayT = TypeVar("XarrayT", xr.DataArray, xr.Dataset)
Dims = Hashable | Iterable[Hashable] | None

# Hours of day and days of year (day 366 exists in leap years) that a climatology can hold.
HOURS_PER_DAY = 24
DAYS_PER_YEAR = 366
CLIMATOLOGY_KINDS = ("hour", "dayofyear_hour")
DETRENDS = ("endpoints", "mean", "none")


# --- weights ------------------------------------------------------------------------------


def _latitude_degrees(latitude: xr.DataArray | np.ndarray | Iterable[float]) -> xr.DataArray:
    """Check a 1-D latitude coordinate in degrees and return it as a float64 DataArray."""
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
    return degrees


def latitude_weights(latitude: xr.DataArray | np.ndarray | Iterable[float]) -> xr.DataArray:
    """Return cos(latitude) weights normalised to mean 1 over the given latitudes.

    ``w[i] = cos(lat[i]) / mean_k cos(lat[k])`` with latitude in degrees. Weighting by
    cos(latitude) makes each point count in proportion to the area of its cell on a
    regular latitude-longitude grid. The result is a DataArray on the dimension
    ``latitude`` (or the input's own dimension when it is a DataArray), so it broadcasts
    against fields by name.
    """
    degrees = _latitude_degrees(latitude)
    cosine = np.cos(np.deg2rad(degrees))
    mean_cosine = float(cosine.mean())
    if mean_cosine <= 0:
        raise ValueError("latitude weights are all zero: the latitudes are only the poles")
    return (cosine / mean_cosine).rename("latitude_weights")


def cell_area_weights(latitude: xr.DataArray | np.ndarray | Iterable[float]) -> xr.DataArray:
    """Return the area of each latitude band's grid cell, normalised to mean 1.

    A cell spans from halfway to the previous latitude to halfway to the next one, and
    the first and last cells extend by half of their neighbour spacing, clipped to
    [-90, 90]. Its area on the unit sphere per radian of longitude is
    ``sin(upper) - sin(lower)``. Away from the poles this is ``2 sin(d/2) cos(lat)`` for
    spacing ``d``, so on a regular grid the weights equal `latitude_weights`. A grid that
    contains a pole gives the polar cap a positive weight, where cos(latitude) gives 0.
    A single latitude gets weight 1.
    """
    degrees = _latitude_degrees(latitude)
    if degrees.size == 1:
        return xr.ones_like(degrees).rename("cell_area_weights")

    order = np.argsort(degrees.values)
    ascending = degrees.values[order]
    if np.any(np.diff(ascending) == 0):
        raise ValueError(f"latitude contains repeated values: {degrees.values}. Pass distinct latitudes")
    midpoints = (ascending[:-1] + ascending[1:]) / 2
    first = ascending[0] - (ascending[1] - ascending[0]) / 2
    last = ascending[-1] + (ascending[-1] - ascending[-2]) / 2
    bounds = np.clip(np.concatenate([[first], midpoints, [last]]), -90.0, 90.0)

    band_area = np.sin(np.deg2rad(bounds[1:])) - np.sin(np.deg2rad(bounds[:-1]))
    area = np.empty_like(band_area)
    area[order] = band_area
    return degrees.copy(data=area / area.mean()).rename("cell_area_weights")


# --- deterministic errors -----------------------------------------------------------------


def _weighted_mean(values: ArrayT, weights: xr.DataArray | np.ndarray | None, dims: Dims) -> ArrayT:
    """Return sum(w * values) / sum(w) over ``dims`` (all dims when None), skipping NaN."""
    if isinstance(values, (xr.DataArray, xr.Dataset)):
        if weights is None:
            return values.mean(dim=dims, skipna=True)
        if not isinstance(weights, xr.DataArray):
            raise TypeError(
                "weights must be an xarray.DataArray with named dims when the fields are "
                f"xarray objects, got {type(weights).__name__}"
            )
        return values.weighted(weights).mean(dim=dims, skipna=True)

    if dims is not None:
        raise ValueError(
            "dims can only be given for xarray inputs: numpy arrays are reduced over all axes"
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


def mse(prediction: ArrayT, truth: ArrayT, weights: xr.DataArray | np.ndarray | None = None, dims: Dims = None) -> ArrayT:
    """Return the weighted mean squared error ``sum w (p - t)^2 / sum w`` over ``dims``.

    Units are the square of the field's units. ``weights`` are usually
    `latitude_weights`, and None weights every value equally. ``dims=None`` reduces
    every dimension.
    """
    return _weighted_mean((prediction - truth) ** 2, weights, dims)


def rmse(prediction: ArrayT, truth: ArrayT, weights: xr.DataArray | np.ndarray | None = None, dims: Dims = None) -> ArrayT:
    """Return the weighted root mean squared error ``sqrt(sum w (p - t)^2 / sum w)``.

    The squared errors of all samples, time steps and grid points in ``dims`` are pooled
    before the square root (see the module docstring). Units are the field's units.
    """
    return np.sqrt(mse(prediction, truth, weights, dims))


def mae(prediction: ArrayT, truth: ArrayT, weights: xr.DataArray | np.ndarray | None = None, dims: Dims = None) -> ArrayT:
    """Return the weighted mean absolute error ``sum w |p - t| / sum w`` over ``dims``."""
    return _weighted_mean(abs(prediction - truth), weights, dims)


def bias(prediction: ArrayT, truth: ArrayT, weights: xr.DataArray | np.ndarray | None = None, dims: Dims = None) -> ArrayT:
    """Return the weighted mean error ``sum w (p - t) / sum w``, positive when too high."""
    return _weighted_mean(prediction - truth, weights, dims)


# --- climatology and anomaly correlation --------------------------------------------------


def _training_slice(data: XarrayT, train_period: tuple, time_dim: str) -> XarrayT:
    """Select the inclusive training period of ``data`` along ``time_dim``."""
    if time_dim not in data.dims:
        raise ValueError(f"data has no time dimension {time_dim!r}, only {tuple(data.dims)}: pass time_dim")
    if not np.issubdtype(data[time_dim].dtype, np.datetime64):
        raise ValueError(f"time coordinate {time_dim!r} must hold datetime64 values, got {data[time_dim].dtype}")
    if len(train_period) != 2:
        raise ValueError(f"train_period must be a (start, end) pair, got {train_period!r}")

    start, end = (pd.Timestamp(bound) for bound in train_period)
    times = pd.DatetimeIndex(data[time_dim].values)
    in_train = np.asarray((times >= start) & (times <= end))
    if not in_train.any():
        raise ValueError(
            f"train period {start} .. {end} selects no time step from data covering "
            f"{times.min()} .. {times.max()}"
        )
    return data.isel({time_dim: in_train})


def _choose_climatology_kind(times: pd.DatetimeIndex, min_years: int) -> str:
    """Apply the "auto" rule of `build_climatology` to the training times."""
    n_days = times.normalize().nunique()
    return "dayofyear_hour" if n_days >= min_years * 365 else "hour"


def _hour_climatology(train: XarrayT, time_dim: str) -> XarrayT:
    hour = train[time_dim].dt.hour.rename("hour")
    return train.groupby(hour).mean(time_dim, skipna=True)


def _dayofyear_hour_climatology(train: XarrayT, time_dim: str, window_days: int) -> XarrayT:
    """Mean by (day of year, hour) over a circular window of +-window_days days."""
    times = pd.DatetimeIndex(train[time_dim].values)
    hours_present = np.unique(np.asarray(times.hour))
    hour_index = np.searchsorted(hours_present, np.asarray(times.hour))
    slot = xr.DataArray(
        (np.asarray(times.day_of_year) - 1) * hours_present.size + hour_index, dims=time_dim, name="slot"
    )
    all_slots = np.arange(DAYS_PER_YEAR * hours_present.size)
    sums = train.fillna(0).groupby(slot).sum(time_dim).reindex(slot=all_slots, fill_value=0)
    counts = train.notnull().groupby(slot).sum(time_dim).reindex(slot=all_slots, fill_value=0)

    # Unstack the slot index into dayofyear (1..366) by the hours of day present.
    index = pd.MultiIndex.from_product(
        [np.arange(1, DAYS_PER_YEAR + 1), hours_present], names=["dayofyear", "hour"]
    )
    coordinates = xr.Coordinates.from_pandas_multiindex(index, "slot")
    sums = sums.assign_coords(coordinates).unstack("slot")
    counts = counts.assign_coords(coordinates).unstack("slot")

    # Sum each (day, hour) over the days within the window, which wraps around the year end.
    shifts = range(-window_days, window_days + 1)
    window_sums = sum(sums.roll(dayofyear=shift, roll_coords=False) for shift in shifts)
    window_counts = sum(counts.roll(dayofyear=shift, roll_coords=False) for shift in shifts)
    climatology = window_sums / window_counts.where(window_counts > 0)
    return climatology.transpose("dayofyear", "hour", ...)


def build_climatology(
    data: XarrayT,
    train_period: tuple,
    *,
    time_dim: str = "time",
    kind: Literal["auto", "hour", "dayofyear_hour"] = "auto",
    window_days: int = 15,
    min_years: int = 2,
) -> XarrayT:
    """Compute the mean state of ``data`` over its training period, by time of day and year.

    data: DataArray or Dataset with a datetime64 dimension ``time_dim``, normalised or in
    physical units (the climatology has the same units). train_period: inclusive
    ``(start, end)`` pair of times, as in a dataset's ``train_period`` attribute. Times
    are taken as UTC.

    kind:

    - ``"hour"``: ``c[h] = mean of the training steps at hour of day h``, with dims
      ``(hour, ...)`` and only the hours that occur in the training period.
    - ``"dayofyear_hour"``: ``c[d, h] = mean of the training steps at hour h whose day of
      year lies within window_days days of d``, with dims ``(dayofyear, hour, ...)`` and
      ``dayofyear`` 1..366. The window wraps around the end of the year, so the default 15
      gives a 31-day running mean that smooths out single weather events. A (day, hour)
      with no training value in its window is NaN.
    - ``"auto"``: ``"dayofyear_hour"`` when the training period covers at least
      ``min_years * 365`` distinct calendar days, otherwise ``"hour"``. With shorter
      training periods most days of the year have no training value at all, and the others
      a mean of a few days, which is weather rather than climate.

    NaN values are skipped. The result carries attrs ``climatology_kind``,
    ``train_period`` and, for day of year, ``window_days``. It is computed in memory, and
    a day-of-year climatology contains 366 x (hours per day) fields per variable.
    """
    if kind not in ("auto", *CLIMATOLOGY_KINDS):
        raise ValueError(f"kind must be 'auto', 'hour' or 'dayofyear_hour', got {kind!r}")
    max_window_days = (DAYS_PER_YEAR - 1) // 2
    if window_days < 0 or window_days > max_window_days:
        raise ValueError(f"window_days must lie in [0, {max_window_days}] so no day counts twice, got {window_days}")
    if min_years < 1:
        raise ValueError(f"min_years must be at least 1, got {min_years}")

    train = _training_slice(data, train_period, time_dim)
    times = pd.DatetimeIndex(train[time_dim].values)
    if kind == "auto":
        kind = _choose_climatology_kind(times, min_years)

    if kind == "hour":
        climatology = _hour_climatology(train, time_dim)
    else:
        # NOTE: day of year counts from 1 January, so after 28 February a leap year is one
        # day ahead of other years. The running window keeps the effect small.
        climatology = _dayofyear_hour_climatology(train, time_dim, window_days)

    climatology.attrs = {
        **data.attrs,
        "climatology_kind": kind,
        "train_period": [times.min().isoformat(), times.max().isoformat()],
    }
    if kind == "dayofyear_hour":
        climatology.attrs["window_days"] = window_days
    return climatology


def climatology_at(climatology: XarrayT, valid_time: xr.DataArray | np.ndarray | Sequence) -> XarrayT:
    """Look up climatology values at the given valid times.

    climatology: output of `build_climatology`, with dims ``(hour, ...)`` or
    ``(dayofyear, hour, ...)``. valid_time: a datetime64 DataArray of any dims (for
    example ``(sample, lead_time)``), or a 1-D sequence of times, which becomes the dim
    ``valid_time``. Returns the climatology with ``hour`` (and ``dayofyear``) replaced by
    the dims of ``valid_time``. Raises ValueError when a valid time falls at an hour of
    day that the training period never had.
    """
    if "hour" not in climatology.dims:
        raise ValueError(
            f"climatology must have an 'hour' dimension, got dims {tuple(climatology.dims)}: "
            "build it with build_climatology"
        )
    if isinstance(valid_time, xr.DataArray):
        times = valid_time
    else:
        values = pd.DatetimeIndex(np.atleast_1d(np.asarray(valid_time)))
        times = xr.DataArray(values, dims="valid_time", coords={"valid_time": values})
    if not np.issubdtype(times.dtype, np.datetime64):
        raise ValueError(f"valid_time must hold datetime64 values, got {times.dtype}")

    hour = times.dt.hour
    missing_hours = sorted(set(np.unique(hour.values).tolist()) - set(climatology["hour"].values.tolist()))
    if missing_hours:
        raise ValueError(
            f"climatology has no value at hours {missing_hours} (UTC): the training period "
            f"had only hours {climatology['hour'].values.tolist()}"
        )

    selection = {"hour": hour}
    if "dayofyear" in climatology.dims:
        selection["dayofyear"] = times.dt.dayofyear
    return climatology.sel(selection).drop_vars(list(selection), errors="ignore")


def acc(
    prediction: XarrayT,
    truth: XarrayT,
    climatology: XarrayT,
    weights: xr.DataArray | None = None,
    dims: Dims = ("latitude", "longitude"),
    sample_dims: Dims = None,
    centred: bool = False,
) -> XarrayT:
    """Compute the area-weighted anomaly correlation coefficient.

    climatology: values at the same valid times as ``truth`` (see `climatology_at`), in
    the same units. With anomalies ``a = prediction - climatology`` and
    ``b = truth - climatology``, each field (the values over ``dims``) gets::

        acc = sum w a b / sqrt(sum w a^2 * sum w b^2)

    This is the uncentred form, which WeatherBench 2 reports: a prediction that gets only
    the sign of the domain-mean anomaly right still scores. With ``centred=True`` the
    weighted means of ``a`` and ``b`` over ``dims`` are subtracted first, giving the
    weighted Pearson correlation of the anomalies. The per-field values are then averaged
    over ``sample_dims`` (None keeps one value per field), so every field counts equally.
    A point where either anomaly is NaN leaves both sums. A field whose anomaly is zero
    everywhere has an undefined ACC and gives NaN, which the average skips.
    """
    prediction_anomaly = prediction - climatology
    truth_anomaly = truth - climatology
    both_valid = prediction_anomaly.notnull() & truth_anomaly.notnull()
    prediction_anomaly = prediction_anomaly.where(both_valid)
    truth_anomaly = truth_anomaly.where(both_valid)

    if centred:
        prediction_anomaly = prediction_anomaly - _weighted_mean(prediction_anomaly, weights, dims)
        truth_anomaly = truth_anomaly - _weighted_mean(truth_anomaly, weights, dims)

    covariance = _weighted_mean(prediction_anomaly * truth_anomaly, weights, dims)
    variance_product = _weighted_mean(prediction_anomaly**2, weights, dims) * _weighted_mean(
        truth_anomaly**2, weights, dims
    )
    per_field = covariance / np.sqrt(variance_product.where(variance_product > 0))
    if sample_dims is None:
        return per_field
    return per_field.mean(dim=sample_dims, skipna=True)


# --- ensembles ----------------------------------------------------------------------------


def _check_members(members: XarrayT, truth: XarrayT | None, member_dim: str, min_members: int) -> int:
    """Check the member dimension and return the ensemble size M."""
    if member_dim not in members.dims:
        raise ValueError(
            f"members have no member dimension {member_dim!r}, only {tuple(members.dims)}: pass member_dim"
        )
    if truth is not None and member_dim in truth.dims:
        raise ValueError(f"truth must not have the member dimension {member_dim!r}")
    n_members = members.sizes[member_dim]
    if n_members < min_members:
        raise ValueError(f"this score needs at least {min_members} ensemble members, got {n_members}")
    return n_members


def _sorted_pair_sum(values: np.ndarray) -> np.ndarray:
    """Return sum_{i,j} |x_i - x_j| over the last axis via sorting: 2 sum_k (2k - M - 1) x_(k)."""
    n_members = values.shape[-1]
    ordered = np.sort(values, axis=-1)
    coefficients = 2 * np.arange(1, n_members + 1) - n_members - 1
    return 2 * (ordered * coefficients).sum(axis=-1)


def crps_ensemble(
    members: XarrayT,
    truth: XarrayT,
    member_dim: str = "member",
    fair: bool = True,
    weights: xr.DataArray | None = None,
    dims: Dims = None,
) -> XarrayT:
    """Compute the ensemble CRPS, area-weighted and averaged over ``dims``.

    members: fields with a dimension ``member_dim`` of size M; truth: the same fields
    without it. At each point, with members ``x_1 .. x_M`` and truth ``y``::

        crps = 1/M sum_i |x_i - y|  -  c * sum_{i,j} |x_i - x_j|

    with ``c = 1 / (2 M (M - 1))`` for the fair estimator (default, M >= 2), an unbiased
    estimate of the CRPS of the distribution the members are drawn from, or
    ``c = 1 / (2 M^2)`` for ``fair=False``, the CRPS of the members' empirical
    distribution. The pair sum is computed from the sorted members as
    ``2 sum_k (2k - M - 1) x_(k)``, in O(M log M) per point. Units are the field's units
    and the point values are then averaged like `mae`. A point with a NaN member or truth
    is skipped.
    """
    n_members = _check_members(members, truth, member_dim, min_members=2 if fair else 1)

    skill = abs(members - truth).mean(member_dim, skipna=False)
    pair_sum = xr.apply_ufunc(_sorted_pair_sum, members, input_core_dims=[[member_dim]])
    pair_weight = 1 / (2 * n_members * (n_members - 1)) if fair else 1 / (2 * n_members**2)
    return _weighted_mean(skill - pair_weight * pair_sum, weights, dims)


def ensemble_spread(
    members: XarrayT, member_dim: str = "member", weights: xr.DataArray | None = None, dims: Dims = None
) -> XarrayT:
    """Return ``sqrt(sum w s^2 / sum w)``, the pooled ensemble standard deviation.

    ``s^2 = 1/(M - 1) sum_i (x_i - mean)^2`` is the unbiased member variance at each
    point (M >= 2). The variance is pooled over ``dims`` before the square root, as RMSE
    pools squared errors. Units are the field's units.
    """
    _check_members(members, None, member_dim, min_members=2)
    variance = members.var(member_dim, ddof=1, skipna=False)
    return np.sqrt(_weighted_mean(variance, weights, dims))


def spread_skill_ratio(
    members: XarrayT,
    truth: XarrayT,
    member_dim: str = "member",
    weights: xr.DataArray | None = None,
    dims: Dims = None,
) -> XarrayT:
    """Compute the spread-skill ratio ``sqrt((M + 1) / M) * spread / rmse(ensemble mean)``.

    The spread is `ensemble_spread`, the square root of the pooled unbiased member
    variance. The RMSE is that of the ensemble mean against ``truth``, pooled over the
    same ``dims`` with the same weights. When the truth behaves like one more member drawn from the same
    distribution, ``E[(mean - y)^2] = (M + 1) / M * E[s^2]``, so the factor makes the
    ratio 1 for a reliable ensemble of any size M. Below 1 the ensemble is under-dispersive
    (too confident), above 1 over-dispersive.
    """
    n_members = _check_members(members, truth, member_dim, min_members=2)
    spread = ensemble_spread(members, member_dim, weights, dims)
    skill = rmse(members.mean(member_dim, skipna=False), truth, weights, dims)
    return np.sqrt((n_members + 1) / n_members) * spread / skill


# --- power spectra for downscaling --------------------------------------------------------


def _line_power(values: np.ndarray, detrend: str) -> np.ndarray:
    """Return the one-sided power P_1 .. P_{n//2} of each line along the last axis."""
    n_points = values.shape[-1]
    if detrend == "endpoints":
        ramp = np.linspace(0.0, 1.0, n_points)
        values = values - values[..., :1] - (values[..., -1:] - values[..., :1]) * ramp
    elif detrend == "mean":
        values = values - values.mean(axis=-1, keepdims=True)

    coefficients = np.fft.rfft(values, axis=-1)[..., 1 : n_points // 2 + 1]
    power = 2 * np.abs(coefficients) ** 2 / n_points**2
    if n_points % 2 == 0:
        # The Nyquist wavenumber has no mirror image in the two-sided spectrum.
        power[..., -1] /= 2
    return power


def _wavelength(field: XarrayT, dim: str, wavenumber: np.ndarray) -> np.ndarray | None:
    """Return wavelengths in the units of ``dim``'s coordinate when it is evenly spaced."""
    if dim not in field.coords:
        return None
    coordinate = np.asarray(field[dim].values, dtype=np.float64)
    steps = np.diff(coordinate)
    if not np.allclose(steps, steps[0]):
        return None
    return coordinate.size * abs(steps[0]) / wavenumber


def power_spectrum(
    field: XarrayT,
    dim: str = "longitude",
    dims: Dims = None,
    detrend: Literal["endpoints", "mean", "none"] = "endpoints",
) -> XarrayT:
    """Compute the 1-D power spectrum along ``dim`` (zonal by default), averaged over ``dims``.

    field: values in memory with no NaN. For each line ``f_0 .. f_{n-1}`` along ``dim``
    with ``F_k = sum_j f_j exp(-2 pi i j k / n)``::

        P_k = 2 |F_k|^2 / n^2  for 1 <= k < n/2,   P_{n/2} = |F_{n/2}|^2 / n^2  (n even)

    so ``sum_k P_k`` is the variance of the line, and a cosine of amplitude A at k cycles
    per line gives ``P_k = A^2 / 2``. Units are the square of the field's units. Returns
    the mean of the line spectra over ``dims`` (None: every other dim, so latitude rows
    count equally), on a new dim ``wavenumber`` (k = 1 .. n // 2 cycles per line) with a
    coordinate ``wavelength`` in the units of ``dim``'s coordinate when it is evenly
    spaced.

    detrend: ``"endpoints"`` (default) subtracts the straight line through the first and
    last value of each line. A limited-area line is not periodic, and without this the
    jump between its ends leaks power into every wavenumber. ``"mean"`` removes only the
    mean, and ``"none"`` suits periodic (global) lines.
    """
    if detrend not in DETRENDS:
        raise ValueError(f"detrend must be one of {DETRENDS}, got {detrend!r}")
    if dim not in field.dims:
        raise ValueError(f"field has no dimension {dim!r}, only {tuple(field.dims)}")
    n_points = field.sizes[dim]
    if n_points < 4:
        raise ValueError(f"a spectrum along {dim!r} needs at least 4 points, got {n_points}")
    missing = field.isnull().any()
    has_missing = any(bool(flag) for flag in missing.data_vars.values()) if isinstance(missing, xr.Dataset) else bool(missing)
    if has_missing:
        raise ValueError(f"field contains NaN: fill or crop missing values before computing a spectrum along {dim!r}")

    spectra = xr.apply_ufunc(
        _line_power,
        field,
        input_core_dims=[[dim]],
        output_core_dims=[["wavenumber"]],
        kwargs={"detrend": detrend},
        keep_attrs=False,
    )
    wavenumber = np.arange(1, n_points // 2 + 1)
    spectra = spectra.assign_coords(wavenumber=wavenumber)
    wavelength = _wavelength(field, dim, wavenumber)
    if wavelength is not None:
        spectra = spectra.assign_coords(wavelength=("wavenumber", wavelength))

    if dims is None:
        dims = [name for name in spectra.dims if name != "wavenumber"]
    return spectra.mean(dim=dims)


def spectrum_ratio(
    prediction: XarrayT,
    truth: XarrayT,
    dim: str = "longitude",
    dims: Dims = None,
    detrend: Literal["endpoints", "mean", "none"] = "endpoints",
) -> XarrayT:
    """Return ``P_prediction(k) / P_truth(k)``, the ratio of the averaged power spectra.

    Both spectra come from `power_spectrum` with the same arguments, and are averaged
    before the ratio is taken. Values below 1 mean the prediction has lost variance at
    that wavenumber, as smooth upsampling does at small scales.
    """
    return power_spectrum(prediction, dim, dims, detrend) / power_spectrum(truth, dim, dims, detrend)


def small_scale_power_ratio(
    prediction: XarrayT,
    truth: XarrayT,
    dim: str = "longitude",
    dims: Dims = None,
    detrend: Literal["endpoints", "mean", "none"] = "endpoints",
) -> XarrayT:
    """Return the share of the truth's small-scale variance that the prediction keeps.

    ``sum_{k > K/2} P_prediction(k) / sum_{k > K/2} P_truth(k)`` with K = n // 2 the
    largest wavenumber of `power_spectrum`: the upper half of the wavenumbers, whose
    wavelengths are shorter than 4 grid spacings. 1 keeps all of it, 0 none.
    """
    prediction_power = power_spectrum(prediction, dim, dims, detrend)
    truth_power = power_spectrum(truth, dim, dims, detrend)
    small_scales = prediction_power["wavenumber"] > prediction_power.sizes["wavenumber"] / 2
    return prediction_power.where(small_scales).sum("wavenumber") / truth_power.where(small_scales).sum("wavenumber")


# --- score tables -------------------------------------------------------------------------

DETERMINISTIC_SCORES: dict[str, Callable] = {"rmse": rmse, "mse": mse, "mae": mae, "bias": bias}
ENSEMBLE_SCORES: dict[str, Callable] = {"crps": crps_ensemble, "spread_skill_ratio": spread_skill_ratio}


def score_table(
    prediction: XarrayT,
    truth: XarrayT,
    weights: xr.DataArray | None = None,
    dims: Dims = None,
    scores: Sequence[str] = ("rmse", "mae", "bias"),
    member_dim: str | None = None,
) -> xr.Dataset:
    """Compute several scores and stack them along a new ``metric`` dimension.

    prediction, truth: Datasets (one data variable per field) or named DataArrays, in
    physical units. ``dims`` are reduced, and the others (``lead_time``, ``level``, a gap
    length) are kept. scores: names from ``rmse``, ``mse``, ``mae``, ``bias`` and, when
    ``member_dim`` names the prediction's ensemble dimension, ``crps`` (fair) and
    ``spread_skill_ratio``. With ``member_dim``, the deterministic scores are those of the
    ensemble mean. Returns a Dataset whose variables have dims ``(metric, <kept dims>)``.
    """
    unknown = [name for name in scores if name not in DETERMINISTIC_SCORES and name not in ENSEMBLE_SCORES]
    if unknown:
        raise ValueError(
            f"unknown scores {unknown}: choose from {sorted(DETERMINISTIC_SCORES) + sorted(ENSEMBLE_SCORES)}"
        )
    if member_dim is None and any(name in ENSEMBLE_SCORES for name in scores):
        raise ValueError(
            f"scores {[n for n in scores if n in ENSEMBLE_SCORES]} need an ensemble: pass member_dim, the "
            "name of the prediction's member dimension"
        )

    point_prediction = prediction if member_dim is None else prediction.mean(member_dim, skipna=False)
    results = []
    for name in scores:
        if name in DETERMINISTIC_SCORES:
            value = DETERMINISTIC_SCORES[name](point_prediction, truth, weights, dims)
        else:
            value = ENSEMBLE_SCORES[name](prediction, truth, member_dim, weights=weights, dims=dims)
        results.append(value.expand_dims(metric=[name]))
    table = xr.concat(results, dim="metric")
    if isinstance(table, xr.DataArray):
        if table.name is None:
            raise ValueError("a DataArray passed to score_table needs a name, which becomes its variable name")
        table = table.to_dataset()
    return table
