"""Fast GRIB path of `ingest_era5`: decode messages with ecCodes in worker processes, straight into time regions.

cfgrib decodes a field at about 150 MB/s, raw ecCodes at about 1,100 MB/s per core
(`codes_get_float_array`, float32, with values identical to cfgrib's). The fast path
indexes the messages of every source once, then runs two passes of per-region work on a
process pool, or on a dask.distributed cluster when a scheduler address is given:

1. moments: decode the training steps of each region and reduce them to partial
   moments (`tasks.normalise`), which the caller merges in the same pairwise order as
   `summarise`, so the statistics are bit-identical to the cfgrib path;
2. write: decode each region, normalise it with `tasks.normalise.normalise`, and write
   its whole chunks into the Zarr store.

The grid transforms of `canonicalise` and `regrid` (latitude flip, longitude sorting and
convention, crop) are derived once by passing a field of value indices through those
same functions, so each decoded field only needs one fancy-indexing step.

`plan_fast_path` returns None, and logs why, for anything it does not support. That is
NetCDF or opened-dataset sources, coarsening, and variables with levels or members. It is
also fields with a bitmap of missing values, and messages that do not map one to one onto
the dataset.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import eccodes
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from gribapi.errors import GribInternalError

from tasks.normalise import (
    Summary,
    _block_moments,
    _canonical_order,
    _check_schemes,
    _global_statistics,
    _local_statistics,
    _merge_partials,
    normalise,
)

logger = logging.getLogger(__name__)

TIME, LATITUDE, LONGITUDE = "time", "latitude", "longitude"
# prctl option of linux/prctl.h that sets the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1
_HEADER_KEYS = ("cfVarName", "validityDate", "validityTime", "bitmapPresent", "Ni", "Nj")


@dataclass(frozen=True)
class MessageRef:
    """Location of one GRIB message: file path and byte offset."""

    path: str
    offset: int


@dataclass(frozen=True)
class FastPlan:
    """Everything a worker needs to decode fields into canonical `(time, latitude, longitude)` arrays.

    `messages[variable][t]` is the message of time index t. `index_map` [H, W] gives, for
    each canonical grid point, its position in a message's values.
    """

    variables: tuple[str, ...]
    messages: dict[str, list[MessageRef]]
    index_map: np.ndarray
    source_shape: tuple[int, int]
    # Copies of (output rows, output columns, source rows, source columns) slices that
    # together apply `index_map`, or None when it needs fancy indexing.
    slice_copies: list[tuple[slice, slice, slice, slice]] | None
    times: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray
    attrs: dict[str, dict[str, str]]


@dataclass(frozen=True)
class PassContext:
    """Shared inputs of every region of one pass, sent to each worker once rather than with each region.

    `mode` "moments" returns partial moments and needs `in_train` and `month` [T] and
    `local` per variable. "write" normalises with `statistics` and writes into `store`.
    """

    plan: FastPlan
    mode: str
    in_train: np.ndarray | None = None
    month: np.ndarray | None = None
    local: dict[str, bool] | None = None
    statistics: dict[str, dict[str, Any]] | None = None
    store: str | None = None
    token: str = ""


def plan_fast_path(
    sources: Sequence[Path | xr.Dataset],
    dataset: xr.Dataset,
    grid_transform: Callable[[xr.Dataset], xr.Dataset],
    coarsen_factor: int,
) -> FastPlan | None:
    """Index the GRIB messages behind the canonical `dataset`, or return None when the fast path does not apply.

    `grid_transform` must be the canonicalise-and-regrid chain that produced `dataset` from
    one decoded source, applied to a dataset with one time step.
    """
    reason = _unsupported(sources, dataset, coarsen_factor)
    if reason is None:
        try:
            return _build_plan(sources, dataset, grid_transform)
        except _Unsupported as error:
            reason = str(error)
        except (GribInternalError, OSError) as error:
            reason = f"indexing failed ({type(error).__name__}: {error})"
    logger.info("ingest decodes with cfgrib, not the fast ecCodes path, because %s", reason)
    return None


class _Unsupported(Exception):
    pass


def _unsupported(sources: Sequence[Path | xr.Dataset], dataset: xr.Dataset, coarsen_factor: int) -> str | None:
    if any(not isinstance(source, Path) or source.suffix.lower() not in {".grib", ".grb", ".grib1", ".grib2", ".grb1", ".grb2"} for source in sources):
        return "a source is not a GRIB file"
    if coarsen_factor != 1:
        return "coarsening averages grid points"
    for name, values in dataset.data_vars.items():
        if values.dims != (TIME, LATITUDE, LONGITUDE):
            return f"variable {name} has dims {values.dims}, and the fast path supports (time, latitude, longitude)"
    return None


def _build_plan(
    sources: Sequence[Path], dataset: xr.Dataset, grid_transform: Callable[[xr.Dataset], xr.Dataset]
) -> FastPlan:
    variables = tuple(str(name) for name in dataset.data_vars)
    times = dataset[TIME].values.astype("datetime64[ns]")
    position = {time: index for index, time in enumerate(times)}
    messages: dict[str, list[MessageRef | None]] = {name: [None] * times.size for name in variables}
    first: tuple[str, int] | None = None

    for path in sources:
        for offset, header in _read_headers(path):
            name = header["cfVarName"]
            if name not in messages:
                continue
            if header["bitmapPresent"]:
                raise _Unsupported(f"a message of {name} in {path} has a bitmap of missing values")
            valid = np.datetime64(pd.Timestamp(f"{header['validityDate']:08d}T{header['validityTime']:04d}"), "ns")
            index = position.get(valid)
            if index is None:
                raise _Unsupported(f"a message of {name} in {path} at {valid} is not a time of the dataset")
            if messages[name][index] is not None:
                raise _Unsupported(f"variable {name} has two messages at {valid}")
            messages[name][index] = MessageRef(str(path), offset)
            first = first or (str(path), offset)

    for name, refs in messages.items():
        if any(ref is None for ref in refs):
            raise _Unsupported(f"variable {name} lacks messages at some times of the dataset")

    index_map, source_shape, latitude, longitude = _grid_index_map(first, grid_transform)
    if not (np.array_equal(latitude, dataset[LATITUDE].values) and np.array_equal(longitude, dataset[LONGITUDE].values)):
        raise _Unsupported("the grid derived from the message headers differs from the decoded grid")
    return FastPlan(
        variables=variables,
        messages={name: list(refs) for name, refs in messages.items()},
        index_map=index_map,
        source_shape=source_shape,
        slice_copies=_slice_copies(index_map, source_shape),
        times=times,
        latitude=latitude,
        longitude=longitude,
        attrs={name: dict(dataset[name].attrs) for name in variables},
    )


def _read_headers(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as stream:
        while (handle := eccodes.codes_grib_new_from_file(stream, headers_only=True)) is not None:
            try:
                yield int(eccodes.codes_get(handle, "offset")), {key: eccodes.codes_get(handle, key) for key in _HEADER_KEYS}
            finally:
                eccodes.codes_release(handle)


def _grid_index_map(
    message: tuple[str, int], grid_transform: Callable[[xr.Dataset], xr.Dataset]
) -> tuple[np.ndarray, tuple[int, int], np.ndarray, np.ndarray]:
    """Pass the value indices of one message through `grid_transform`.

    Returns the map [H, W], the message's grid shape (Nj, Ni) and the canonical latitude
    and longitude.
    """
    path, offset = message
    with open(path, "rb") as stream:
        stream.seek(offset)
        handle = eccodes.codes_grib_new_from_file(stream)
        try:
            shape = (int(eccodes.codes_get(handle, "Nj")), int(eccodes.codes_get(handle, "Ni")))
            latitudes = eccodes.codes_get_array(handle, "latitudes").reshape(shape)[:, 0]
            longitudes = eccodes.codes_get_array(handle, "longitudes").reshape(shape)[0, :]
        finally:
            eccodes.codes_release(handle)

    # float64 represents every index of a grid under 2**53 points exactly.
    probe = xr.Dataset(
        {"probe": ((LATITUDE, LONGITUDE), np.arange(shape[0] * shape[1], dtype=np.float64).reshape(shape), {"units": "1"})},
        coords={LATITUDE: latitudes, LONGITUDE: longitudes, TIME: np.datetime64("2000-01-01", "ns")},
    )
    transformed = grid_transform(probe)
    index_map = transformed["probe"].transpose(..., LATITUDE, LONGITUDE).values.reshape(
        transformed.sizes[LATITUDE], transformed.sizes[LONGITUDE]
    )
    return index_map.astype(np.int32), shape, transformed[LATITUDE].values, transformed[LONGITUDE].values


# A map that splits into more contiguous runs than this per axis is applied by fancy indexing.
_MAX_RUNS = 4


def _slice_copies(index_map: np.ndarray, source_shape: tuple[int, int]) -> list[tuple[slice, slice, slice, slice]] | None:
    """Express `index_map` as copies of rectangular slices, or return None when it is not separable into few runs.

    Crops, latitude flips and longitude rolls give one or two runs per axis, and slice
    copies of them are several times faster than fancy indexing a whole field.
    """
    width = source_shape[1]
    rows = index_map[:, 0] // width
    columns = index_map[0, :] - rows[0] * width
    if not np.array_equal(index_map, rows[:, None] * width + columns[None, :]):
        return None
    row_runs, column_runs = _runs(rows), _runs(columns)
    if row_runs is None or column_runs is None:
        return None
    return [
        (output_rows, output_columns, source_rows, source_columns)
        for output_rows, source_rows in row_runs
        for output_columns, source_columns in column_runs
    ]


def _runs(indices: np.ndarray) -> list[tuple[slice, slice]] | None:
    """Split `indices` into runs of step +1 or -1; return (output slice, source slice) pairs, or None when too many."""
    breaks = [0]
    for position in range(1, indices.size):
        step = indices[position] - indices[position - 1]
        run_start = breaks[-1]
        run_step = indices[run_start + 1] - indices[run_start] if position - 1 > run_start else step
        if step not in (1, -1) or step != run_step:
            breaks.append(position)
    breaks.append(indices.size)
    if len(breaks) - 1 > _MAX_RUNS:
        return None

    runs = []
    for first, last in zip(breaks[:-1], breaks[1:], strict=False):
        start, stop = int(indices[first]), int(indices[last - 1])
        if stop >= start:
            source = slice(start, stop + 1)
        else:
            source = slice(start, stop - 1 if stop > 0 else None, -1)
        runs.append((slice(first, last), source))
    return runs


# --- per-region work, run in worker processes ---------------------------------------------


def decode_region(plan: FastPlan, variable: str, start: int, stop: int) -> np.ndarray:
    """Decode the messages of `variable` at time indices [start, stop) into float32 [T, H, W]."""
    height, width = plan.index_map.shape
    block = np.empty((stop - start, height, width), dtype=np.float32)
    streams: dict[str, Any] = {}
    try:
        for row, ref in enumerate(plan.messages[variable][start:stop]):
            stream = streams.get(ref.path)
            if stream is None:
                stream = streams[ref.path] = open(ref.path, "rb")  # noqa: SIM115 - closed below
            stream.seek(ref.offset)
            handle = eccodes.codes_grib_new_from_file(stream)
            try:
                values = eccodes.codes_get_float_array(handle, "values")
            finally:
                eccodes.codes_release(handle)
            if plan.slice_copies is None:
                block[row] = values[plan.index_map]
            else:
                grid = values.reshape(plan.source_shape)
                for output_rows, output_columns, source_rows, source_columns in plan.slice_copies:
                    block[row, output_rows, output_columns] = grid[source_rows, source_columns]
    finally:
        for stream in streams.values():
            stream.close()
    return block


def run_region(context: PassContext, index: int, start: int, stop: int) -> tuple[int, dict[str, Any] | None]:
    """Run one region [start, stop) of a pass; return its index and, for `moments`, the partial moments per variable."""
    plan = context.plan
    if context.mode == "moments":
        partials = {}
        in_train, month = context.in_train[start:stop], context.month[start:stop]
        for variable in plan.variables:
            local = context.local[variable]
            if in_train.any() or local:
                block = decode_region(plan, variable, start, stop)
            else:
                # Steps outside the training period only add their count of valid values, and
                # the fast path excludes fields with missing values, so every value is valid.
                block = np.zeros((stop - start, *plan.index_map.shape), dtype=np.float32)
            if local:
                partials[variable] = _block_moments(block, (1, 1, *plan.index_map.shape), in_train, month, local)
            else:
                partials[variable] = _global_moments_all_valid(block, in_train)
        return index, partials

    region = slice(start, stop)
    for variable in plan.variables:
        block = decode_region(plan, variable, start, stop)
        entry = context.statistics[variable]
        if entry.get("scheme", "global") == "global":
            # The operations of tasks.normalise for a variable without levels, on the bare array.
            normalised = ((block.astype(np.float64) - float(entry["mean"][0])) / float(entry["std"][0])).astype(np.float32)
        else:
            values = xr.DataArray(
                block,
                dims=(TIME, LATITUDE, LONGITUDE),
                coords={TIME: plan.times[region], LATITUDE: plan.latitude, LONGITUDE: plan.longitude},
                attrs=plan.attrs[variable],
                name=variable,
            )
            normalised = normalise(values.to_dataset(), context.statistics)[variable].values.astype(np.float32)
        _open_array(context.store, variable, context.token)[region] = normalised
    return index, None


@functools.lru_cache(maxsize=64)
def _open_array(store: str, variable: str, token: str) -> zarr.Array:
    """Open an array of the store once per pass and worker process, since a worker writes many regions into it.

    `token` is unique per pass, so a long-lived dask worker never reuses the array of an
    earlier store at the same path.
    """
    return zarr.open_array(f"{store}/{variable}", mode="r+")


def _global_moments_all_valid(block: np.ndarray, in_train: np.ndarray) -> dict[int, tuple[np.ndarray, ...]]:
    """Return what `tasks.normalise._block_moments` returns for a global variable without missing values.

    block: [T, H, W] float32. The arithmetic is that of `_block_moments` on the same
    float64 array, so the result is bit-identical. It skips the masking of non-finite
    values, which cannot occur because the fast path excludes fields with a bitmap.
    """
    values = block.reshape((block.shape[0], 1, 1, *block.shape[1:])).astype(np.float64)
    axes = (0, 1, 3, 4)
    train = values if in_train.all() else values[in_train]
    count = np.full(1, train.size, dtype=np.int64)
    total = train.sum(axis=axes)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    m2 = ((train - np.expand_dims(mean, axes)) ** 2).sum(axis=axes)
    return {0: (count, mean, m2, np.full(1, values.size, dtype=np.int64))}


_worker_context: PassContext | None = None


def _set_worker_context(context: PassContext) -> None:
    global _worker_context
    _worker_context = context
    _exit_with_parent()


def _exit_with_parent() -> None:
    """Ask Linux to kill this worker when the ingest process dies, so a killed ingest leaves no worker writing.

    Elsewhere this does nothing, and a worker finishes its region before it notices the
    broken pool.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError as error:
        logger.debug("cannot load libc to set the parent-death signal: %s", error)
        return
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _run_in_worker(index: int, start: int, stop: int) -> tuple[int, dict[str, Any] | None]:
    return run_region(_worker_context, index, start, stop)


