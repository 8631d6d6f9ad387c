"""`evaluate/zero-shot`: score a pretrained model on the test period against baselines."""

from __future__ import annotations

from collections.abc import Sequence

import xarray as xr
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from data_catalog import Catalog
from flows.common import stage_run
from flows.params import EvaluateParams
from models.checkpoint import load_model
from tasks.evaluate import DEFAULT_DOWNSCALING_FACTORS, check_evaluation_inputs, evaluate_zero_shot
from tasks.registry import download_checkpoint, resolve_model
from tasks.reporting import log_evaluation

fetch_checkpoint = task(download_checkpoint, name="download-checkpoint", retries=2, retry_delay_seconds=5)
score = task(evaluate_zero_shot, name="evaluate-zero-shot")
report = task(log_evaluation, name="log-evaluation", retries=2, retry_delay_seconds=5)


def evaluate_and_report(
    run_id: str,
    model,
    config,
    dataset: xr.Dataset,
    window_stride: int,
    batch_size: int,
    title: str,
    downscaling_factors: Sequence[int] = DEFAULT_DOWNSCALING_FACTORS,
    map_time: str | None = None,
) -> dict:
    """Score `model` on the test period of `dataset`, log everything to the run and to Prefect.

    The flow run gets a table artifact with the RMSE of the model and every baseline and
    a markdown artifact with the whole report. Returns the run id, the flat metrics and
    the RMSE rows.
    """
    result = score(
        model, config, dataset, window_stride=window_stride, batch_size=batch_size,
        downscaling_factors=downscaling_factors, map_time=map_time,
    )
    evaluation = report(run_id, result, title)

    artifact_key = title.lower().replace(" ", "-")
    create_table_artifact(
        evaluation.rows, key=f"{artifact_key}-scores", description=f"{title}: RMSE of the model and baselines"
    )
    create_markdown_artifact(
        evaluation.markdown,
        key=f"{artifact_key}-report",
        description=f"{title}: every score, with plots under plots/ in MLflow run {run_id}",
    )
    get_run_logger().info("%s: %d metrics and %d plots logged to MLflow run %s", title, len(result.metrics),
                          len(evaluation.plots), run_id)
    return {"run_id": run_id, "metrics": result.metrics, "rows": evaluation.rows}


@flow(name="evaluate", flow_run_name="zero-shot")
def evaluate(params: EvaluateParams = EvaluateParams()) -> dict:
    """Evaluate forecasting, temporal interpolation and downscaling with no further training."""
    resolved = resolve_model(params.model_uri)
    model, config = load_model(fetch_checkpoint(resolved.run_id))

    catalog = Catalog()
    entry = catalog.get(params.dataset or config.train.dataset)
    dataset = catalog.open_dataset(entry.name)

    check_evaluation_inputs(
        config, dataset, downscaling_factors=params.downscaling_factors, map_time=params.map_time,
        window_stride=params.window_stride,
    )
    upstream = params.upstream_run_id or resolved.run_id
    with stage_run("evaluate", params, upstream_run_id=upstream, entry=entry, dataset_context="evaluation") as run:
        return evaluate_and_report(
            run.run_id, model, config, dataset, params.window_stride, params.batch_size, "Zero-shot evaluation",
            downscaling_factors=params.downscaling_factors, map_time=params.map_time,
        )
