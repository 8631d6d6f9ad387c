"""PNG figures: zero-shot example maps, skill curves, power spectra and masked autoencoder reconstructions.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so plotting
changes no global backend state and works without a display. Every PNG is written to a
temporary file in the target folder and renamed into place.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tasks.scoring import UNITLESS_METRICS

logger = logging.getLogger(__name__)


SKILL_AXES = {
    "forecast": ("lead_time", "lead time (h)"),
    "interpolation": ("gap", "gap length (h)"),
    "downscaling": ("factor", "coarsening factor"),
}


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a figure as PNG through a temporary file and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.savefig(stream, format="png", dpi=100)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.info("wrote %s", path)
    return path


def plot_maps(
    example: xr.Dataset,
    path: str | Path,
    variable: str | None = None,
    time: str | np.datetime64 | None = None,
) -> Path:
    """Draw truth, prediction, error and spread maps of one evaluation example as a PNG.

    example: an entry of `EvaluationResult.examples`, with ``truth``, ``prediction``,
    ``baseline`` and, for an ensemble, ``spread``, of dims (variable, time, latitude,
    longitude) in physical units. The panels are truth, prediction, prediction minus
    truth, baseline minus truth and the ensemble spread when present, at one time step of
    one variable (the first by default). The step is `time`, else the example's
    ``map_time`` attribute, else the last step. Truth and prediction share one colour
    scale, and the two errors share a symmetric one. Returns the path written.
    """
    if variable is None:
        variable = str(example["variable"].values[0])
    if variable not in example["variable"].values:
        raise ValueError(
            f"variable {variable!r} not found in the example; it has {example['variable'].values.tolist()}"
        )
    chosen = time if time is not None else example.attrs.get("map_time")
    frame = example.sel(variable=variable)
    if chosen is None:
        frame = frame.isel(time=-1)
    else:
        stamp = np.datetime64(str(chosen), "ns")
        if stamp not in frame["time"].values:
            raise ValueError(
                f"time {chosen} is not a step of the example, whose steps run from "
                f"{frame['time'].values[0]} to {frame['time'].values[-1]}"
            )
        frame = frame.sel(time=stamp)
    units = str(frame["units"].values) if "units" in frame.coords else ""
    baseline_name = example.attrs.get("baseline", "baseline")

    truth = frame["truth"].values
    prediction = frame["prediction"].values
    model_error = prediction - truth
    baseline_error = frame["baseline"].values - truth

    field_limits = (float(min(truth.min(), prediction.min())), float(max(truth.max(), prediction.max())))
    error_limit = float(max(np.abs(model_error).max(), np.abs(baseline_error).max(), 1e-6))
    panels = [
        ("truth", truth, "viridis", field_limits),
        ("prediction", prediction, "viridis", field_limits),
        ("prediction - truth", model_error, "RdBu_r", (-error_limit, error_limit)),
        (f"{baseline_name} - truth", baseline_error, "RdBu_r", (-error_limit, error_limit)),
    ]
    if "spread" in frame:
        spread = frame["spread"].values
        panels.append(("ensemble spread", spread, "magma", (0.0, float(max(spread.max(), 1e-6)))))

    figure = Figure(figsize=(4 * len(panels), 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels), sharey=True)
    longitude = frame["longitude"].values
    latitude = frame["latitude"].values
    for ax, (title, values, colormap, (low, high)) in zip(axes, panels, strict=True):
        mesh = ax.pcolormesh(longitude, latitude, values, cmap=colormap, vmin=low, vmax=high, shading="nearest")
        figure.colorbar(mesh, ax=ax, label=f"{variable} ({units})" if units else variable)
        ax.set_title(title)
        ax.set_xlabel("longitude (°E)")
        ax.set_aspect(1 / np.cos(np.deg2rad(latitude.mean())))
    axes[0].set_ylabel("latitude (°N)")

    valid_time = np.datetime_as_string(frame["time"].values, unit="m")
    figure.suptitle(f"{example.attrs.get('title', '')}: {variable} at {valid_time}")
    return save_figure(figure, Path(path))


def panel_grid(count: int, columns: int = 4) -> tuple[Figure, list]:
    """Return a figure with `count` panels of 4 x 3.2 inches in rows of at most `columns`.

    The figure is at least 6 inches wide so that a title fits above a single panel.
    """
    n_columns = min(columns, count)
    n_rows = -(-count // n_columns)
    figure = Figure(figsize=(max(6.0, 4.0 * n_columns), 3.2 * n_rows + 0.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(n_rows, n_columns, squeeze=False)).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, list(axes[:count])


def metric_label(metric: str, units: str) -> str:
    """Return an axis label such as ``rmse (K)``, without units for a ratio or correlation."""
    if metric in UNITLESS_METRICS or not units:
        return metric.replace("_", " ")
    return f"{metric.replace('_', ' ')} ({units})"


def plot_skill(scores: xr.Dataset, path: str | Path, task: str, metric: str = "rmse") -> Path:
    """Plot one score of one task against lead time, gap length or factor, one panel per variable.

    scores: `EvaluationResult.scores`. Each panel has a solid line for the model and a
    dashed line for each of the task's baselines, whose values are NaN-free. Returns the
    path written.
    """
    key = f"{task}_{metric}"
    if task not in SKILL_AXES:
        raise ValueError(f"unknown task {task!r}: use one of {list(SKILL_AXES)}")
    if key not in scores:
        raise ValueError(f"scores contain no {key!r}; they have {sorted(scores.data_vars)}")

    data = scores[key]
    dim, axis_label = SKILL_AXES[task]
    predictors = ["model", *[str(name) for name in np.atleast_1d(data.attrs.get("baselines", []))]]
    variables = [str(name) for name in data["variable"].values]
    figure, axes = panel_grid(len(variables))
    for ax, variable in zip(axes, variables, strict=True):
        series = data.sel(variable=variable)
        x = series[dim].values
        for index, predictor in enumerate(predictors):
            values = series.sel(predictor=predictor).values
            if not np.isfinite(values).any():
                continue
            style = "o-" if predictor == "model" else "s--"
            ax.plot(x, values, style, color=f"C{index}", label=predictor)
        units = str(series["units"].values) if "units" in series.coords else ""
        ax.set_title(variable)
        ax.set_xlabel(axis_label)
        ax.set_xticks(x)
        ax.set_ylabel(metric_label(metric, units))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(f"{task}: {metric.replace('_', ' ')}")
    return save_figure(figure, Path(path))


def plot_spectra(scores: xr.Dataset, path: str | Path, factor: int) -> Path:
    """Plot the downscaling power spectra along longitude at one factor, one panel per variable.

    scores: `EvaluationResult.scores` with ``downscaling_spectrum``. Each panel shows the
    truth, the model and each upsampling baseline on log-log axes against wavenumber
    (cycles per crop width). Returns the path written.
    """
    if "downscaling_spectrum" not in scores:
        raise ValueError(f"scores contain no 'downscaling_spectrum'; they have {sorted(scores.data_vars)}")
    spectra = scores["downscaling_spectrum"]
    if factor not in spectra["factor"].values:
        raise ValueError(f"factor {factor} was not evaluated: the spectra have factors {spectra['factor'].values.tolist()}")

    spectra = spectra.sel(factor=factor)
    variables = [str(name) for name in spectra["variable"].values]
    figure, axes = panel_grid(len(variables))
    for ax, variable in zip(axes, variables, strict=True):
        for index, name in enumerate(spectra["spectrum_of"].values):
            line = spectra.sel(variable=variable, spectrum_of=name).dropna("wavenumber")
            style, colour = "--", f"C{index}"
            if name == "truth":
                style, colour = "-", "black"
            elif name == "model":
                style = "o-"
            ax.loglog(line["wavenumber"].values, line.values, style, color=colour, label=str(name), markersize=3)
        units = str(spectra["units"].sel(variable=variable).values) if "units" in spectra.coords else ""
        ax.set_title(variable)
        ax.set_xlabel("wavenumber (cycles per crop width)")
        ax.set_ylabel(f"power [({units})^2]" if units else "power")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(f"downscaling, factor {factor}: power spectra along longitude")
    return save_figure(figure, Path(path))


def plot_reconstructions(columns: dict[str, np.ndarray], path: str | Path, title: str | None = None) -> Path:
    """Draw one row per image and one column per panel, such as original, masked input and reconstruction.

    columns: column title -> RGB images [n, H, W, 3] with values in [0, 1], the same n
    for every column (`models.mae.Reconstructions.columns()` has this form). Each cell
    takes 2 x 2 inches at 100 dpi and a title adds 0.4 inches, so the PNG is
    200 * columns pixels wide and 200 * n (+ 40 with a title) pixels high. Returns the path written.
    """
    if not columns:
        raise ValueError("columns is empty: give at least one panel of images [n, H, W, 3]")
    shapes = {name: np.shape(images) for name, images in columns.items()}
    invalid = {name: shape for name, shape in shapes.items() if len(shape) != 4 or shape[-1] != 3}
    if invalid:
        raise ValueError(f"panels {invalid} are not RGB images [n, H, W, 3]")
    counts = {shape[0] for shape in shapes.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"panels must contain the same positive number of images, got shapes {shapes}")

    rows = counts.pop()
    figure = Figure(figsize=(2.0 * len(columns), 2.0 * rows + (0.4 if title else 0.0)), layout="constrained")
    axes = figure.subplots(rows, len(columns), squeeze=False)
    for column, (name, images) in enumerate(columns.items()):
        axes[0, column].set_title(name, fontsize="small")
        for row in range(rows):
            axes[row, column].imshow(np.clip(images[row], 0.0, 1.0), interpolation="nearest")
            axes[row, column].set_axis_off()
    if title:
        figure.suptitle(title)
    return save_figure(figure, Path(path))
