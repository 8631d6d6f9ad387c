"""Standardisation `z = (x - mean) / std` and its inverse, with one of two schemes per variable.

- `global`: one mean and std per variable and level, pooled over time, ensemble members
  and grid points. Stored as `{"scheme": "global", "mean": [...], "std": [...], "count": [...]}`
  with one value per level, in the order of the dataset's `level` coordinate (a single
  value for variables without levels). A mapping without `scheme` is global too.
- `local`: one mean and std per calendar month, level and grid point, pooled over the
  years, days, hours and members of that month. In memory `mean`, `std` and `count` are DataArrays with dims `(month, [level,] latitude,
  longitude)`. In a Zarr store they are the arrays `<var>_mean`, `<var>_std` and
  `<var>_count` of the child group `statistics`, and the root attrs keep
  `{"scheme": "local", "months": [...], "count": [...], "group": "statistics"}`.

Statistics come from the training period only, so the test period never informs its own
normalisation. `summarise` computes them in one pass over the dask chunks. Each chunk
gives the count, mean and sum of squared deviations (M2) of its valid values. The partial
results are merged pairwise with Chan's parallel formula, written out in `merge_moments`.
NaN values are missing values, so they count nowhere and stay NaN after normalising.
Arithmetic runs in float64, and results keep the input's floating precision, with
float32 as the minimum. Boolean variables (missing-value masks) pass through unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import numpy as np
import pandas as pd
import xarray as xr

logger = logging.getLogger(__name__)

Statistics = Mapping[str, Mapping[str, Any]]
Scheme = Literal["global", "local"]
SCHEMES: tuple[str, ...] = ("global", "local")

TIME_DIM = "time"
MEMBER_DIM = "member"
LEVEL_DIM = "level"
LATITUDE_DIM = "latitude"
LONGITUDE_DIM = "longitude"
MONTH_DIM = "month"
# Dimension order the statistics code relies on; `member` and `level` are optional.
_ORDER = (TIME_DIM, MEMBER_DIM, LEVEL_DIM, LATITUDE_DIM, LONGITUDE_DIM)
STATISTICS_GROUP = "statistics"
_LOCAL_ARRAYS = ("mean", "std", "count")


@dataclass(frozen=True)
class Summary:
    """Training statistics of each variable, and its count of missing (NaN) values over the whole dataset."""

    statistics: dict[str, dict[str, Any]]
    missing: dict[str, int]


def compute_statistics(
    ds: xr.Dataset, train_period: tuple[str, str], schemes: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Compute each data variable's statistics over `train_period`; see `summarise`."""
    return summarise(ds, train_period, schemes).statistics


def summarise(ds: xr.Dataset, train_period: tuple[str, str], schemes: Mapping[str, str] | None = None) -> Summary:
    """Compute training statistics and missing-value counts of every data variable in one pass.

    `train_period` is an inclusive `(start, end)` pair of times. `schemes` maps variable
    names to "global" or "local" (default "global" for every variable). The standard
    deviation is the population one (ddof=0). Variables must have dims `time`,
    `latitude` and `longitude`, and may have `member` and `level`.

    A level (global) or a grid point in a month (local) without any valid value in the
    whole dataset gets mean 0 and std 1 (global) or NaN (local), because its values stay
    NaN whatever the statistics.

    Raises ValueError when the period selects no time step, or when a variable has a
    zero or non-finite standard deviation. It also raises when a variable has valid
    values where the training period has none: at a level, at a grid point in a month,
    or in a whole calendar month.
    """
    schemes = _check_schemes(ds, schemes)
    start, end = train_period
    times = pd.DatetimeIndex(ds[TIME_DIM].values)
    in_train = np.asarray((times >= pd.Timestamp(start)) & (times <= pd.Timestamp(end)))
    if not in_train.any():
        raise ValueError(
            f"train period {start} .. {end} selects no time step from data covering "
            f"{_time_label(ds, 0)} .. {_time_label(ds, -1)}"
        )
    month = np.asarray(times.month, dtype=np.int64)

    roots = {
        name: _moments_graph(_canonical_order(values), in_train, month, local=schemes[name] == "local")
        for name, values in ds.data_vars.items()
    }
    (computed,) = dask.compute(roots)

    statistics, missing = {}, {}
    for name, partial in computed.items():
        values = ds[name]
        if schemes[name] == "local":
            statistics[name], valid = _local_statistics(name, values, partial, (start, end))
        else:
            statistics[name], valid = _global_statistics(name, values, partial, (start, end))
        missing[name] = int(values.size - valid)
        logger.debug("statistics of %s (%s scheme), %d missing values", name, schemes[name], missing[name])
    return Summary(statistics=statistics, missing=missing)


