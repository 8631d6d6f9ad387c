"""Concurrent pretraining runs in one ATMOREP_HOME, and the retry policy of the flows.

Two `atmorep pretrain` processes start at the same time on the same dataset and the same
MLflow store, each with its own temporary Prefect server. Each must train in its own
checkpoint folder and register its own model version, and neither may overwrite the
other's files or artifacts. Two processes that open one new sqlite store at the same
time must both be able to use it. Registration retries a store that another writer has
locked, and keeps a version that a failed attempt committed.

The stores are read with `MlflowClient(tracking_uri=..., registry_uri=...)`. With only
`tracking_uri`, MLflow 3.17 takes the registry from the registry URI that an earlier test
set in this process through `tasks.tracking.client()`, and reads another test's models.
"""

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import mlflow
import pytest
from conftest import reset_mlflow_uris
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from prefect.states import Failed
from test_reproduce import DATASET, atmorep, atmorep_env

from flows.common import retry_on_transient_error
from tasks import registry
from tasks.registry import register_version
from tasks.tracking import client, start_stage_run

REPO_ROOT = Path(__file__).resolve().parents[1]
ATMOREP = str(Path(sys.executable).parent / "atmorep")


@pytest.mark.slow
def test_concurrent_pretraining_runs_stay_apart(tmp_path, data_mirror):
    home = tmp_path / "home"
    env = atmorep_env(home, data_mirror)
    atmorep(["ingest", "era5", "sample:era5-2mt-2019-03-uk", "--name", DATASET], env)
    dataset_files = {path: path.stat().st_mtime_ns for path in (home / "data").rglob("*") if path.is_file()}

    env.pop("MLFLOW_REGISTRY_URI", None)
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

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
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


# Opens the store of $ATMOREP_HOME at the time given as argument, then creates a run and a
# logged model and registers it, and prints the run id and the version as JSON.
REGISTER_IN_NEW_STORE = """
import json, sys, time
from tasks.registry import register_version
from tasks.tracking import client, end_stage_run, start_stage_run

time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
run = start_stage_run("pretrain")
model = client().create_logged_model(run.experiment_id, name="model", source_run_id=run.run_id)
version = register_version(f"models:/{model.model_id}", "atmorep", run.run_id)
end_stage_run(run.run_id)
print(json.dumps({"run_id": run.run_id, "version": version}))
"""


def test_new_store_shared_by_two_processes(tmp_path):
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env |= {"ATMOREP_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    # Both processes open the new store at the same moment, after their imports.
    start = str(time.time() + 15)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER_IN_NEW_STORE, start],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))

    assert sorted(result["version"] for result in results) == ["1", "2"]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for result in results:
        assert client.get_model_version("atmorep", result["version"]).run_id == result["run_id"]
        assert client.get_run(result["run_id"]).info.status == "FINISHED"


@pytest.fixture
def store_home(tmp_path, monkeypatch):
    """Return a new ATMOREP_HOME for a store opened in this process, and restore MLflow's URIs after the test."""
    reset_mlflow_uris(monkeypatch)
    monkeypatch.setenv("ATMOREP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "REGISTER_RETRY_DELAY_S", 0.0)
    return tmp_path / "home"


def logged_model() -> tuple[str, str]:
    """Create a run with a logged model and return the run id and the model URI."""
    run = start_stage_run("pretrain")
    model = client().create_logged_model(run.experiment_id, name="model", source_run_id=run.run_id)
    return run.run_id, f"models:/{model.model_id}"


def store_locked() -> MlflowException:
    return MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)


def test_register_retries_locked_store(store_home, monkeypatch):
    run_id, model_uri = logged_model()
    register_model = mlflow.register_model
    calls = []

    def locked_once(uri, name, **options):
        calls.append(uri)
        if len(calls) == 1:
            raise store_locked()
        return register_model(uri, name, **options)

    monkeypatch.setattr(mlflow, "register_model", locked_once)
    assert register_version(model_uri, "atmorep", run_id) == "1"
    assert len(calls) == 2


def test_register_keeps_committed_version(store_home, monkeypatch):
    run_id, model_uri = logged_model()
    register_model = mlflow.register_model

    def committed_then_locked(uri, name, **options):
        register_model(uri, name, **options)
        raise store_locked()

    monkeypatch.setattr(mlflow, "register_model", committed_then_locked)
    assert register_version(model_uri, "atmorep", run_id) == "1"
    assert len(client().search_model_versions("name = 'atmorep'")) == 1


def test_register_other_error_not_retried(store_home, monkeypatch):
    run_id, model_uri = logged_model()
    calls = []

    def not_found(uri, name, **options):
        calls.append(uri)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: logged model not found")

    monkeypatch.setattr(mlflow, "register_model", not_found)
    with pytest.raises(MlflowException, match="logged model not found"):
        register_version(model_uri, "atmorep", run_id)
    assert len(calls) == 1


def test_register_missing_version_raises(store_home, monkeypatch):
    run_id, model_uri = logged_model()
    register_model = mlflow.register_model

    def reports_other_version(uri, name, **options):
        register_model(uri, name, **options)
        return types.SimpleNamespace(version=7)

    monkeypatch.setattr(mlflow, "register_model", reports_other_version)
    with pytest.raises(RuntimeError, match="version 7 of run .* is not found"):
        register_version(model_uri, "atmorep", run_id)


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
