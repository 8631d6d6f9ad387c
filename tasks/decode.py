"""Fast GRIB path of `ingest_era5`: decode messages with ecCodes on a dask cluster, straight into time regions.

cfgrib decodes a field at about 150 MB/s, raw ecCodes at about 1,100 MB/s per core
(`codes_get_float_array`, float32, with values identical to cfgrib's). `open_grib_fast`
reads every message header once with ecCodes (`tasks.grib.inspect_grib`, which also
runs every header check) and builds the canonical dataset from the headers, without
cfgrib. The ingest then runs two passes of per-region work on a dask.distributed
cluster: a local cluster of one worker process per core (`dask_client`), or an existing
cluster given by its scheduler address:

1. moments: decode the training steps of each region and reduce them to partial
   moments (`tasks.normalise`), which the caller merges in the same pairwise order as
   `summarise`, so the statistics are bit-identical to the cfgrib path;
2. write: decode each region again, normalise it, and write its whole chunks into the
   Zarr store. Decoding runs about 9 times faster than compressing and writing
   (BENCHMARKS.md), and memory stays bounded by the region size rather than by the
   decoded dataset.

NOTE: per 0.25° global field and core, decoding takes about 4 ms, the moments 4 ms,
normalising 1 ms and compressing and writing 30-39 ms (measured on a 2-core machine). The
two passes therefore add a third or more to the write time on the same cores, so they
cannot reach 80% of the write limit even without fixed costs.

The grid transforms of `canonicalise` and `regrid` (latitude flip, longitude sorting and
convention, crop) are derived once by passing a field of value indices through those
same functions, so each decoded field only needs one slicing or fancy-indexing step.

`open_grib_fast` and `plan_fast_path` return None, and log why, for inputs they do not
support: levels, members, forecast steps, fields with a bitmap of missing values,
repeated fields, files that differ in grid or variables, and coarsening. Those inputs
are decoded with cfgrib.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array
import distributed.utils
import eccodes
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from dask.distributed import Client, LocalCluster
from dask.distributed import as_completed as completed_futures

from tasks.grib import GribMessage, inspect_grib
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


def open_grib_fast(
    paths: Sequence[Path],
    time_chunk: int,
    canonicalise: Callable[[xr.Dataset, Path], xr.Dataset],
) -> tuple[xr.Dataset, FastPlan] | None:
    """Build the canonical dataset of GRIB `paths` from their message headers alone, without cfgrib.

    Every file is checked by `tasks.grib.inspect_grib` first, which raises
    GribInspectionError for truncated or corrupted messages, unsupported or mixed grids,
    repeated fields with different values and incomplete variables. The dataset equals
    what `canonicalise` makes of cfgrib's dataset: same variables, coordinates,
    attributes and float32 values. Its variables are dask arrays chunked `time_chunk`
    steps along time, decoded with ecCodes when computed.

    Returns the dataset and the plan that maps its grid onto the message values. Returns
    None, and logs why, for inputs whose headers alone cannot prove the cfgrib result.
    These are levels, members, forecast steps, bitmaps of missing values, repeated fields,
    variables missing at some times, and files that differ in grid or variables. They go
    through cfgrib and its checks.
    """
    scans = [(path, inspect_grib(path)) for path in paths]
    reason = _unclean(scans)
    if reason is not None:
        logger.info("ingest decodes with cfgrib, not the fast ecCodes path, because %s", reason)
        return None

    variables = tuple(dict.fromkeys(str(message.keys["cfVarName"]) for message in scans[0][1]))
    by_time: dict[str, dict[np.datetime64, MessageRef]] = {name: {} for name in variables}
    for path, messages in scans:
        for message in messages:
            by_time[str(message.keys["cfVarName"])][_valid_time(message)] = MessageRef(str(path), message.offset)
    times = np.array(sorted(by_time[variables[0]]), dtype="datetime64[ns]")
    first_path, first_messages = scans[0]
    probe = _probe_dataset(first_path, first_messages, variables)
    canonical = canonicalise(probe, first_path)

    index_map = canonical[variables[0]].transpose(..., LATITUDE, LONGITUDE).values
    index_map = index_map.reshape(canonical.sizes[LATITUDE], canonical.sizes[LONGITUDE]).astype(np.int32)
    source_shape = (int(first_messages[0].grid[1]), int(first_messages[0].grid[0]))
    plan = FastPlan(
        variables=variables,
        messages={name: [by_time[name][time] for time in times] for name in variables},
        index_map=index_map,
        source_shape=source_shape,
        slice_copies=_slice_copies(index_map, source_shape),
        times=times,
        latitude=canonical[LATITUDE].values,
        longitude=canonical[LONGITUDE].values,
        attrs={name: dict(canonical[name].attrs) for name in variables},
    )
    coords = {
        TIME: (TIME, times),
        LATITUDE: (LATITUDE, plan.latitude, canonical[LATITUDE].attrs),
        LONGITUDE: (LONGITUDE, plan.longitude, canonical[LONGITUDE].attrs),
    }
    data = {name: ((TIME, LATITUDE, LONGITUDE), _lazy_values(plan, name, time_chunk), plan.attrs[name]) for name in variables}
    return xr.Dataset(data, coords=coords), plan


def _unclean(scans: list[tuple[Path, list[GribMessage]]]) -> str | None:
    """Return why the message headers alone do not fix the cfgrib dataset, or None when they do."""
    grids = {message.grid for _, messages in scans for message in messages}
    if len(grids) > 1:
        return "the files use different grids"
    variable_sets = {tuple(dict.fromkeys(str(message.keys["cfVarName"]) for message in messages)) for _, messages in scans}
    if len(variable_sets) > 1:
        return "the files contain different variables"
    # typeOfLevel, level, stepRange and number must be the same for every message, so that
    # cfgrib makes them scalar coordinates, which canonicalise drops.
    shared = {(message.field[1], message.field[2], message.field[5], message.field[6]) for _, messages in scans for message in messages}
    if len(shared) > 1:
        return "the messages differ in level, forecast step or ensemble member"
    level_type = next(iter(shared))[0]
    if str(level_type).startswith("isobaric"):
        return f"the messages are on pressure levels ({level_type})"

    seen: set[tuple[str, np.datetime64]] = set()
    for path, messages in scans:
        for message in messages:
            keys = message.keys
            if keys["cfVarName"] in (None, "unknown"):
                return f"message {message.index} of {path} has no cfVarName"
            if keys["bitmapPresent"]:
                return f"a message of {keys['cfVarName']} in {path} has a bitmap of missing values"
            if keys["iScansNegatively"] or keys["jPointsAreConsecutive"] or keys["alternativeRowScanning"]:
                return f"a message of {keys['cfVarName']} in {path} scans its grid points in an unusual order"
            key = (str(keys["cfVarName"]), _valid_time(message))
            if key in seen:
                return f"variable {key[0]} has two messages at {key[1]}"
            seen.add(key)
    counts = collections.Counter(name for name, _ in seen)
    if len(set(counts.values())) > 1:
        return "some variables lack messages at times that other variables have"
    return None


def _valid_time(message: GribMessage) -> np.datetime64:
    date, time = int(message.keys["validityDate"]), int(message.keys["validityTime"])
    return np.datetime64(pd.Timestamp(f"{date:08d}T{time:04d}"), "ns")


def _probe_dataset(path: Path, messages: list[GribMessage], variables: tuple[str, ...]) -> xr.Dataset:
    """Return one time step as cfgrib lays it out, with each field's values replaced by their message indices.

    Like cfgrib (0.9.15), latitude and longitude are ecCodes' distinctLatitudes and
    distinctLongitudes, the values are reshaped to (Nj, Ni), and the variable attributes
    are the keys units, name and cfName. float64 represents every index of a grid under
    2**53 points exactly.
    """
    first = {str(message.keys["cfVarName"]): message for message in reversed(messages)}
    with open(path, "rb") as stream:
        stream.seek(messages[0].offset)
        handle = eccodes.codes_grib_new_from_file(stream, headers_only=True)
        try:
            latitudes = np.atleast_1d(eccodes.codes_get_array(handle, "distinctLatitudes"))
            longitudes = np.atleast_1d(eccodes.codes_get_array(handle, "distinctLongitudes"))
        finally:
            eccodes.codes_release(handle)

    shape = (latitudes.size, longitudes.size)
    indices = np.arange(shape[0] * shape[1], dtype=np.float64).reshape(shape)
    latitude_attrs = {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude"}
    if latitudes[0] > latitudes[-1]:
        latitude_attrs["stored_direction"] = "decreasing"
    longitude_attrs = {"units": "degrees_east", "standard_name": "longitude", "long_name": "longitude"}
    fields = {}
    for name in variables:
        keys = first[name].keys
        attrs = {"units": keys["units"], "long_name": keys["name"], "standard_name": keys["cfName"]}
        fields[name] = ((LATITUDE, LONGITUDE), indices, {key: value for key, value in attrs.items() if value is not None})
    return xr.Dataset(
        fields,
        coords={
            LATITUDE: (LATITUDE, latitudes, latitude_attrs),
            LONGITUDE: (LONGITUDE, longitudes, longitude_attrs),
            TIME: np.datetime64("2000-01-01", "ns"),
        },
    )


def _lazy_values(plan: FastPlan, variable: str, time_chunk: int) -> dask.array.Array:
    """Return `variable` as a dask array [T, H, W] whose chunks of `time_chunk` steps call `decode_region`."""
    count = plan.times.size
    starts = range(0, count, time_chunk)
    name = f"decode-grib-{variable}-{uuid.uuid4().hex}"
    graph = {(name, index, 0, 0): (decode_region, plan, variable, start, min(start + time_chunk, count)) for index, start in enumerate(starts)}
    chunks = (tuple(min(time_chunk, count - start) for start in starts), (plan.index_map.shape[0],), (plan.index_map.shape[1],))
    return dask.array.Array(graph, name, chunks, dtype=np.float32)


def plan_fast_path(
    canonical: FastPlan,
    dataset: xr.Dataset,
    grid_transform: Callable[[xr.Dataset], xr.Dataset],
    coarsen_factor: int,
) -> FastPlan | None:
    """Return the plan that decodes the messages of `canonical` straight onto the grid of `dataset`, or None.

    `dataset` is the canonical dataset of `open_grib_fast` after variable selection and
    `grid_transform` (crop and longitude convention). None, with a log line, means the
    workers cannot write it because coarsening averages grid points. The ingest then
    computes the lazy ecCodes dataset in its own process.
    """
    if coarsen_factor != 1:
        logger.info(
            "ingest decodes with ecCodes through dask threads in this process, not the fast ecCodes path on the "
            "cluster, because coarsening averages grid points"
        )
        return None
    variables = tuple(str(name) for name in dataset.data_vars)
    probe = xr.Dataset(
        {"probe": ((LATITUDE, LONGITUDE), canonical.index_map.astype(np.float64), {"units": "1"})},
        coords={LATITUDE: canonical.latitude, LONGITUDE: canonical.longitude, TIME: np.datetime64("2000-01-01", "ns")},
    )
    transformed = grid_transform(probe)
    index_map = transformed["probe"].transpose(..., LATITUDE, LONGITUDE).values.reshape(
        transformed.sizes[LATITUDE], transformed.sizes[LONGITUDE]
    ).astype(np.int32)
    if not (
        np.array_equal(transformed[LATITUDE].values, dataset[LATITUDE].values)
        and np.array_equal(transformed[LONGITUDE].values, dataset[LONGITUDE].values)
        and np.array_equal(canonical.times, dataset[TIME].values)
    ):
        raise ValueError("the grid or times of the regridded probe differ from the dataset's: a bug in tasks.decode")
    return FastPlan(
        variables=variables,
        messages={name: canonical.messages[name] for name in variables},
        index_map=index_map,
        source_shape=canonical.source_shape,
        slice_copies=_slice_copies(index_map, canonical.source_shape),
        times=canonical.times,
        latitude=transformed[LATITUDE].values,
        longitude=transformed[LONGITUDE].values,
        attrs={name: dict(dataset[name].attrs) for name in variables},
    )


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
            # In place on one float64 copy, which gives the same values with fewer temporary arrays.
            values64 = block.astype(np.float64)
            values64 -= float(entry["mean"][0])
            values64 /= float(entry["std"][0])
            normalised = values64.astype(np.float32)
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
    deviation = train - np.expand_dims(mean, axes)
    np.square(deviation, out=deviation)
    m2 = deviation.sum(axis=axes)
    return {0: (count, mean, m2, np.full(1, values.size, dtype=np.int64))}


# Modules that the forkserver of the local cluster imports once, so that each worker forked
# from it starts with them: distributed itself, and this module with numpy, xarray, zarr and ecCodes.
_WORKER_PRELOAD = ["distributed", "tasks.decode"]


# Loggers quietened while a local cluster runs. distributed's default config sets levels for
# `distributed` and `distributed.client` only; the others inherit unless a user config sets them.
_DISTRIBUTED_LOGGERS = ("distributed", "distributed.client", "distributed.scheduler", "distributed.nanny")


def _start_method() -> str:
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


def prepare_local_workers() -> None:
    """Start the forkserver of the local cluster's workers in the background, if it is not running yet.

    The forkserver is a fresh single-threaded process that imports _WORKER_PRELOAD once
    and then forks every worker of every local cluster of this process. Its imports (about
    1 s) overlap with whatever the caller does next. Elsewhere than on Linux this does
    nothing, and workers are spawned.
    """
    if _start_method() != "forkserver":
        return
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        # distributed sets its own preload list the first time it makes this context, so
        # ours is set afterwards and wins. It applies only to a forkserver not started yet.
        context = distributed.utils.get_mp_context()
    context.set_forkserver_preload(_WORKER_PRELOAD)
    multiprocessing.forkserver.ensure_running()


@contextlib.contextmanager
def dask_client(scheduler_address: str | None, workers: int | None = None) -> Iterator[Client]:
    """Connect to the dask.distributed scheduler at `scheduler_address`, or start a local cluster for the block.

    The local cluster has `workers` worker processes (default: one per core) of one
    thread each, listens on 127.0.0.1 only and has no dashboard. On Linux its workers
    are forked from a forkserver (`prepare_local_workers`) rather than spawned, and a
    forkserver runs no threads, so a fork cannot copy a lock that another thread holds.
    The first cluster of a process waits for the forkserver's imports. Later ones start
    in about 0.3 s, where spawned workers take about 4 s (both measured on 2 busy cores).
    Each worker gets SIGKILL when its parent, the forkserver, dies, which it does when
    the ingest process dies. The environment variables that distributed sets for its
    workers (OMP_NUM_THREADS and others) are restored in this process afterwards.
    """
    if scheduler_address is not None:
        client = Client(scheduler_address, set_as_default=False)
        try:
            logger.info("running the ecCodes path on the dask scheduler at %s", scheduler_address)
            yield client
        finally:
            client.close()
        return

    with _quiet_distributed():
        yield from _local_client(workers or os.cpu_count() or 1)


def _local_client(workers: int) -> Iterator[Client]:
    environment = dict(os.environ)
    started = time.perf_counter()
    prepare_local_workers()
    try:
        with dask.config.set({"distributed.worker.multiprocessing-method": _start_method()}):
            # The scheduler serves health and metrics over HTTP even without a dashboard, by
            # default on port 8787: port 0 picks a free one instead.
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            )
    finally:
        for key in set(os.environ) - set(environment):
            del os.environ[key]
        os.environ.update(environment)
    # The client is closed explicitly rather than used as a context manager, which would
    # make it the current client of a context variable that `background_client` enters and
    # leaves in different threads.
    with cluster:
        client = Client(cluster, set_as_default=False)
        try:
            client.run(_exit_with_parent)
            logger.info(
                "started a local dask cluster of %d worker process(es) at %s in %.2f s",
                workers, cluster.scheduler_address, time.perf_counter() - started,
            )
            yield client
        finally:
            with contextlib.suppress(Exception):
                # Workers lose their scheduler connection while the cluster closes, and log it.
                client.run(_quiet_worker_shutdown)
            client.close()


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Keep distributed's loggers of this process at WARNING for the block, then restore their levels.

    distributed logs each start and stop of a scheduler, nanny and connection at INFO, which
    adds dozens of lines per local cluster to the ingest's log.
    """
    loggers = [logging.getLogger(name) for name in _DISTRIBUTED_LOGGERS]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(max(logging.WARNING, each.level))
    try:
        yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


