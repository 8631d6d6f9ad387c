"""`atmorep compare`: several evaluation runs side by side, from their `scores.nc` artifacts.

Each run's scores are the `tasks.evaluate.EvaluationResult.scores` Dataset that
`tasks.reporting.log_evaluation` logged. The comparison has one row per task, variable
and lead time, gap or factor, one column per run with the model's score, and one column
per baseline, taken from the first run that has the row. Baselines depend only on the
data and the evaluation settings, so runs on the same dataset and period share them. A
run whose baseline differs is logged as a warning.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from mlflow.exceptions import MlflowException

from data_catalog.workspace import atmorep_home
from tasks.scoring import BASELINES, SCORE_DIMS, score_label
from tasks.plots import metric_label, panel_grid, save_figure
from tasks.reporting import SCORES_FILE, open_scores
from tasks.tracking import TAG_STAGE, client

logger = logging.getLogger(__name__)

# Relative difference above which two runs' baselines are reported as different.
BASELINE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Evaluation:
    """One evaluation run's scores with a short label such as ``evaluate 1a2b3c4d``."""

    run_id: str
    label: str
    scores: xr.Dataset


def load_evaluation(run_id: str) -> Evaluation:
    """Download and open the `scores.nc` artifact of an MLflow run.

    Raises LookupError when the run does not exist or has no `scores.nc` (it is not an
    evaluation, or it was logged before the scores were stored).
    """
    mlflow_client = client()
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as error:
        raise LookupError(f"MLflow run {run_id!r} not found in {mlflow_client.tracking_uri}: {error.message}") from error
    artifacts = {item.path for item in mlflow_client.list_artifacts(run_id)}
    if SCORES_FILE not in artifacts:
        raise LookupError(
            f"MLflow run {run_id} has no {SCORES_FILE} artifact (it has {sorted(artifacts)}): pass the run of an "
            "`atmorep evaluate zero-shot` or `atmorep finetune` stage"
        )
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow_client.download_artifacts(run_id, SCORES_FILE, folder)
        scores = open_scores(path)
    stage = run.data.tags.get(TAG_STAGE, run.info.run_name or "run")
    return Evaluation(run_id=run_id, label=f"{stage} {run_id[:8]}", scores=scores)


def _unique_labels(evaluations: Sequence[Evaluation]) -> list[str]:
    """Return the runs' labels, lengthening the run id part where two labels are equal."""
    labels = [evaluation.label for evaluation in evaluations]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{evaluation.label.split(' ')[0]} {evaluation.run_id}" for evaluation in evaluations]


def comparison_table(evaluations: Sequence[Evaluation], metric: str = "rmse") -> pd.DataFrame:
    """Set one metric of several evaluations side by side.

    Returns a DataFrame with columns ``task``, ``variable``, ``lead_or_gap``, one column
    per run label (the model's score) and one per baseline, sorted by task, variable (in
    first-seen order) and lead, gap or factor. A run without a row or metric has NaN
    there. Raises ValueError when no run has the metric.
    """
    labels = _unique_labels(evaluations)
    records: dict[tuple[str, str, str], dict] = {}
    differing: dict[str, list[str]] = {}
    found = False
    for label, evaluation in zip(labels, evaluations, strict=True):
        for task, dim in SCORE_DIMS.items():
            key = f"{task}_{metric}"
            if key not in evaluation.scores:
                continue
            found = True
            data = evaluation.scores[key]
            for variable in data["variable"].values:
                for value in data[dim].values:
                    row_key = (task, str(variable), score_label(task, int(value)))
                    record = records.setdefault(
                        row_key, {"task": task, "variable": row_key[1], "lead_or_gap": row_key[2], "_order": int(value)}
                    )
                    point = data.sel(variable=variable, **{dim: value})
                    record[label] = float(point.sel(predictor="model"))
                    if _add_baselines(record, point, task):
                        differing.setdefault(label, []).append(" ".join(row_key))
    if not found:
        available = sorted({name for evaluation in evaluations for name in evaluation.scores.data_vars})
        raise ValueError(f"no run has scores of metric {metric!r}; the scores hold {available}")
    for label, rows in differing.items():
        logger.warning(
            "the baselines of run %s differ from those of the first run in these rows: %s. The runs were "
            "evaluated on different windows, data or settings, and the table shows the first run's baselines",
            label, ", ".join(rows),
        )

    table = pd.DataFrame(list(records.values()))
    task_order = {task: index for index, task in enumerate(SCORE_DIMS)}
    variable_order = {variable: index for index, variable in enumerate(dict.fromkeys(table["variable"]))}
    table = table.sort_values(
        ["task", "variable", "_order"],
        key=lambda column: column.map(task_order) if column.name == "task"
        else column.map(variable_order) if column.name == "variable" else column,
        kind="stable",
    ).reset_index(drop=True)
    baseline_columns = [name for task in SCORE_DIMS for name in BASELINES[task] if name in table.columns]
    return table[["task", "variable", "lead_or_gap", *labels, *baseline_columns]]


