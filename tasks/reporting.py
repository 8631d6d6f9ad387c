"""Log an evaluation to MLflow: metrics, score files, plots and a markdown report."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from mlflow.entities import Metric

from tasks.evaluate import EvaluationResult
from tasks.plots import plot_maps, plot_skill, plot_spectra
from tasks.scoring import (
    BASELINES,
    ENSEMBLE_METRICS,
    METRICS,
    SCORE_DIMS,
    SPECTRAL_METRICS,
    UNITLESS_METRICS,
    score_label,
)
from tasks.tracking import client

logger = logging.getLogger(__name__)

# MLflow accepts at most 1000 metrics in one log_batch call.
METRICS_PER_BATCH = 1000
# Scores drawn against lead time, gap and factor; the ensemble ones only for an ensemble model.
SKILL_METRICS = ("rmse", "acc", "crps", "spread_skill_ratio")
SCORES_FILE = "scores.nc"


@dataclass(frozen=True)
class EvaluationReport:
    """RMSE rows, markdown report and plot paths (relative to the run's artifacts) of one logged evaluation."""

    rows: list[dict]
    markdown: str
    plots: list[str]


def rmse_rows(result: EvaluationResult) -> list[dict]:
    """Return the RMSE rows of the score table, one per baseline, rounded to 4 significant digits for display."""
    table = result.table[result.table["metric"] == "rmse"]
    rows = []
    for record in table.to_dict(orient="records"):
        rows.append(
            {
                "task": record["task"],
                "variable": record["variable"],
                "lead_or_gap": record["lead_or_gap"],
                "model": float(f"{record['model']:.4g}"),
                "baseline": record["baseline"],
                "baseline_value": float(f"{record['baseline_value']:.4g}"),
                "difference": float(f"{record['difference']:.4g}"),
            }
        )
    return rows


def _format_score(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4g}"


def _score_table(data: xr.DataArray, task: str) -> list[str]:
    """Render one task's score as a markdown table: rows variable and label, columns model and baselines."""
    dim = SCORE_DIMS[task]
    predictors = ["model", *BASELINES[task]]
    lines = [
        "| variable | " + dim.replace("_", " ") + " | " + " | ".join(predictors) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in predictors) + " |",
    ]
    for variable in data["variable"].values:
        units = str(data["units"].sel(variable=variable).values) if "units" in data.coords else ""
        for value in data[dim].values:
            point = data.sel(variable=variable, **{dim: value})
            cells = [_format_score(float(point.sel(predictor=name))) for name in predictors]
            name = f"{variable} ({units})" if units and data.attrs.get("metric") not in UNITLESS_METRICS else str(variable)
            lines.append(f"| {name} | {score_label(task, int(value))} | " + " | ".join(cells) + " |")
    return lines


def _task_plots(task: str, plots: list[str]) -> list[str]:
    """Select the plots of one task by their file names (see `write_plots`)."""
    names = {path: Path(path).name for path in plots}
    selected = [path for path, name in names.items() if name.startswith(f"{task}") or f"_{task}_" in name]
    if task == "downscaling":
        selected += [path for path, name in names.items() if name.startswith("spectrum_")]
    return selected


def markdown_report(title: str, scores: xr.Dataset, plots: list[str] = ()) -> str:
    """Render every score of every task as markdown tables under `title`, with the plots linked.

    plots: artifact paths relative to the report, such as ``plots/skill_forecast_rmse.png``.
    """
    attrs = scores.attrs
    n_samples = attrs.get("n_samples", "?")
    windows = "window" if n_samples == 1 else "windows"
    lines = [
        f"# {title}",
        "",
        f"Test period {' to '.join(map(str, attrs.get('period', [])))}, {n_samples} {windows}, "
        f"climatology ({attrs.get('climatology_kind', '?')}) from the training period "
        f"{' to '.join(map(str, attrs.get('train_period', [])))}.",
        "Scores in physical units, weighted by the cosine of latitude; ACC is the uncentred anomaly correlation. "
        "n/a marks a score that is not defined, such as the ACC of the climatology itself.",
    ]
    for task in SCORE_DIMS:
        present = [metric for metric in (*METRICS, *ENSEMBLE_METRICS, *SPECTRAL_METRICS) if f"{task}_{metric}" in scores]
        if not present:
            continue
        lines += ["", f"## {task}", "", f"Baselines: {', '.join(BASELINES[task])}."]
        for metric in present:
            lines += ["", f"### {metric.replace('_', ' ')}", ""]
            lines += _score_table(scores[f"{task}_{metric}"], task)
        task_plots = _task_plots(task, plots)
        if task_plots:
            lines += ["", "Plots: " + ", ".join(f"[{Path(path).name}]({path})" for path in task_plots)]
    return "\n".join(lines) + "\n"


