"""PNG figures: zero-shot example maps, skill curves and masked autoencoder reconstructions.

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

logger = logging.getLogger(__name__)

SKILL_AXES = {
    "forecast": ("lead_time", "lead time (h)"),
    "interpolation": ("gap", "gap length (h)"),
    "downscaling": ("factor", "coarsening factor"),
}


def _save_atomically(figure: Figure, path: Path) -> Path:
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
    time_index: int = -1,
) -> Path:
    """Draw truth, prediction and error maps of one evaluation example as a PNG.

    example: an entry of `EvaluationResult.examples`, with ``truth``, ``prediction`` and
    ``baseline`` of dims (variable, time, latitude, longitude) in physical units.
    The panels are truth, prediction, prediction minus truth and baseline minus truth at
    one time step (the last scored step by default) of one variable (the first by
    default). Truth and prediction share one colour scale, and the two errors share a
    symmetric one. Returns the path written.
    """
    if variable is None:
        variable = str(example["variable"].values[0])
    if variable not in example["variable"].values:
        raise ValueError(
            f"variable {variable!r} not found in the example; it has {example['variable'].values.tolist()}"
        )
    frame = example.sel(variable=variable).isel(time=time_index)
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

    figure = Figure(figsize=(16, 3.8), layout="constrained")
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
    return _save_atomically(figure, Path(path))


def plot_skill(scores: xr.Dataset, path: str | Path, metric: str = "rmse") -> Path:
    """Plot a score against lead time, gap length and coarsening factor, model versus baseline.

    scores: `EvaluationResult.scores`. One panel per task present in ``scores``. Each
    variable gets a solid line for the model and a dashed line for the task's baseline.
    Returns the path written.
    """
    tasks = [task for task in SKILL_AXES if f"{task}_{metric}" in scores]
    if not tasks:
        raise ValueError(
            f"scores contain no {metric!r} variables; they have {sorted(scores.data_vars)}"
        )

    figure = Figure(figsize=(5 * len(tasks), 4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(tasks)))
    for ax, task in zip(axes, tasks, strict=True):
        data = scores[f"{task}_{metric}"]
        dim, axis_label = SKILL_AXES[task]
        baseline_name = data.attrs.get("baseline", "baseline")
        for index, variable in enumerate(data["variable"].values):
            colour = f"C{index}"
            series = data.sel(variable=variable)
            x = series[dim].values
            ax.plot(x, series.sel(predictor="model").values, "o-", color=colour, label=f"model {variable}")
            ax.plot(
                x, series.sel(predictor="baseline").values, "s--", color=colour, label=f"{baseline_name} {variable}"
            )
        units = sorted(set(str(unit) for unit in data["units"].values)) if "units" in data.coords else []
        ax.set_title(task)
        ax.set_xlabel(axis_label)
        ax.set_xticks(data[dim].values)
        ax.set_ylabel(f"{metric.upper()} ({', '.join(units)})" if units else metric.upper())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save_atomically(figure, Path(path))


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
    return _save_atomically(figure, Path(path))
