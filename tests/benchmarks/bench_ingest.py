"""Ingestion throughput against the naive path and the decode and write limits.

Input: the real global 0.25° ERA5 field (721 x 1440) re-encoded N times as one GRIB
file, each copy with its own date and its own values (the field plus a smooth offset
that changes per copy), so that compression sees realistic data rather than repeats.

Figures, all in MB/s of decoded float32 (N x 721 x 1440 x 4 bytes over wall time):

- `naive`: `xr.open_dataset(engine="cfgrib").to_zarr()`, what a user writes by hand;
- `decode_limit`: raw ecCodes decoding of every message, on all cores;
- `write_limit`: compressing and writing the same decoded arrays to Zarr with the
  default codec of zarr 3 (zstd), on all cores;
- `ingest`: `tasks.ingest.ingest_era5`, statistics and normalisation included, on the
  local dask cluster that it starts (the start of a second cluster is measured as well).

The limit of any ingestion is the slower of the two limits. Results go to
`bench-results/ingest.json` (or `--output`). The ingestion table in BENCHMARKS.md is
rewritten only with `--update-page`, which `make bench` passes, or when both `--copies`
and `--output` keep their defaults.

Run with `make bench` (N = 100, about 415 MB decoded) or
`python tests/benchmarks/bench_ingest.py --copies 10` for a quick check.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import eccodes
import numpy as np
import xarray as xr
import zarr

logger = logging.getLogger("bench_ingest")

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_FILE = Path("era5") / "era5_t2m_monthly_2022-10_0p25.grib"
FIRST_DATE = date(2000, 1, 1)


DEFAULT_COPIES = 100
DEFAULT_OUTPUT = REPO_ROOT / "bench-results" / "ingest.json"


def build_input(source: Path, target: Path, copies: int) -> tuple[int, tuple[int, int]]:
    """Write `copies` re-dated, perturbed copies of the first message of `source` to `target`.

    Copy k has date FIRST_DATE + k days and values field + 0.5 K * k * sin(latitude).
    Returns the number of messages and the grid shape (latitude, longitude).
    """
    with open(source, "rb") as stream:
        template = eccodes.codes_grib_new_from_file(stream)
    try:
        shape = (eccodes.codes_get(template, "Nj"), eccodes.codes_get(template, "Ni"))
        values = eccodes.codes_get_float_array(template, "values").astype(np.float64)
        latitudes = eccodes.codes_get_array(template, "latitudes")
        offset = np.sin(np.deg2rad(latitudes))

        with open(target, "wb") as output:
            for copy in range(copies):
                message = eccodes.codes_clone(template)
                day = FIRST_DATE + timedelta(days=copy)
                eccodes.codes_set(message, "dataDate", int(day.strftime("%Y%m%d")))
                eccodes.codes_set_values(message, values + 0.5 * copy * offset)
                eccodes.codes_write(message, output)
                eccodes.codes_release(message)
    finally:
        eccodes.codes_release(template)
    return copies, shape


def _message_offsets(path: Path) -> list[int]:
    offsets = []
    with open(path, "rb") as stream:
        while True:
            message = eccodes.codes_grib_new_from_file(stream)
            if message is None:
                break
            offsets.append(int(eccodes.codes_get(message, "offset", ktype=int)))
            eccodes.codes_release(message)
    return offsets


def _decode_messages(path: str, offsets: list[int]) -> int:
    """Decode the messages at `offsets` to float32 and return the bytes decoded."""
    decoded = 0
    with open(path, "rb") as stream:
        for offset in offsets:
            stream.seek(offset)
            message = eccodes.codes_grib_new_from_file(stream)
            decoded += eccodes.codes_get_float_array(message, "values").nbytes
            eccodes.codes_release(message)
    return decoded


def measure_decode_limit(path: Path, workers: int) -> tuple[float, int]:
    """Decode every message on `workers` processes. Returns (seconds, bytes decoded)."""
    offsets = _message_offsets(path)
    shares = [offsets[index::workers] for index in range(workers)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        decoded = sum(pool.map(_decode_messages, [str(path)] * workers, shares))
    return time.perf_counter() - start, decoded


def decode_to_array(path: Path, copies: int, shape: tuple[int, int], target: Path) -> Path:
    """Decode every message into a float32 `.npy` file of shape (copies, latitude, longitude)."""
    array = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(copies, *shape))
    with open(path, "rb") as stream:
        for index in range(copies):
            message = eccodes.codes_grib_new_from_file(stream)
            array[index] = eccodes.codes_get_float_array(message, "values").reshape(shape)
            eccodes.codes_release(message)
    array.flush()
    return target


def _write_slabs(store: str, fields: str, steps: list[int]) -> None:
    array = zarr.open_array(store, mode="r+")
    decoded = np.load(fields, mmap_mode="r")
    for step in steps:
        array[step] = decoded[step]


def measure_write_limit(fields: Path, copies: int, shape: tuple[int, int], workers: int, folder: Path) -> float:
    """Compress and write the decoded fields to a Zarr array on `workers` processes; return seconds.

    The array has one chunk per field and the codec that `xarray.to_zarr` uses by default.
    The fields are read from a memory-mapped file that was just written, so they come
    from the page cache and the figure excludes decoding.
    """
    store = str(folder / "write-limit.zarr")
    zarr.create_array(store, shape=(copies, *shape), chunks=(1, *shape), dtype="float32", zarr_format=3)
    shares = [list(range(index, copies, workers)) for index in range(workers)]

    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_slabs, [store] * workers, [str(fields)] * workers, shares))
    return time.perf_counter() - start


def measure_naive(path: Path, folder: Path) -> float:
    start = time.perf_counter()
    dataset = xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""})
    dataset.to_zarr(folder / "naive.zarr", mode="w", zarr_format=3, consolidated=False)
    return time.perf_counter() - start


def measure_ingest(path: Path, copies: int, folder: Path) -> float:
    from tasks.ingest import ingest_era5

    os.environ["ATMOREP_HOME"] = str(folder / "home")
    last = FIRST_DATE + timedelta(days=copies - 1)
    split = FIRST_DATE + timedelta(days=int(copies * 0.8))
    start = time.perf_counter()
    ingest_era5(
        [path],
        name="bench-global",
        train_period=(FIRST_DATE.isoformat(), (split - timedelta(days=1)).isoformat()),
        test_period=(split.isoformat(), last.isoformat()),
        time_chunk=1,
    )
    return time.perf_counter() - start


def measure_cluster_startup() -> float:
    """Start and stop another local dask cluster like the one of `ingest_era5`; return seconds to start it.

    Run after the ingest, it finds the workers' forkserver running, as a second ingest in
    the same process does.
    """
    from tasks.decode import dask_client

    start = time.perf_counter()
    with dask_client(None) as client:
        seconds = time.perf_counter() - start
        client.run(os.getpid)
    return seconds


def update_benchmarks_page(results: dict) -> None:
    """Replace the ingestion section of BENCHMARKS.md with one written from `results`, keeping other sections."""
    rates = results["mb_per_s"]
    limit = min(rates["decode_limit"], rates["write_limit"])
    lines = [
        "## Ingestion throughput",
        "",
        f"Measured {results['date']} on {results['machine']} ({results['cores']} cores) with "
        f"`make bench`: {results['copies']} copies of the global 0.25° ERA5 field, "
        f"{results['decoded_mb']:.0f} MB decoded float32. The 1-minute load average was "
        f"{results['load_average'][0]:.1f} at the start and {results['load_average'][1]:.1f} at the end: other "
        "processes that share the cores lower every figure, the ratios less than the rates.",
        "",
        "| path | MB/s | ratio to the limit |",
        "| --- | ---: | ---: |",
    ]
    for name, label in (
        ("naive", "`xr.open_dataset(engine='cfgrib').to_zarr()`"),
        ("decode_limit", "raw ecCodes decoding, all cores"),
        ("write_limit", "Zarr compress and write, all cores"),
        ("ingest", "`ingest_era5` (statistics and normalisation included)"),
    ):
        lines.append(f"| {label} | {rates[name]:.0f} | {rates[name] / limit:.2f} |")
    lines += [
        "",
        f"The limit is the slower of decoding and writing: {limit:.0f} MB/s. "
        f"`ingest_era5` runs at {rates['ingest'] / rates['naive']:.2f} times the naive path. Its time includes "
        "starting the local dask cluster and the forkserver of its workers, which overlaps with hashing, "
        "indexing and the statistics pass. A second cluster in the same process, with the forkserver running, "
        f"starts in {results['cluster_startup_s']:.2f} s.",
        "",
    ]
    page = REPO_ROOT / "BENCHMARKS.md"
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    start = text.find("## Ingestion throughput")
    if start < 0:
        before, after = text.rstrip("\n") + "\n\n", ""
    else:
        following = text.find("\n## ", start + 1)
        before, after = text[:start], (text[following + 1 :] if following >= 0 else "")
    page.write_text(before + "\n".join(lines) + ("\n" + after if after else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--copies", type=int, default=DEFAULT_COPIES, help=f"fields in the input file (default: {DEFAULT_COPIES})"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for the limits")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file of the results")
    parser.add_argument(
        "--update-page",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite the ingestion table in BENCHMARKS.md (default: only when --copies and --output keep "
        "their defaults)",
    )
    arguments = parser.parse_args()
    update_page = arguments.update_page
    if update_page is None:
        update_page = arguments.copies == DEFAULT_COPIES and arguments.output == DEFAULT_OUTPUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    mirror = Path(os.environ.get("ATMOREP_DATA_MIRROR", REPO_ROOT.parent / "shared" / "data"))
    folder = Path(tempfile.mkdtemp(prefix="atmorep-bench-"))
    load_before = os.getloadavg()[0]
    try:
        grib = folder / "input.grib"
        copies, shape = build_input(mirror / SOURCE_FILE, grib, arguments.copies)
        decoded_mb = copies * shape[0] * shape[1] * 4 / 1e6
        logger.info("input: %d fields of %s, %.0f MB decoded", copies, shape, decoded_mb)

        seconds = {}
        seconds["naive"] = measure_naive(grib, folder)
        seconds["decode_limit"], _ = measure_decode_limit(grib, arguments.workers)
        fields = decode_to_array(grib, copies, shape, folder / "fields.npy")
        seconds["write_limit"] = measure_write_limit(fields, copies, shape, arguments.workers, folder)
        seconds["ingest"] = measure_ingest(grib, copies, folder)
        for name, value in seconds.items():
            logger.info("%-13s %6.1f s  %6.0f MB/s", name, value, decoded_mb / value)
        startup = measure_cluster_startup()
        logger.info("second local dask cluster start-up %.2f s", startup)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    results = {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "copies": copies,
        "decoded_mb": decoded_mb,
        "seconds": seconds,
        "mb_per_s": {name: decoded_mb / value for name, value in seconds.items()},
        "cluster_startup_s": startup,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(results, indent=2))
    if update_page:
        update_benchmarks_page(results)
        logger.info("wrote %s and BENCHMARKS.md", arguments.output)
    else:
        logger.info("wrote %s; BENCHMARKS.md is unchanged (pass --update-page to rewrite it)", arguments.output)


if __name__ == "__main__":
    main()