def _add_baselines(record: dict, point: xr.DataArray, task: str) -> bool:
    """Fill the row's baseline columns from the first run that has them; return True when this run's differ."""
    differs = False
    for baseline in BASELINES[task]:
        if baseline not in point["predictor"].values:
            continue
        value = float(point.sel(predictor=baseline))
        previous = record.get(baseline)
        if previous is None or not np.isfinite(previous):
            record[baseline] = value
        elif np.isfinite(value) and abs(value - previous) > BASELINE_TOLERANCE * max(abs(previous), 1.0):
            differs = True
    return differs


def format_comparison(table: pd.DataFrame, metric: str) -> str:
    """Render a comparison table as aligned plain text, 4 significant digits, ``n/a`` for missing scores."""
    columns = list(table.columns)
    value_columns = columns[3:]
    widths = {
        column: max(len(column), *(len(_cell(value)) for value in table[column])) if len(table) else len(column)
        for column in columns
    }
    lines = [f"{metric} per task, variable and lead time, gap or factor (model of each run, then the baselines)", ""]
    lines.append("  ".join(column.ljust(widths[column]) if column not in value_columns else column.rjust(widths[column])
                           for column in columns))
    for _, row in table.iterrows():
        cells = []
        for column in columns:
            text = _cell(row[column])
            cells.append(text.rjust(widths[column]) if column in value_columns else text.ljust(widths[column]))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


def plot_comparison(table: pd.DataFrame, evaluations: Sequence[Evaluation], metric: str, folder: Path) -> list[Path]:
    """Draw the metric against lead time, gap or factor per task, one panel per variable.

    Each run is a solid line and each baseline a dashed one. Writes
    ``compare_<task>_<metric>.png`` into `folder` and returns the paths.
    """
    labels = _unique_labels(evaluations)
    units = {}
    for evaluation in evaluations:
        if "units" in evaluation.scores.coords:
            units.update(zip(evaluation.scores["variable"].values.tolist(), evaluation.scores["units"].values.tolist()))

    paths = []
    for task in SCORE_DIMS:
        rows = table[table["task"] == task]
        if rows.empty:
            continue
        variables = list(dict.fromkeys(rows["variable"]))
        figure, axes = panel_grid(len(variables))
        for ax, variable in zip(axes, variables, strict=True):
            series = rows[rows["variable"] == variable]
            x = [int("".join(ch for ch in label if ch.isdigit())) for label in series["lead_or_gap"]]
            for index, label in enumerate(labels):
                ax.plot(x, series[label].to_numpy(dtype=float), "o-", color=f"C{index}", label=label)
            for offset, baseline in enumerate(name for name in BASELINES[task] if name in series.columns):
                values = series[baseline].to_numpy(dtype=float)
                if np.isfinite(values).any():
                    ax.plot(x, values, "s--", color=f"C{len(labels) + offset}", label=baseline)
            ax.set_title(variable)
            ax.set_xlabel({"forecast": "lead time (h)", "interpolation": "gap length (h)",
                           "downscaling": "coarsening factor"}[task])
            ax.set_xticks(sorted(set(x)))
            ax.set_ylabel(metric_label(metric, str(units.get(variable, ""))))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        figure.suptitle(f"{task}: {metric.replace('_', ' ')} of {len(labels)} runs")
        paths.append(save_figure(figure, folder / f"compare_{task}_{metric}.png"))
    return paths


def compare_runs(run_ids: Sequence[str], metric: str = "rmse", output: str | Path | None = None) -> tuple[str, list[Path]]:
    """Compare the evaluations of several MLflow runs: return the text table and the files written.

    output: folder for ``comparison_<metric>.csv`` and the plots, by default
    ``$ATMOREP_HOME/comparisons/<first 8 digits of each run id>``.
    """
    if len(run_ids) < 1:
        raise ValueError("give at least one MLflow run id to compare")
    repeated = sorted({run_id for run_id in run_ids if list(run_ids).count(run_id) > 1})
    if repeated:
        raise ValueError(f"run ids {repeated} are given more than once: give each run once")
    evaluations = [load_evaluation(run_id) for run_id in run_ids]
    table = comparison_table(evaluations, metric)

    folder = Path(output) if output is not None else atmorep_home() / "comparisons" / "-".join(r[:8] for r in run_ids)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / f"comparison_{metric}.csv"
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as stream:
        table.to_csv(stream, index=False)
    Path(stream.name).replace(csv_path)
    paths = [csv_path, *plot_comparison(table, evaluations, metric, folder)]
    logger.info("compared %d runs: %s", len(run_ids), ", ".join(str(path) for path in paths))
    return format_comparison(table, metric), paths
