"""Inspection of GRIB files with ecCodes before cfgrib decodes them.

cfgrib (0.9.15) builds one hypercube per variable from the message headers. Given
messages it does not expect, it can return a wrong dataset without an error: of two
messages for the same field it keeps the first, and a field missing at one time step or
level becomes NaN. `inspect_grib` reads every message header once and raises
`GribInspectionError` naming the file for each of these cases, and for grids that
ingest cannot use.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import eccodes
import numpy as np
from gribapi.errors import GribInternalError

logger = logging.getLogger(__name__)

SUPPORTED_GRID_TYPES = frozenset({"regular_ll"})
# Header keys that together identify one field; cfgrib builds its dimensions from the same keys.
FIELD_KEYS = ("shortName", "typeOfLevel", "level", "dataDate", "dataTime", "stepRange", "number")
GRID_KEYS = (
    "Ni",
    "Nj",
    "latitudeOfFirstGridPointInDegrees",
    "longitudeOfFirstGridPointInDegrees",
    "latitudeOfLastGridPointInDegrees",
    "longitudeOfLastGridPointInDegrees",
)
# Further header keys read in the same scan for the ecCodes decoding path of `tasks.decode`:
# the variable name and attributes that cfgrib would give, the valid time, and the layout
# of the values.
DECODE_KEYS = (
    "cfVarName",
    "units",
    "name",
    "cfName",
    "validityDate",
    "validityTime",
    "bitmapPresent",
    "iScansNegatively",
    "jPointsAreConsecutive",
    "alternativeRowScanning",
)
# At most this many examples are listed in an error message.
_MAX_LISTED = 5


class GribInspectionError(ValueError):
    """Error for a GRIB file whose messages cfgrib would decode wrongly or ingest cannot use."""


@dataclass(frozen=True)
class GribMessage:
    """Header of one message: position, identifying FIELD_KEYS, grid type, GRID_KEYS and DECODE_KEYS."""

    index: int
    offset: int
    field: tuple
    grid_type: str
    grid: tuple
    keys: dict[str, object]


def inspect_grib(path: Path) -> list[GribMessage]:
    """Check every message header of `path`.

    Raises GribInspectionError when a message is truncated or corrupted, or when a grid
    is not a regular latitude-longitude grid. The error then names the ecCodes
    `gridType`, which cfgrib exposes as the `GRIB_gridType` attribute. It also raises
    when messages use different grids, when one field appears twice with different
    values, or when a variable lacks some combination of time steps, forecast steps,
    levels and members.
    Identical repeated fields are logged and left to cfgrib, which keeps the first.
    Returns the message headers, in file order.
    """
    messages = _read_headers(path)
    if not messages:
        raise GribInspectionError(f"GRIB file {path} contains no message")
    _check_grid_types(messages, path)
    _check_single_grid(messages, path)
    _check_duplicates(messages, path)
    _check_complete(messages, path)
    return messages


def _read_headers(path: Path) -> list[GribMessage]:
    messages = []
    with open(path, "rb") as stream:
        while True:
            position = stream.tell()
            try:
                handle = eccodes.codes_grib_new_from_file(stream, headers_only=True)
            except GribInternalError as error:
                raise GribInspectionError(
                    f"cannot decode GRIB file {path}: message {len(messages)} (after byte {position}) is truncated or "
                    f"corrupted ({type(error).__name__}: {error}). Download the file again."
                ) from error
            if handle is None:
                return messages
            try:
                offset = int(eccodes.codes_get(handle, "offset"))
                grid_type = str(eccodes.codes_get(handle, "gridType"))
                field = tuple(_get(handle, key) for key in FIELD_KEYS)
                grid = tuple(_get(handle, key) for key in GRID_KEYS) if grid_type in SUPPORTED_GRID_TYPES else ()
                keys = {key: _get(handle, key) for key in DECODE_KEYS}
                messages.append(GribMessage(len(messages), offset, field, grid_type, grid, keys))
            finally:
                eccodes.codes_release(handle)


def _get(handle: int, key: str) -> object:
    try:
        return eccodes.codes_get(handle, key)
    except GribInternalError:
        return None


def _check_grid_types(messages: list[GribMessage], path: Path) -> None:
    for message in messages:
        if message.grid_type not in SUPPORTED_GRID_TYPES:
            raise GribInspectionError(
                f"GRIB file {path} has grid type {message.grid_type!r} (GRIB_gridType) in message {message.index} "
                f"({message.field[0]}), but ingest needs a regular latitude-longitude grid ('regular_ll'). "
                "Interpolate the file to a regular lat-lon grid first, for example with the `grid` keyword of a "
                "MARS or CDS request."
            )


def _check_single_grid(messages: list[GribMessage], path: Path) -> None:
    grids = defaultdict(list)
    for message in messages:
        grids[message.grid].append(message)
    if len(grids) > 1:
        described = "; ".join(
            f"{grid[1]} x {grid[0]} points from ({grid[2]}, {grid[3]}) to ({grid[4]}, {grid[5]}) in message(s) "
            f"{[message.index for message in group][:_MAX_LISTED]}"
            for grid, group in grids.items()
        )
        raise GribInspectionError(
            f"GRIB file {path} mixes {len(grids)} grids or resolutions: {described}. Split it into one file per "
            "grid and ingest each grid as its own dataset."
        )


def _check_duplicates(messages: list[GribMessage], path: Path) -> None:
    by_field = defaultdict(list)
    for message in messages:
        by_field[message.field].append(message)
    for field, repeats in by_field.items():
        if len(repeats) < 2:
            continue
        first = _decode_values(path, repeats[0].offset)
        for repeat in repeats[1:]:
            if not np.array_equal(first, _decode_values(path, repeat.offset), equal_nan=True):
                raise GribInspectionError(
                    f"GRIB file {path} contains field {_describe_field(field)} twice with different values "
                    f"(messages {repeats[0].index} and {repeat.index}). Remove the wrong message."
                )
        logger.info(
            "GRIB file %s repeats field %s in messages %s with identical values: the repeats are dropped",
            path, _describe_field(field), [message.index for message in repeats],
        )


def _check_complete(messages: list[GribMessage], path: Path) -> None:
    """Raise when some variable lacks a combination of its levels and members with the file's times and steps.

    Times come from the whole file, so a variable that misses a time step present for
    other variables is reported too.
    """
    by_variable = defaultdict(set)
    for message in messages:
        _, _, level, date, time, step, number = message.field
        by_variable[message.field[:2]].add((level, (date, time), step, number))
    times = sorted({combination[1] for present in by_variable.values() for combination in present}, key=str)
    steps = sorted({combination[2] for present in by_variable.values() for combination in present}, key=str)

    for (short_name, level_type), present in by_variable.items():
        levels = sorted({combination[0] for combination in present}, key=str)
        members = sorted({combination[3] for combination in present}, key=str)
        absent = sorted(set(product(levels, times, steps, members)) - present, key=str)
        if absent:
            examples = ", ".join(
                f"level {level} at {date} {int(time):04d} step {step} member {number}"
                for level, (date, time), step, number in absent[:_MAX_LISTED]
            )
            raise GribInspectionError(
                f"GRIB file {path} lacks {len(absent)} field(s) of variable {short_name!r} ({level_type}) that its "
                f"other messages imply, for example {examples}. cfgrib would fill them with NaN or fail. Add the "
                "missing messages or split the file."
            )


def _decode_values(path: Path, offset: int) -> np.ndarray:
    with open(path, "rb") as stream:
        stream.seek(offset)
        handle = eccodes.codes_grib_new_from_file(stream)
        try:
            return eccodes.codes_get_values(handle)
        finally:
            eccodes.codes_release(handle)


def _describe_field(field: tuple) -> str:
    return ", ".join(f"{key}={value}" for key, value in zip(FIELD_KEYS, field, strict=True))
