"""Concurrent pretraining runs in one ATMOREP_HOME, and the retry policy of the flows.

Two `atmorep pretrain` processes start at the same time on the same dataset and the same
MLflow store, each with its own temporary Prefect server. Each must train in its own
checkpoint folder and register its own model version, and neither may overwrite the
other's files or artifacts.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect.states import Failed
from test_reproduce import DATASET, atmorep, atmorep_env

from flows.common import retry_on_transient_error

REPO_ROOT = Path(__file__).resolve().parents[1]
ATMOREP = str(Path(sys.executable).parent / "atmorep")


@pytest.mark.slow
@pytest.mark.skip(
    reason="known defect, open in issue 6: on a clean CI clone one of two concurrent runs reports a "
    "registered version that is then missing from the sqlite model registry (passes on a warm checkout)"
)
def test_concurrent_pretraining_runs_stay_apart(tmp_path, data_mirror):
    home = tmp_path / "home"
    env = atmorep_env(home, data_mirror)
    atmorep(["ingest", "era5", "sample:era5-2mt-2019-03-uk", "--name", DATASET], env)
    dataset_files = {path: path.stat().st_mtime_ns for path in (home / "data").rglob("*") if path.is_file()}

    processes = []
    for index, seed in enumerate((1, 2)):
        run_env = env | {"PREFECT_HOME": str(home / f"prefect-{index}")}
        command = [ATMOREP, "pretrain", "atmorep", "--max-steps", "4", "--batch-size", "2", "--nproc-per-node", "1",
                   "--seed", str(seed)]
        processes.append(subprocess.Popen(
            command, cwd=REPO_ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
        results.append(json.loads(stdout))

    run_ids = {result["run_id"] for result in results}
    assert len(run_ids) == 2
    assert {result["model_uri"] for result in results} == {"models:/atmorep/1", "models:/atmorep/2"}

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    for result, seed in zip(results, (1, 2)):
        folder = home / "checkpoints" / result["run_id"]
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["atmorep.checkpoint_dir"] == str(folder)
        assert json.loads((folder / "config.json").read_text())["train"]["seed"] == seed
        assert json.loads((folder / "done.json").read_text())["loss"] == result["final_loss"]
        assert run.data.metrics["pretrain/final_loss"] == result["final_loss"]
        assert run.data.params["run_config.train.seed"] == str(seed)
        # Each run's logged checkpoint is its own.
        artifacts = {item.path for item in client.list_artifacts(result["run_id"], "checkpoint")}
        assert artifacts == {"checkpoint/checkpoint.pt"}
        version = result["model_uri"].rsplit("/", 1)[1]
        assert client.get_model_version("atmorep", version).run_id == result["run_id"]
    assert results[0]["final_loss"] != results[1]["final_loss"]

    # Training only reads the dataset.
    assert {path: path.stat().st_mtime_ns for path in (home / "data").rglob("*") if path.is_file()} == dataset_files


def failed_state(error: BaseException):
    try:
        raise error
    except BaseException as raised:
        return Failed(data=raised)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ConnectionRefusedError("connection refused"), True),
        (TimeoutError("read timed out"), True),
        (OSError("stale NFS file handle"), True),
        (MlflowException("API request failed: Connection refused"), True),
        (FileNotFoundError("source missing"), False),
        (ValueError("train_period invalid"), False),
        (MlflowException("RESOURCE_DOES_NOT_EXIST: run not found"), False),
    ],
)
def test_retry_only_transient_errors(error, retried):
    assert retry_on_transient_error(None, None, failed_state(error)) is retried
