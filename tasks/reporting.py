"""Log an evaluation to MLflow: metrics, score files, plots and a markdown report."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks.evaluate import EvaluationResult
from tasks.plots import plot_maps, plot_skill
from tasks.tracking import client, log_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationReport:
    """RMSE rows and markdown report of one logged evaluation."""

    rows: list[dict]
    markdown: str


def rmse_rows(result: EvaluationResult) -> list[dict]:
    """Return the RMSE rows of the score table, rounded for display."""
    table = result.table[result.table["metric"] == "rmse"]
    rows = []
    for record in table.to_dict(orient="records"):
        rows.append(
            {
                "task": record["task"],
                "variable": record["variable"],
                "lead_or_gap": record["lead_or_gap"],
                "model": round(float(record["model"]), 4),
                "baseline": record["baseline"],
                "baseline_value": round(float(record["baseline_value"]), 4),
                "difference": round(float(record["difference"]), 4),
            }
        )
    return rows


def markdown_report(title: str, rows: list[dict]) -> str:
    """Render the RMSE rows as a markdown table under `title`."""
    lines = [
        f"# {title}",
        "",
        "RMSE in physical units on the test period, weighted by the cosine of latitude.",
        "",
        "| task | variable | lead or gap | model | baseline | baseline RMSE | model - baseline |",
        "| --- | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['task']} | {row['variable']} | {row['lead_or_gap']} | {row['model']:.3f} "
            f"| {row['baseline']} | {row['baseline_value']:.3f} | {row['difference']:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def log_evaluation(run_id: str, result: EvaluationResult, title: str) -> EvaluationReport:
    """Log metrics, `scores.nc`, `scores.csv`, `report.md` and PNG plots to the run.

    Plots: `plots/skill.png` (RMSE against lead time, gap and factor for the model and
    each baseline) and `plots/<task>_map.png` (truth, prediction and errors of one sample).
    """
    log_metrics(run_id, result.metrics)
    rows = rmse_rows(result)
    markdown = markdown_report(title, rows)
    mlflow_client = client()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        result.scores.to_netcdf(folder / "scores.nc", engine="h5netcdf")
        result.table.to_csv(folder / "scores.csv", index=False)
        (folder / "report.md").write_text(markdown)
        for name in ("scores.nc", "scores.csv", "report.md"):
            mlflow_client.log_artifact(run_id, str(folder / name))

        plots = folder / "plots"
        plots.mkdir()
        plot_skill(result.scores, plots / "skill.png")
        for task, example in result.examples.items():
            plot_maps(example, plots / f"{task}_map.png")
        mlflow_client.log_artifacts(run_id, str(plots), artifact_path="plots")

    logger.info("Logged %d metrics and %d plots to run %s", len(result.metrics), len(result.examples) + 1, run_id)
    return EvaluationReport(rows=rows, markdown=markdown)