def _quiet_worker_shutdown() -> None:
    """Log only critical records in this worker from now on: what follows is the cluster closing."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def _exit_with_parent() -> None:
    """Ask Linux to kill this worker when the ingest process dies, so a killed ingest leaves no worker writing.

    Elsewhere this does nothing, and a worker finishes its region before it notices the
    lost scheduler.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError as error:
        logger.debug("cannot load libc to set the parent-death signal: %s", error)
        return
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextlib.contextmanager
def background_client(scheduler_address: str | None) -> Iterator[concurrent.futures.Future]:
    """Run `dask_client` for the block, started in a background thread; yield the future of its client.

    The caller works on while the local cluster starts, and takes the client with
    `.result()`, which raises the start-up error if there is one. The cluster is closed
    when the block ends.
    """
    stack = contextlib.ExitStack()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        starting = pool.submit(stack.enter_context, dask_client(scheduler_address))
        try:
            yield starting
        finally:
            concurrent.futures.wait([starting])
            stack.close()


def run_pass(
    context: PassContext, regions: list[tuple[int, int, int]], runner: Client | int
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Run `regions` (index, start, stop) of one pass; yield results as they complete, in any order.

    `runner` is a dask client, whose cluster runs the regions, or a number of threads of
    this process. At most two regions per worker thread are submitted and not yet
    yielded, so memory stays bounded by the region size, not the dataset size. On an
    error the regions not started yet are cancelled, so none of them is written.
    """
    if not regions:
        return
    if isinstance(runner, int):
        yield from _run_in_threads(context, regions, runner)
        return
    client = runner
    [shared] = client.scatter([context], broadcast=True, hash=False)
    window = 2 * max(1, sum(client.nthreads().values()))
    waiting = iter(regions)
    futures = completed_futures(
        [client.submit(run_region, shared, *region, pure=False) for region in itertools.islice(waiting, window)],
        loop=client.loop,
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
    finally:
        client.cancel([shared])


def _run_in_threads(
    context: PassContext, regions: list[tuple[int, int, int]], threads: int
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    # ecCodes decoding (through cffi) and numpy's reductions release the GIL, so threads run in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        waiting = iter(regions)
        running = {pool.submit(run_region, context, *region) for region in itertools.islice(waiting, 2 * threads)}
        try:
            while running:
                finished, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
                    for region in itertools.islice(waiting, 1):
                        running.add(pool.submit(run_region, context, *region))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
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
    runner: Client | int,
) -> Summary:
    """Compute the same Summary as `tasks.normalise.summarise`, decoding the regions in parallel.

    Regions are the time chunks that `summarise` reduces one by one, and their partial
    moments are merged in its order, so both give identical statistics. `runner` is a
    dask client or a number of threads of this process (see `run_pass`).
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
    for index, partials in run_pass(context, regions, runner):
        merger.add(index, partials)
    merged = merger.result()

    statistics, missing = {}, {}
    for variable, partial in merged.items():
        values = _canonical_order(dataset[variable])
        reduce = _local_statistics if schemes[variable] == "local" else _global_statistics
        statistics[variable], valid = reduce(variable, values, partial, (start, end))
        missing[variable] = int(values.size - valid)
    return Summary(statistics=statistics, missing=missing)