def run_pass(
    context: PassContext, regions: list[tuple[int, int, int]], scheduler_address: str | None
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Run `regions` (index, start, stop) of one pass and yield results as they complete, in any order.

    Work runs on a process pool of one worker per core, or on the dask.distributed cluster
    at `scheduler_address`. At most two regions per worker are submitted and not yet
    yielded, so memory stays bounded by the region size.
    """
    if not regions:
        return
    if scheduler_address is not None:
        yield from _run_on_cluster(context, regions, scheduler_address)
        return

    workers = max(1, min(os.cpu_count() or 1, len(regions)))
    # fork hands the context to each worker without pickling it.
    pool_context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        workers, mp_context=pool_context, initializer=_set_worker_context, initargs=(context,)
    ) as pool:
        waiting = iter(regions)
        running = {pool.submit(_run_in_worker, *region) for region in itertools.islice(waiting, 2 * workers)}
        try:
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
                    for region in itertools.islice(waiting, 1):
                        running.add(pool.submit(_run_in_worker, *region))
        except BaseException:
            # Regions not started yet are dropped, so a failure is reported without writing them.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _run_on_cluster(
    context: PassContext, regions: list[tuple[int, int, int]], scheduler_address: str
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    from dask.distributed import Client
    from dask.distributed import as_completed as completed_futures

    with Client(scheduler_address) as client:
        [shared] = client.scatter([context], broadcast=True)
        window = 2 * max(1, sum(client.nthreads().values()))
        waiting = iter(regions)
        futures = completed_futures(
            [client.submit(run_region, shared, *region, pure=False) for region in itertools.islice(waiting, window)]
        )
        try:
            for future in futures:
                yield future.result()
                future.release()
                for region in itertools.islice(waiting, 1):
                    futures.add(client.submit(run_region, shared, *region, pure=False))
        except BaseException:
            client.cancel(list(futures.futures))
            raise


class OrderedMerger:
    """Merge per-region partial moments in the pairwise order `tasks.normalise.summarise` uses.

    Regions may arrive in any order. They are merged in index order as soon as their
    predecessors are in, with a stack of partials of equal subtree size (a binary
    counter), which gives the same tree as merging neighbours level by level. Memory
    contains the regions that arrived early plus one partial per power of two.
    """

    def __init__(self) -> None:
        self._early: dict[int, dict[str, Any]] = {}
        self._next = 0
        self._stack: list[tuple[int, dict[str, Any]]] = []

    def add(self, index: int, partials: dict[str, Any]) -> None:
        self._early[index] = partials
        while self._next in self._early:
            self._stack.append((0, self._early.pop(self._next)))
            self._next += 1
            while len(self._stack) > 1 and self._stack[-1][0] == self._stack[-2][0]:
                rank, second = self._stack.pop()
                _, first = self._stack.pop()
                self._stack.append((rank + 1, _merge_variables(first, second)))

    def result(self) -> dict[str, Any]:
        """Return the merged partial moments of every variable; all regions must have been added."""
        if self._early or not self._stack:
            raise ValueError(f"regions from {self._next} on are missing, so the partial moments cannot be merged")
        merged = self._stack.pop()[1]
        while self._stack:
            merged = _merge_variables(self._stack.pop()[1], merged)
        return merged


def _merge_variables(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {variable: _merge_partials(first[variable], second[variable]) for variable in first}


def summarise_fast(
    plan: FastPlan,
    dataset: xr.Dataset,
    train_period: tuple[str, str],
    schemes: dict[str, str] | None,
    time_chunk: int,
    scheduler_address: str | None,
) -> Summary:
    """Compute the same Summary as `tasks.normalise.summarise`, decoding the regions in parallel.

    Regions are the time chunks that `summarise` reduces one by one, and their partial
    moments are merged in its order, so both give identical statistics.
    """
    schemes = _check_schemes(dataset, schemes)
    times = pd.DatetimeIndex(plan.times)
    start, end = train_period
    in_train = np.asarray((times >= pd.Timestamp(start)) & (times <= pd.Timestamp(end)))
    month = np.asarray(times.month, dtype=np.int64)
    context = PassContext(
        plan=plan, mode="moments", in_train=in_train, month=month,
        local={variable: schemes[variable] == "local" for variable in plan.variables},
    )
    regions = [(index, first, min(first + time_chunk, times.size)) for index, first in enumerate(range(0, times.size, time_chunk))]
    merger = OrderedMerger()
    for index, partials in run_pass(context, regions, scheduler_address):
        merger.add(index, partials)
    merged = merger.result()

    statistics, missing = {}, {}
    for variable, partial in merged.items():
        values = _canonical_order(dataset[variable])
        reduce = _local_statistics if schemes[variable] == "local" else _global_statistics
        statistics[variable], valid = reduce(variable, values, partial, (start, end))
        missing[variable] = int(values.size - valid)
    return Summary(statistics=statistics, missing=missing)
