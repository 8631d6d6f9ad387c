"""`pipeline/end-to-end`: ingest, pretrain, zero-shot evaluation and fine-tuning in one run."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.common import stage_run
from flows.evaluate import evaluate
from flows.finetune import finetune
from flows.ingest import ingest
from flows.params import EvaluateParams, FinetuneParams, IngestEra5Params, PipelineParams, PretrainParams
from flows.pretrain import pretrain
from tasks.tracking import log_json_artifact


@flow(name="pipeline", flow_run_name="end-to-end-{params.name}")
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    """Run every stage under one MLflow parent run, each stage a child run of its own.

    Returns a summary: the runs of each stage and the score rows of the zero-shot and
    fine-tuned evaluations.
    """
    logger = get_run_logger()
    with stage_run("pipeline", params) as parent:
        shared = {"experiment": params.experiment, "parent_run_id": parent.run_id}

        ingested = ingest(
            IngestEra5Params(
                sources=params.sources,
                name=params.name,
                variables=params.variables,
                train_period=params.train_period,
                test_period=params.test_period,
                **shared,
            )
        )
        pretrained = pretrain(
            PretrainParams(
                dataset=params.name,
                preset=params.preset,
                max_steps=params.pretrain_steps,
                batch_size=params.batch_size,
                upstream_run_id=ingested["run_id"],
                **params.rendezvous,
                **shared,
            )
        )
        zero_shot = evaluate(
            EvaluateParams(
                model_uri=pretrained["model_uri"],
                dataset=params.name,
                upstream_run_id=pretrained["run_id"],
                **shared,
            )
        )
        finetuned = finetune(
            FinetuneParams(
                model_uri=pretrained["model_uri"],
                task=params.finetune_task,
                max_steps=params.finetune_steps,
                batch_size=params.batch_size,
                upstream_run_id=pretrained["run_id"],
                **params.rendezvous,
                **shared,
            )
        )

        summary = {
            "pipeline_run_id": parent.run_id,
            "stages": [
                {"stage": "ingest", "run_id": ingested["run_id"], "output": ingested["zarr_path"]},
                {"stage": "pretrain", "run_id": pretrained["run_id"], "output": pretrained["model_uri"]},
                {"stage": "evaluate", "run_id": zero_shot["run_id"], "output": "zero-shot scores"},
                {"stage": "finetune", "run_id": finetuned["run_id"], "output": finetuned["model_uri"]},
            ],
            "zero_shot": zero_shot["rows"],
            "finetuned": finetuned["rows"],
        }
        log_json_artifact(parent.run_id, summary, "summary.json")
        create_table_artifact(summary["stages"], key="pipeline-stages", description="MLflow run of each stage")
        logger.info("Pipeline finished: MLflow parent run %s", parent.run_id)
    return summary
