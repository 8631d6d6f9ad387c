"""Reference predictions that the evaluation scores a model against.

- forecasting: `persistence`, `climatology_forecast`
- temporal interpolation: `linear_interpolation`, `cubic_interpolation`
- downscaling: `block_average` makes the coarse input, and `bilinear_upsampling` and
  `bicubic_upsampling` bring it back to the fine grid

The array functions take numpy arrays whose last three axes are
``(time, latitude, longitude)`` or, for the purely spatial ones, whose last two axes are
``(latitude, longitude)``. Any leading axes (batch, channel) pass through unchanged. The
baselines are linear in the field and their weights sum to 1, so they give the same
result in normalised and in physical units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from scipy.interpolate import CubicSpline

from tasks.metrics import climatology_at


def persistence(context: np.ndarray, n_steps: int) -> np.ndarray:
    """Repeat the last context step ``n_steps`` times: the forecast "nothing changes".

    context: [..., T, H, W] with T >= 1, the steps before the forecast.
    Returns [..., n_steps, H, W] where every step equals ``context[..., -1, :, :]``.
    """
    context = np.asarray(context)
    if context.ndim < 3 or context.shape[-3] == 0:
        raise ValueError(
            f"context must have shape [..., time, latitude, longitude] with at least one "
            f"time step, got shape {context.shape}"
        )
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")

    last = context[..., -1:, :, :]
    return np.repeat(last, n_steps, axis=-3)


def climatology_forecast(
    climatology: xr.DataArray | xr.Dataset, valid_time: xr.DataArray | np.ndarray | Sequence
) -> xr.DataArray | xr.Dataset:
    """Predict the training-period mean state at each valid time.

    climatology: output of `tasks.metrics.build_climatology`, by hour of day or by day
    of year and hour. valid_time: datetime64 values, a DataArray of any dims (for example
    ``(sample, lead_time)``) or a 1-D sequence. Returns the climatology values on the
    dims of ``valid_time`` followed by the spatial dims (see
    `tasks.metrics.climatology_at`). The forecast does not depend on the initial state,
    so its error is the same at every lead time.
    """
    return climatology_at(climatology, valid_time)


def linear_interpolation(before: np.ndarray, after: np.ndarray, n_hidden: int) -> np.ndarray:
    """Interpolate linearly in time across a gap of ``n_hidden`` equally spaced steps.

    before: [..., H, W], the last step before the gap. after: [..., H, W], the first
    step after it. Hidden step ``k`` (1-based) lies ``k / (n_hidden + 1)`` of the way from
    ``before`` to ``after``: ``before + k / (n_hidden + 1) * (after - before)``.
    Returns [..., n_hidden, H, W].
    """
    before = np.asarray(before)
    after = np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(
            f"before and after must have the same shape, got {before.shape} and {after.shape}"
        )
    if before.ndim < 2:
        raise ValueError(
            f"before and after must have shape [..., latitude, longitude], got {before.shape}"
        )
    if n_hidden < 1:
        raise ValueError(f"n_hidden must be at least 1, got {n_hidden}")

    fractions = np.arange(1, n_hidden + 1, dtype=np.float64) / (n_hidden + 1)
    fractions = fractions.reshape((n_hidden, 1, 1)).astype(np.result_type(before, np.float32))
    start = before[..., np.newaxis, :, :]
    end = after[..., np.newaxis, :, :]
    return start + fractions * (end - start)


def cubic_interpolation(before: np.ndarray, after: np.ndarray, n_hidden: int) -> np.ndarray:
    """Interpolate across a gap of ``n_hidden`` steps with a cubic spline in time.

    before: [..., K, H, W], the K >= 2 visible steps before the gap, the last one right
    before it. after: [..., K, H, W], the K visible steps after the gap, the first one
    right after it. Steps are equally spaced: the context sits at times ``-K+1 .. 0`` and
    ``n_hidden+1 .. n_hidden+K``, and the hidden steps at ``1 .. n_hidden``.
    Returns [..., n_hidden, H, W].

    At each grid point a cubic spline with not-a-knot ends (`scipy.interpolate.CubicSpline`)
    passes through the 2K context values. With K = 2 this is the one cubic polynomial
    through the four values. Any cubic in time is reproduced exactly, and a diurnal cycle
    is followed more closely than by `linear_interpolation`.
    """
    before = np.asarray(before)
    after = np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(
            f"before and after must have the same shape, got {before.shape} and {after.shape}"
        )
    if before.ndim < 3 or before.shape[-3] < 2:
        raise ValueError(
            "before and after must have shape [..., time, latitude, longitude] with at least "
            f"2 context steps each, got {before.shape}"
        )
    if n_hidden < 1:
        raise ValueError(f"n_hidden must be at least 1, got {n_hidden}")

    n_context = before.shape[-3]
    context_times = np.concatenate(
        [np.arange(-n_context + 1, 1), np.arange(n_hidden + 1, n_hidden + n_context + 1)]
    )
    context = np.concatenate([before, after], axis=-3).astype(np.float64)
    spline = CubicSpline(context_times, context, axis=-3, bc_type="not-a-knot")
    hidden = spline(np.arange(1, n_hidden + 1))
    return hidden.astype(np.result_type(before.dtype, np.float32))


def block_average(field: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping ``factor`` x ``factor`` blocks of the last two axes.

    field: [..., H, W] with H and W multiples of ``factor``.
    Returns [..., H / factor, W / factor], where output cell (i, j) is the mean of
    ``field[..., i*factor:(i+1)*factor, j*factor:(j+1)*factor]``. The mean is unweighted,
    although cos(latitude) changes by about 3 % across a 1 degree block at 60 N.
    """
    field = np.asarray(field)
    if factor < 1:
        raise ValueError(f"factor must be at least 1, got {factor}")
    if field.ndim < 2:
        raise ValueError(f"field must have shape [..., latitude, longitude], got {field.shape}")
    height, width = field.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"field grid {height} x {width} is not divisible by the coarsening factor "
            f"{factor}: crop the grid to a multiple of {factor}"
        )

    blocks = field.reshape(*field.shape[:-2], height // factor, factor, width // factor, factor)
    return blocks.mean(axis=(-3, -1))


def _upsample(coarse: np.ndarray, factor: int, mode: str) -> np.ndarray:
    """Upsample [..., h, w] to [..., h * factor, w * factor] with torch interpolation."""
    coarse = np.asarray(coarse)
    if factor < 1:
        raise ValueError(f"factor must be at least 1, got {factor}")
    if coarse.ndim < 2:
        raise ValueError(f"coarse must have shape [..., latitude, longitude], got {coarse.shape}")

    leading_shape = coarse.shape[:-2]
    height, width = coarse.shape[-2:]
    images = torch.from_numpy(
        np.ascontiguousarray(coarse, dtype=np.float64).reshape(-1, 1, height, width)
    )
    upsampled = F.interpolate(
        images, size=(height * factor, width * factor), mode=mode, align_corners=False
    )
    result = upsampled.numpy().reshape(*leading_shape, height * factor, width * factor)
    return result.astype(np.result_type(coarse.dtype, np.float32))


def bilinear_upsampling(coarse: np.ndarray, factor: int) -> np.ndarray:
    """Upsample block averages ``factor`` times with bilinear interpolation.

    coarse: [..., h, w], values of ``block_average`` output.
    Returns [..., h * factor, w * factor].

    Each coarse value sits at the centre of its block, as in `bicubic_upsampling`, and
    fine pixel ``i`` maps to the coarse coordinate ``(i + 0.5) / factor - 0.5``. Between
    block centres the value is linear in each direction, so a field linear in latitude
    and longitude comes back exactly there. In the outer half block the coordinate is
    clamped to the edge, so the edge centre value is repeated.
    """
    return _upsample(coarse, factor, "bilinear")


def bicubic_upsampling(coarse: np.ndarray, factor: int) -> np.ndarray:
    """Upsample block averages ``factor`` times with bicubic interpolation.

    coarse: [..., h, w], values of ``block_average`` output.
    Returns [..., h * factor, w * factor].

    Each coarse value sits at the centre of its block. Fine pixel ``i`` therefore maps to
    the coarse coordinate ``(i + 0.5) / factor - 0.5``, which is what
    `torch.nn.functional.interpolate` computes with ``align_corners=False``. The kernel is
    torch's cubic convolution with a = -0.75, and samples beyond the edge repeat the edge
    value. The weights sum to 1, so a constant field comes back unchanged. With a = -0.75
    a linear ramp is not reproduced exactly: the error alternates in sign inside each
    block, so block means are kept away from the border.
    """
    return _upsample(coarse, factor, "bicubic")
