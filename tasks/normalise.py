"""Per-variable, per-level standardisation `z = (x - mean) / std` and its inverse.

Statistics have the form `{variable: {"mean": [...], "std": [...]}}` with one value per
level (a single value for variables without a `level` dimension), in the variable's
physical units, listed in the order of the dataset's `level` coordinate. They come from
the training period only, so the test period never informs its own normalisation.

These are pure functions without I/O. Arithmetic runs in float64, and results keep the
input's floating precision, with float32 as the minimum.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import dask
import numpy as np
import xarray as xr

logger = logging.getLogger(__name__)

Statistics = Mapping[str, Mapping[str, Sequence[float]]]

LEVEL_DIM = "level"
TIME_DIM = "time"


def compute_statistics(ds: xr.Dataset, train_period: tuple[str, str]) -> dict[str, dict[str, list[float]]]:
    """Compute the mean and standard deviation of each data variable over `train_period`.

    `train_period` is an inclusive `(start, end)` pair of times. Values are reduced over
    time, latitude and longitude (and every other dimension but `level`) in float64,
    ignoring NaNs. The standard deviation is the population one (ddof=0). Dask-backed
    variables are reduced chunk by chunk in a single `dask.compute`.

    Raises ValueError when the period selects no time step, or when a variable has a
    standard deviation that is zero or NaN at some level (it cannot be normalised).
    """
    start, end = train_period
    train = ds.sel({TIME_DIM: slice(start, end)})
    if train.sizes[TIME_DIM] == 0:
        raise ValueError(
            f"train period {start} .. {end} selects no time step from data covering "
            f"{_time_label(ds, 0)} .. {_time_label(ds, -1)}"
        )

    reductions = {}
    for variable, values in train.data_vars.items():
        dims = [dim for dim in values.dims if dim != LEVEL_DIM]
        values64 = values.astype(np.float64)
        reductions[variable] = (values64.mean(dim=dims), values64.std(dim=dims))
    (computed,) = dask.compute(reductions)

    statistics = {}
    for variable, (mean, std) in computed.items():
        means = np.atleast_1d(mean.values).astype(float).tolist()
        stds = np.atleast_1d(std.values).astype(float).tolist()
        for index, value in enumerate(stds):
            if not np.isfinite(value) or value == 0.0:
                raise ValueError(
                    f"variable {variable!r} has standard deviation {value} at level index {index} over "
                    f"the train period {start} .. {end}, so it cannot be normalised. "
                    "Drop the variable or choose a longer train period."
                )
        statistics[variable] = {"mean": means, "std": stds}
        logger.debug("statistics of %s: mean %s, std %s", variable, means, stds)
    return statistics


def normalise(ds: xr.Dataset, statistics: Statistics) -> xr.Dataset:
    """Return `(x - mean) / std` for every data variable, keeping attrs and coordinates."""
    return ds.map(lambda values: _standardise(values, statistics, inverse=False), keep_attrs=True)


def denormalise(ds: xr.Dataset, statistics: Statistics) -> xr.Dataset:
    """Return `z * std + mean` for every data variable: the inverse of `normalise`."""
    return ds.map(lambda values: _standardise(values, statistics, inverse=True), keep_attrs=True)


def denormalise_array(
    values: np.ndarray,
    statistics: Statistics,
    variable: str,
    level_index: int | None = None,
) -> np.ndarray:
    """Return `values * std + mean` for one variable, at one level when it has several.

    `values` is any array of normalised values of `variable` (any shape). `level_index`
    picks the level's statistics, in the dataset's level order, and is required for
    variables with more than one level.
    """
    mean, std = _level_statistics(statistics, variable, level_index)
    values = np.asarray(values)
    dtype = np.result_type(values.dtype, np.float32)
    return (values.astype(np.float64) * std + mean).astype(dtype)


def _standardise(values: xr.DataArray, statistics: Statistics, *, inverse: bool) -> xr.DataArray:
    name = values.name
    mean, std = _broadcastable_statistics(values, statistics)
    dtype = np.result_type(values.dtype, np.float32)
    values64 = values.astype(np.float64)
    result = values64 * std + mean if inverse else (values64 - mean) / std
    result = result.astype(dtype)
    result.attrs = dict(values.attrs)
    result.name = name
    return result


def _broadcastable_statistics(values: xr.DataArray, statistics: Statistics) -> tuple[object, object]:
    """Return mean and std as scalars, or as DataArrays along `level` for multi-level variables."""
    entry = _variable_statistics(statistics, str(values.name))
    mean = np.asarray(entry["mean"], dtype=np.float64)
    std = np.asarray(entry["std"], dtype=np.float64)

    if LEVEL_DIM in values.dims:
        levels = values.sizes[LEVEL_DIM]
        if mean.size != levels:
            raise ValueError(
                f"variable {values.name!r} has {levels} levels but its statistics have {mean.size} values"
            )
        coords = {LEVEL_DIM: values[LEVEL_DIM]} if LEVEL_DIM in values.coords else None
        return (
            xr.DataArray(mean, dims=LEVEL_DIM, coords=coords),
            xr.DataArray(std, dims=LEVEL_DIM, coords=coords),
        )

    if mean.size != 1:
        raise ValueError(
            f"variable {values.name!r} has no {LEVEL_DIM!r} dimension but its statistics have "
            f"{mean.size} values. Select levels with .isel({LEVEL_DIM}=[...]) so the dimension is kept, "
            "or use denormalise_array with level_index"
        )
    return float(mean[0]), float(std[0])


def _level_statistics(statistics: Statistics, variable: str, level_index: int | None) -> tuple[float, float]:
    entry = _variable_statistics(statistics, variable)
    means, stds = entry["mean"], entry["std"]
    if level_index is None:
        if len(means) != 1:
            raise ValueError(
                f"variable {variable!r} has statistics for {len(means)} levels, so pass level_index"
            )
        return float(means[0]), float(stds[0])
    if not 0 <= level_index < len(means):
        raise IndexError(
            f"level_index {level_index} is out of range for variable {variable!r} with {len(means)} levels"
        )
    return float(means[level_index]), float(stds[level_index])


def _variable_statistics(statistics: Statistics, variable: str) -> Mapping[str, Sequence[float]]:
    try:
        return statistics[variable]
    except KeyError:
        raise KeyError(
            f"no statistics for variable {variable!r} (statistics cover: {', '.join(sorted(statistics))})"
        ) from None


def _time_label(ds: xr.Dataset, index: int) -> str:
    return str(np.datetime_as_string(ds[TIME_DIM].values[index], unit="s"))