def log_metrics_batched(run_id: str, metrics: dict[str, float]) -> None:
    """Log metrics at step 0 in batches of up to 1000, as one call each costs a store round trip."""
    mlflow_client = client()
    timestamp = int(time.time() * 1000)
    entries = [Metric(name, float(value), timestamp, 0) for name, value in metrics.items()]
    for first in range(0, len(entries), METRICS_PER_BATCH):
        mlflow_client.log_batch(run_id, metrics=entries[first : first + METRICS_PER_BATCH])


def write_plots(result: EvaluationResult, folder: Path) -> list[Path]:
    """Draw every evaluation plot into `folder` and return the paths.

    - ``skill_<task>_<metric>.png``: RMSE and ACC (and CRPS and spread-skill ratio for an
      ensemble) against lead time, gap or factor for the model and each baseline, one
      panel per variable,
    - ``<example>_map_<variable>.png``: truth, prediction, errors and spread of one sample
      at the example's map time, per example of `EvaluationResult.examples`,
    - ``spectrum_factor_<f>.png``: downscaling power spectra per factor.
    """
    paths = []
    for task in SCORE_DIMS:
        for metric in SKILL_METRICS:
            if f"{task}_{metric}" in result.scores:
                paths.append(plot_skill(result.scores, folder / f"skill_{task}_{metric}.png", task, metric))
    for key, example in result.examples.items():
        for variable in example["variable"].values:
            paths.append(plot_maps(example, folder / f"{key}_map_{variable}.png", variable=str(variable)))
    if "downscaling_spectrum" in result.scores:
        for factor in result.scores["factor"].values:
            paths.append(plot_spectra(result.scores, folder / f"spectrum_factor_{int(factor)}.png", int(factor)))
    return paths


def log_evaluation(run_id: str, result: EvaluationResult, title: str) -> EvaluationReport:
    """Log metrics, `scores.nc`, `scores.csv`, `report.md` and PNG plots (`write_plots`) to the run."""
    log_metrics_batched(run_id, result.metrics)
    rows = rmse_rows(result)
    mlflow_client = client()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        plot_folder = folder / "plots"
        plot_paths = [f"plots/{path.name}" for path in write_plots(result, plot_folder)]
        markdown = markdown_report(title, result.scores, plot_paths)

        result.scores.to_netcdf(folder / SCORES_FILE, engine="h5netcdf")
        result.table.to_csv(folder / "scores.csv", index=False)
        (folder / "report.md").write_text(markdown)
        for name in (SCORES_FILE, "scores.csv", "report.md"):
            mlflow_client.log_artifact(run_id, str(folder / name))
        mlflow_client.log_artifacts(run_id, str(plot_folder), artifact_path="plots")

    logger.info("Logged %d metrics and %d plots to run %s", len(result.metrics), len(plot_paths), run_id)
    return EvaluationReport(rows=rows, markdown=markdown, plots=plot_paths)


def open_scores(path: str | Path) -> xr.Dataset:
    """Load a `scores.nc` artifact into memory, with its list attributes as lists."""
    with xr.open_dataset(path, engine="h5netcdf") as stored:
        scores = stored.load()
    for name in scores.data_vars:
        if "baselines" in scores[name].attrs:
            scores[name].attrs["baselines"] = [str(item) for item in np.atleast_1d(scores[name].attrs["baselines"])]
    return scores
