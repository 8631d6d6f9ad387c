"""End to end: `atmorep pipeline` on the real UK 2 m temperature, then `atmorep lineage`.

The pipeline runs as a subprocess, as a user runs it, with a temporary Prefect server,
real torchrun training on two gloo ranks, and a sqlite MLflow store.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ATMOREP = str(Path(sys.executable).parent / "atmorep")

TASK_METRICS = [
    "forecast/rmse/t2m/lead_1h",
    "forecast/rmse_persistence/t2m/lead_1h",
    "forecast/rmse/t2m/lead_6h",
    "forecast/rmse_persistence/t2m/lead_6h",
    "interpolation/rmse/t2m/gap_2h",
    "interpolation/rmse_linear/t2m/gap_2h",
    "downscaling/rmse/t2m/factor_4",
    "downscaling/rmse_bicubic/t2m/factor_4",
    "forecast/rmse_climatology/t2m/lead_1h",
    "forecast/acc/t2m/lead_3h",
    "forecast/acc_persistence/t2m/lead_3h",
    "interpolation/rmse_cubic/t2m/gap_4h",
    "downscaling/rmse_bilinear/t2m/factor_2",
    "downscaling/small_scale_power_ratio_bicubic/t2m/factor_2",
]


@pytest.fixture(scope="module")
def pipeline_home(tmp_path_factory, data_mirror):
    """Run the pipeline once with few training steps and return its ATMOREP_HOME and output."""
    home = tmp_path_factory.mktemp("atmorep-home")
    env = {
        **os.environ,
        "ATMOREP_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "ATMOREP_DATA_MIRROR": str(data_mirror),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    completed = subprocess.run(
        [ATMOREP, "pipeline", "--pretrain-steps", "6", "--finetune-steps", "3", "--batch-size", "4"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    return home, completed.stdout, env


@pytest.fixture(scope="module")
def mlflow_client(pipeline_home):
    home, _, _ = pipeline_home
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs_by_stage(client):
    experiment = client.get_experiment_by_name("atmorep")
    runs = client.search_runs([experiment.experiment_id])
    return {run.data.tags["atmorep.stage"]: run for run in runs}


def test_pipeline_summary_printed(pipeline_home):
    _, stdout, _ = pipeline_home

    assert "Zero-shot scores" in stdout
    assert "Fine-tuned scores" in stdout
    assert "persistence" in stdout
    assert "make ui" in stdout


def test_pipeline_parent_and_child_runs(mlflow_client):
    runs = _runs_by_stage(mlflow_client)

    assert set(runs) == {"pipeline", "ingest", "pretrain", "evaluate", "finetune"}
    parent_id = runs["pipeline"].info.run_id
    for stage in ("ingest", "pretrain", "evaluate", "finetune"):
        tags = runs[stage].data.tags
        assert tags["mlflow.parentRunId"] == parent_id, stage
        assert tags["atmorep.dataset_digest"] == runs["ingest"].data.tags["atmorep.dataset_digest"], stage
        assert len(tags["mlflow.source.git.commit"]) == 40, stage
        assert runs[stage].info.status == "FINISHED", stage


def test_pipeline_records_content_digest(pipeline_home, mlflow_client):
    from data_catalog import Catalog

    home, _, _ = pipeline_home
    runs = _runs_by_stage(mlflow_client)
    dataset_name = runs["pretrain"].data.tags["atmorep.dataset"]
    entry = Catalog(home).get(dataset_name)

    for stage in ("ingest", "pretrain", "evaluate", "finetune"):
        tags = runs[stage].data.tags
        assert tags["atmorep.dataset_digest"] == entry.content_digest, stage
        assert tags["atmorep.dataset_version"] == str(entry.version), stage
        inputs = runs[stage].inputs.dataset_inputs
        assert [item.dataset.digest for item in inputs] == [entry.content_digest[:36]], stage


def test_pipeline_upstream_chain(mlflow_client):
    runs = _runs_by_stage(mlflow_client)

    assert runs["pretrain"].data.tags["atmorep.upstream_run_id"] == runs["ingest"].info.run_id
    assert runs["evaluate"].data.tags["atmorep.upstream_run_id"] == runs["pretrain"].info.run_id
    assert runs["finetune"].data.tags["atmorep.upstream_run_id"] == runs["pretrain"].info.run_id


def test_pipeline_metrics_named_by_convention(mlflow_client):
    runs = _runs_by_stage(mlflow_client)

    for stage in ("evaluate", "finetune"):
        metrics = runs[stage].data.metrics
        for name in TASK_METRICS:
            assert name in metrics, f"{stage} lacks {name}"
            assert metrics[name] > 0, f"{stage} {name} = {metrics[name]}"
    assert "train/loss" in runs["pretrain"].data.metrics


def test_pipeline_artifacts_logged(mlflow_client):
    runs = _runs_by_stage(mlflow_client)
    artifacts = {item.path for item in mlflow_client.list_artifacts(runs["evaluate"].info.run_id, "plots")}

    assert any(path.endswith(".png") for path in artifacts), artifacts
    assert {"plots/skill_forecast_acc.png", "plots/forecast_map_t2m.png", "plots/spectrum_factor_4.png"} <= artifacts
    top_level = {item.path for item in mlflow_client.list_artifacts(runs["evaluate"].info.run_id)}
    assert {"scores.csv", "scores.nc", "report.md"} <= top_level


def test_pipeline_registers_both_models(mlflow_client):
    names = {model.name for model in mlflow_client.search_registered_models()}

    assert {"atmorep", "atmorep-forecast"} <= names
    pretrained = mlflow.pytorch.load_model("models:/atmorep/1")
    assert type(pretrained).__name__ == "AtmoRep"


def test_compare_zero_shot_and_finetuned(pipeline_home, mlflow_client, tmp_path):
    _, _, env = pipeline_home
    runs = _runs_by_stage(mlflow_client)
    run_ids = [runs["evaluate"].info.run_id, runs["finetune"].info.run_id]
    completed = subprocess.run(
        [ATMOREP, "compare", *run_ids, "--output", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"evaluate {run_ids[0][:8]}" in completed.stdout
    assert f"finetune {run_ids[1][:8]}" in completed.stdout
    assert (tmp_path / "compare_forecast_rmse.png").is_file()


def test_lineage_traces_model_to_source(pipeline_home, mlflow_client):
    home, _, env = pipeline_home
    completed = subprocess.run(
        [ATMOREP, "lineage", "models:/atmorep-forecast/1", "--format", "json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    lineage = json.loads(completed.stdout)
    stages = []
    node = lineage["run"]
    while node:
        stages.append(node["stage"])
        sources = node.get("sources")
        node = node["upstream"]
    assert stages == ["finetune", "pretrain", "ingest"]
    assert sources[0]["path"].endswith("era5-2mt-2019-03-uk.grib")
    assert len(sources[0]["sha256"]) == 64


def test_lineage_text_tree(pipeline_home):
    _, _, env = pipeline_home
    completed = subprocess.run(
        [ATMOREP, "lineage", "models:/atmorep/latest"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "pretrain run" in completed.stdout
    assert "ingest run" in completed.stdout
    assert "era5-2mt-2019-03-uk.grib" in completed.stdout