# --- one pass over the chunks: per-chunk moments merged with Chan's formula ---------------


def _moments_graph(values: xr.DataArray, in_train: np.ndarray, month: np.ndarray, *, local: bool) -> object:
    """Build the dask.delayed tree that reduces `values` to its merged partial moments.

    values: (time, [member,] [level,] latitude, longitude), chunked along time only.
    """
    data = values.chunk({dim: -1 for dim in values.dims if dim != TIME_DIM}).data
    shape = _five_dimensional_shape(values)
    bounds = np.concatenate([[0], np.cumsum(data.chunks[0])])
    blocks = data.to_delayed().ravel()

    partials = [
        dask.delayed(_block_moments)(
            block, shape[1:], in_train[bounds[index] : bounds[index + 1]], month[bounds[index] : bounds[index + 1]], local
        )
        for index, block in enumerate(blocks)
    ]
    while len(partials) > 1:
        merged = [dask.delayed(_merge_partials)(partials[i], partials[i + 1]) for i in range(0, len(partials) - 1, 2)]
        if len(partials) % 2:
            merged.append(partials[-1])
        partials = merged
    return partials[0]


def _block_moments(
    block: np.ndarray, inner_shape: tuple[int, ...], in_train: np.ndarray, month: np.ndarray, local: bool
) -> dict[int, tuple[np.ndarray, ...]]:
    """Return `{key: (count, mean, m2, valid)}` of one time block.

    `count`, `mean` and `m2` cover the valid training values and `valid` counts the valid
    values at every time. Global: one key 0 with arrays [L]. Local: one key per calendar
    month with arrays [L, H, W].
    """
    # NOTE: a local partial consists of four float64 arrays [L, H, W] per month, so a 0.25° global
    # grid with 37 levels needs about 1.2 GB per partial, and the merge tree keeps several.
    values = block.reshape((block.shape[0], *inner_shape)).astype(np.float64)
    finite = np.isfinite(values)
    if not local:
        axes = (0, 1, 3, 4)
        return {0: (*_moments(values[in_train], finite[in_train], axes), finite.sum(axis=axes))}

    partial = {}
    for calendar_month in np.unique(month):
        rows = month == calendar_month
        train_rows = rows & in_train
        moments = _moments(values[train_rows], finite[train_rows], (0, 1))
        partial[int(calendar_month)] = (*moments, finite[rows].sum(axis=(0, 1)))
    return partial


def _moments(values: np.ndarray, finite: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Return count, mean and M2 (sum of squared deviations) of the finite values along `axes`."""
    count = finite.sum(axis=axes)
    total = np.where(finite, values, 0.0).sum(axis=axes)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    deviation = np.where(finite, values - np.expand_dims(mean, axes), 0.0)
    return count, mean, (deviation**2).sum(axis=axes)


def _merge_partials(first: dict, second: dict) -> dict:
    merged = dict(first)
    for key, (count, mean, m2, valid) in second.items():
        if key in merged:
            merged[key] = (*merge_moments(merged[key][:3], (count, mean, m2)), merged[key][3] + valid)
        else:
            merged[key] = (count, mean, m2, valid)
    return merged


def merge_moments(
    first: tuple[np.ndarray, np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge two `(count, mean, m2)` partial moments with Chan's parallel formula.

    With `n = n_a + n_b` and `d = mean_b - mean_a`: `mean = mean_a + d n_b / n` and
    `m2 = m2_a + m2_b + d^2 n_a n_b / n`. Elements with `n = 0` get mean 0 and M2 0.
    """
    count_a, mean_a, m2_a = first
    count_b, mean_b, m2_b = second
    count = count_a + count_b
    safe = np.maximum(count, 1)
    delta = mean_b - mean_a
    mean = np.where(count > 0, mean_a + delta * (count_b / safe), 0.0)
    m2 = m2_a + m2_b + np.where(count > 0, delta**2 * (count_a * count_b / safe), 0.0)
    return count, mean, m2


# --- from merged moments to statistics ----------------------------------------------------


def _global_statistics(
    name: str, values: xr.DataArray, partial: dict, period: tuple[str, str]
) -> tuple[dict[str, Any], int]:
    count, mean, m2, valid = partial[0]
    means, stds = [], []
    for index in range(count.size):
        if count[index] == 0:
            if valid[index] > 0:
                raise ValueError(
                    f"variable {name!r} has {int(valid[index])} valid values at level index {index}, but none in "
                    f"the train period {period[0]} .. {period[1]}, so it cannot be normalised. Choose a train "
                    "period where the level has data, or drop the level."
                )
            logger.warning(
                "variable %s has no valid value at level index %d, which stays NaN (mean 0 and std 1 are stored)",
                name, index,
            )
            means.append(0.0)
            stds.append(1.0)
            continue
        std = float(np.sqrt(m2[index] / count[index]))
        if not np.isfinite(std) or std == 0.0:
            raise ValueError(
                f"variable {name!r} has standard deviation {std} at level index {index} over "
                f"the train period {period[0]} .. {period[1]}, so it cannot be normalised. "
                "Drop the variable or choose a longer train period."
            )
        means.append(float(mean[index]))
        stds.append(std)

    statistics = {"scheme": "global", "mean": means, "std": stds, "count": [int(value) for value in count]}
    return statistics, int(valid.sum())


def _local_statistics(
    name: str, values: xr.DataArray, partial: dict, period: tuple[str, str]
) -> tuple[dict[str, Any], int]:
    months = sorted(key for key, moments in partial.items() if moments[0].sum() > 0)
    untrained = sorted(key for key, moments in partial.items() if moments[0].sum() == 0 and moments[3].sum() > 0)
    if untrained:
        raise ValueError(
            f"variable {name!r} uses local normalisation, but the train period {period[0]} .. {period[1]} has no "
            f"value in calendar month(s) {untrained}, which the data contain. Extend the train period to every "
            f"month of the data, or use normalisation={{{name!r}: 'global'}}."
        )

    counts, means, stds = [], [], []
    for calendar_month in months:
        count, mean, m2, valid = partial[calendar_month]
        unseen = (count == 0) & (valid > 0)
        if unseen.any():
            raise ValueError(
                f"variable {name!r} has values at {int(unseen.sum())} grid point(s) in month {calendar_month} "
                f"where the train period {period[0]} .. {period[1]} has none (first at "
                f"{_describe_point(values, np.argwhere(unseen)[0])}), so local normalisation cannot apply. "
                f"Use normalisation={{{name!r}: 'global'}}."
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            std = np.sqrt(m2 / count)
        flat = (count > 0) & ~(std > 0.0)
        if flat.any():
            raise ValueError(
                f"variable {name!r} has standard deviation 0 at {int(flat.sum())} grid point(s) in month "
                f"{calendar_month} over the train period {period[0]} .. {period[1]} (first at "
                f"{_describe_point(values, np.argwhere(flat)[0])}), so local normalisation cannot apply. "
                f"Use a longer train period or normalisation={{{name!r}: 'global'}}."
            )
        counts.append(count)
        means.append(np.where(count > 0, mean, np.nan))
        stds.append(np.where(count > 0, std, np.nan))

    dims, coords = _local_layout(values, months)
    shape = tuple(len(coords[dim]) for dim in dims)
    statistics = {
        "scheme": "local",
        "months": months,
        "mean": xr.DataArray(np.stack(means).reshape(shape), dims=dims, coords=coords),
        "std": xr.DataArray(np.stack(stds).reshape(shape), dims=dims, coords=coords),
        "count": xr.DataArray(np.stack(counts).reshape(shape).astype(np.int64), dims=dims, coords=coords),
    }
    valid = int(sum(moments[3].sum() for moments in partial.values()))
    return statistics, valid


def _local_layout(values: xr.DataArray, months: list[int]) -> tuple[tuple[str, ...], dict[str, object]]:
    dims = (MONTH_DIM, *(dim for dim in (LEVEL_DIM, LATITUDE_DIM, LONGITUDE_DIM) if dim in values.dims))
    coords = {MONTH_DIM: np.asarray(months, dtype=np.int64)}
    for dim in dims[1:]:
        coords[dim] = values[dim].values if dim in values.coords else np.arange(values.sizes[dim])
    return dims, coords


# --- normalising and denormalising ---------------------------------------------------------


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
    """Return `values * std + mean` for one globally normalised variable, at one level when it has several.

    `values` is any array of normalised values of `variable` (any shape). `level_index`
    picks the level's statistics, in the dataset's level order, and is required for
    variables with more than one level. Raises ValueError for a locally normalised
    variable, whose statistics depend on time and grid point: use `denormalise`.
    """
    mean, std = _level_statistics(statistics, variable, level_index)
    values = np.asarray(values)
    dtype = np.result_type(values.dtype, np.float32)
    return (values.astype(np.float64) * std + mean).astype(dtype)


def denormalise_window(
    values: np.ndarray,
    statistics: Statistics,
    channels: Sequence[tuple[str, int | None]],
    times: np.ndarray | None,
    latitude: np.ndarray,
    longitude: np.ndarray,
) -> np.ndarray:
    """Return normalised sample windows in float64 physical units, `z * std + mean`, channel by channel.

    values: [B, C, T, H, W] normalised values. channels: (variable, level index or None)
    of each of the C channels, the level index in the dataset's level order. times: [B, T]
    datetime64 valid times of each sample's steps. latitude [H] and longitude [W]: the
    coordinates of the samples' crop, which select the grid points of local statistics.

    A global channel uses its level's mean and std. A local channel uses, at each step and
    grid point, the statistics of the step's calendar month at that point. `times` may be
    None when every channel is global. Raises ValueError for a local channel without
    times or whose statistics lack a month of `times`, and KeyError for a crop outside
    the statistics' grid. Local statistics must be loaded (`open_statistics`).
    """
    values = np.asarray(values)
    if values.ndim != 5 or values.shape[1] != len(channels):
        raise ValueError(f"values must be [B, C, T, H, W] with C = {len(channels)} channels, got shape {values.shape}")
    result = np.empty(values.shape, dtype=np.float64)
    for index, (variable, level_index) in enumerate(channels):
        entry = _variable_statistics(statistics, variable)
        if _scheme(entry, variable) == "global":
            mean, std = _level_statistics(statistics, variable, level_index)
        else:
            mean, std = _local_window_statistics(entry, variable, level_index, times, latitude, longitude)
        result[:, index] = values[:, index].astype(np.float64) * std + mean
    return result


def _local_window_statistics(
    entry: Mapping[str, Any],
    variable: str,
    level_index: int | None,
    times: np.ndarray | None,
    latitude: np.ndarray,
    longitude: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Return mean and std [B, T, H, W] of a local channel for the steps `times` [B, T] on the crop's grid."""
    if times is None:
        raise ValueError(f"variable {variable!r} is normalised with the local scheme, so denormalising needs the times")
    mean, std = entry.get("mean"), entry.get("std")
    if not isinstance(mean, xr.DataArray) or not isinstance(std, xr.DataArray):
        raise ValueError(
            f"the local statistics of variable {variable!r} are not loaded: read them with "
            "tasks.normalise.open_statistics(path)"
        )
    times = np.asarray(times)
    positions = _month_positions(times.ravel(), mean[MONTH_DIM].values, variable).reshape(times.shape)
    arrays = []
    for statistic in (mean, std):
        if LEVEL_DIM in statistic.dims:
            if level_index is None and statistic.sizes[LEVEL_DIM] > 1:
                raise ValueError(f"variable {variable!r} has local statistics for several levels, so pass a level index")
            statistic = statistic.isel({LEVEL_DIM: level_index or 0})
        try:
            statistic = statistic.sel({LATITUDE_DIM: latitude, LONGITUDE_DIM: longitude})
        except KeyError as error:
            raise KeyError(
                f"the crop's grid is not part of the grid of the local statistics of variable {variable!r}: {error}"
            ) from None
        grid = statistic.transpose(MONTH_DIM, LATITUDE_DIM, LONGITUDE_DIM).values
        arrays.append(grid[positions])
    return arrays[0], arrays[1]


def dataset_statistics(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Return the statistics of a dataset written by `tasks.ingest`, with the arrays of its local entries loaded.

    Global statistics come from `ds.attrs["statistics"]`. Local ones are read from the
    `statistics` group of the Zarr store that `ds` was opened from (`ds.encoding["source"]`).
    """
    document = ds.attrs.get("statistics")
    if not isinstance(document, dict):
        raise ValueError(
            "dataset attrs have no 'statistics' mapping: use a dataset written by tasks.ingest, whose statistics "
            "are needed to denormalise"
        )
    statistics = {variable: dict(entry) for variable, entry in document.items()}
    if all(_scheme(entry, variable) == "global" for variable, entry in statistics.items()):
        return statistics
    source = ds.encoding.get("source")
    if source is None:
        raise ValueError(
            "the dataset has locally normalised variables, whose statistics arrays live in its Zarr store, but it "
            "was not opened from a store (no encoding['source']). Open it with xr.open_zarr or Catalog.open_dataset."
        )
    return open_statistics(source)


def _standardise(values: xr.DataArray, statistics: Statistics, *, inverse: bool) -> xr.DataArray:
    if values.dtype == bool:
        return values
    name = values.name
    entry = _variable_statistics(statistics, str(name))
    dtype = np.result_type(values.dtype, np.float32)
    if _scheme(entry, str(name)) == "local":
        result = _standardise_local(values, entry, dtype, inverse=inverse)
    else:
        mean, std = _broadcastable_statistics(values, entry)
        values64 = values.astype(np.float64)
        result = (values64 * std + mean if inverse else (values64 - mean) / std).astype(dtype)
    result.attrs = dict(values.attrs)
    result.name = name
    return result


def _standardise_local(values: xr.DataArray, entry: Mapping[str, Any], dtype: np.dtype, *, inverse: bool) -> xr.DataArray:
    """Apply the statistics of each time step's calendar month, grid point and level, one time block at a time."""
    name = str(values.name)
    mean, std = entry.get("mean"), entry.get("std")
    if not isinstance(mean, xr.DataArray) or not isinstance(std, xr.DataArray):
        raise ValueError(
            f"variable {name!r} is normalised with the local scheme, whose statistics are arrays in the "
            f"{STATISTICS_GROUP!r} group of the Zarr store. Load them with tasks.normalise.open_statistics(path)."
        )
    original_dims = values.dims
    values = _canonical_order(values)
    _check_local_grid(name, values, mean)
    month_values = mean[MONTH_DIM].values
    mean_array, std_array = mean.values, std.values
    member_axis = MEMBER_DIM in values.dims

    def transform(block: xr.DataArray) -> xr.DataArray:
        positions = _month_positions(block[TIME_DIM].values, month_values, name)
        block_mean, block_std = mean_array[positions], std_array[positions]
        if member_axis:
            block_mean, block_std = block_mean[:, None], block_std[:, None]
        data = block.values.astype(np.float64)
        data = data * block_std + block_mean if inverse else (data - block_mean) / block_std
        return block.copy(data=data.astype(dtype))

    if values.chunks is None:
        result = transform(values)
    else:
        values = values.chunk({dim: -1 for dim in values.dims if dim != TIME_DIM})
        result = xr.map_blocks(transform, values, template=values.astype(dtype))
    return result.transpose(*original_dims)


def _check_local_grid(name: str, values: xr.DataArray, mean: xr.DataArray) -> None:
    for dim in (LEVEL_DIM, LATITUDE_DIM, LONGITUDE_DIM):
        if (dim in values.dims) != (dim in mean.dims):
            raise ValueError(f"variable {name!r} and its local statistics differ in having a {dim!r} dimension")
        if dim in values.dims and not np.array_equal(values[dim].values, mean[dim].values):
            raise ValueError(
                f"the {dim} coordinate of variable {name!r} differs from that of its local statistics: "
                "normalise the dataset on the grid the statistics were computed on"
            )


def _month_positions(times: np.ndarray, months: np.ndarray, name: str) -> np.ndarray:
    """Return for each time the index of its calendar month in `months`."""
    calendar_months = pd.DatetimeIndex(times).month.to_numpy()
    lookup = {int(month): index for index, month in enumerate(months)}
    unknown = sorted(set(calendar_months.tolist()) - set(lookup))
    if unknown:
        raise ValueError(
            f"variable {name!r} has local statistics for months {sorted(lookup)}, not for month(s) {unknown}"
        )
    return np.array([lookup[month] for month in calendar_months.tolist()], dtype=np.intp)


def _broadcastable_statistics(values: xr.DataArray, entry: Mapping[str, Any]) -> tuple[object, object]:
    """Return mean and std as scalars, or as DataArrays along `level` for multi-level variables."""
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
    if _scheme(entry, variable) == "local":
        raise ValueError(
            f"variable {variable!r} is normalised with the local scheme, whose statistics depend on the time "
            "and grid point: use denormalise on a DataArray with time, latitude and longitude coordinates"
        )
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


def _variable_statistics(statistics: Statistics, variable: str) -> Mapping[str, Any]:
    try:
        return statistics[variable]
    except KeyError:
        raise KeyError(
            f"no statistics for variable {variable!r} (statistics cover: {', '.join(sorted(statistics))})"
        ) from None


def _scheme(entry: Mapping[str, Any], variable: str) -> str:
    scheme = entry.get("scheme", "global")
    if scheme not in SCHEMES:
        raise ValueError(f"statistics of variable {variable!r} have unknown scheme {scheme!r} (known: {list(SCHEMES)})")
    return scheme


# --- storing statistics ---------------------------------------------------------------------


def statistics_attrs(statistics: Statistics) -> dict[str, dict[str, Any]]:
    """Return the JSON form of `statistics` for Zarr attrs and the catalog.

    Global entries are copied. Local entries keep their scheme, months and per-level
    training counts, and name the group that contains their arrays (see `statistics_dataset`).
    """
    document = {}
    for variable, entry in statistics.items():
        if _scheme(entry, variable) == "global":
            document[variable] = {"scheme": "global"}
            document[variable].update({key: list(value) for key, value in entry.items() if key != "scheme"})
            continue
        count = entry["count"]
        per_level = count.sum([dim for dim in count.dims if dim != LEVEL_DIM])
        document[variable] = {
            "scheme": "local",
            "months": [int(value) for value in entry["months"]],
            "count": np.atleast_1d(per_level.values).astype(int).tolist(),
            "group": STATISTICS_GROUP,
        }
    return document


def statistics_dataset(statistics: Statistics) -> xr.Dataset:
    """Return the arrays of the local entries as one Dataset: `<var>_mean`, `<var>_std` and `<var>_count`.

    Each array has dims `(month, [level,] latitude, longitude)`. The Dataset is empty
    when every variable is normalised globally.
    """
    arrays = {}
    for variable, entry in statistics.items():
        if _scheme(entry, variable) == "local":
            for key in _LOCAL_ARRAYS:
                arrays[f"{variable}_{key}"] = entry[key].rename(None).reset_coords(drop=True)
    return xr.Dataset(arrays)


def open_statistics(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read the statistics of a normalised Zarr store, with the arrays of its local entries loaded."""
    with xr.open_zarr(path, consolidated=False) as store:
        document = store.attrs.get("statistics")
    if not isinstance(document, dict):
        raise ValueError(f"Zarr store {path} has no 'statistics' attrs: it was not written by tasks.ingest")

    statistics: dict[str, dict[str, Any]] = {variable: dict(entry) for variable, entry in document.items()}
    local = [variable for variable, entry in statistics.items() if _scheme(entry, variable) == "local"]
    if not local:
        return statistics
    with xr.open_zarr(path, group=STATISTICS_GROUP, consolidated=False) as group:
        for variable in local:
            for key in _LOCAL_ARRAYS:
                statistics[variable][key] = group[f"{variable}_{key}"].load()
    return statistics


# --- small helpers ---------------------------------------------------------------------------


def _check_schemes(ds: xr.Dataset, schemes: Mapping[str, str] | None) -> dict[str, str]:
    schemes = dict(schemes or {})
    unknown_variables = sorted(set(schemes) - set(map(str, ds.data_vars)))
    if unknown_variables:
        raise ValueError(
            f"normalisation names variables {unknown_variables} that are not in the dataset "
            f"(variables: {sorted(map(str, ds.data_vars))})"
        )
    for variable, scheme in schemes.items():
        if scheme not in SCHEMES:
            raise ValueError(f"normalisation scheme {scheme!r} of variable {variable!r} is unknown: use one of {list(SCHEMES)}")
    return {str(variable): schemes.get(str(variable), "global") for variable in ds.data_vars}


def _canonical_order(values: xr.DataArray) -> xr.DataArray:
    unknown = [dim for dim in values.dims if dim not in _ORDER]
    missing = [dim for dim in (TIME_DIM, LATITUDE_DIM, LONGITUDE_DIM) if dim not in values.dims]
    if unknown or missing:
        raise ValueError(
            f"variable {values.name!r} has dims {list(values.dims)}: expected {TIME_DIM}, [{MEMBER_DIM}], "
            f"[{LEVEL_DIM}], {LATITUDE_DIM}, {LONGITUDE_DIM}"
        )
    return values.transpose(*(dim for dim in _ORDER if dim in values.dims))


def _five_dimensional_shape(values: xr.DataArray) -> tuple[int, ...]:
    """Return the shape as (time, member, level, latitude, longitude), with 1 for an absent dim."""
    return tuple(values.sizes.get(dim, 1) for dim in _ORDER)


def _describe_point(values: xr.DataArray, index: np.ndarray) -> str:
    """Describe an index into a [level, latitude, longitude] array as coordinates."""
    level, latitude, longitude = (int(value) for value in index)
    parts = []
    if LEVEL_DIM in values.dims:
        parts.append(f"level {values[LEVEL_DIM].values[level]}")
    parts.append(f"latitude {values[LATITUDE_DIM].values[latitude]}")
    parts.append(f"longitude {values[LONGITUDE_DIM].values[longitude]}")
    return ", ".join(parts)


def _time_label(ds: xr.Dataset, index: int) -> str:
    return str(np.datetime_as_string(ds[TIME_DIM].values[index], unit="s"))
