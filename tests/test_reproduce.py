"""`atmorep reproduce`: a short real pretraining run, trained again from what MLflow recorded.

The pretraining runs through the CLI (temporary Prefect server, torchrun with 2 gloo
ranks, sqlite MLflow store) on the real UK 2 m temperature sample. The reproduction must
match its final loss exactly, and the command must reject runs whose commit or dataset is
not available.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ATMOREP = str(Path(sys.executable).parent / "atmorep")
DATASET = "era5-t2m-uk-2019-03"


def atmorep(arguments: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [ATMOREP, *arguments], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert completed.returncode == 0, f"atmorep {arguments} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed


def reproduce_in_process(arguments: list[str], env: dict, monkeypatch, capsys) -> tuple[int, str]:
    """Run `atmorep reproduce` in this process, which skips the start-up of a new interpreter."""
    from flows.cli import main

    monkeypatch.setenv("ATMOREP_HOME", env["ATMOREP_HOME"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    status = main(["reproduce", *arguments])
    return status, capsys.readouterr().err


def atmorep_env(home: Path, data_mirror: Path) -> dict:
    env = {
        **os.environ,
        "ATMOREP_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "ATMOREP_DATA_MIRROR": str(data_mirror),
        # The temporary Prefect server takes longer than its default 20 s on a busy machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_mirror):
    """ATMOREP_HOME with the ingested sample and one 6-step pretraining run; returns (env, client, run id)."""
    home = tmp_path_factory.mktemp("reproduce-home")
    env = atmorep_env(home, data_mirror)
    atmorep(["ingest", "era5", "sample:era5-2mt-2019-03-uk", "--name", DATASET], env)
    result = json.loads(atmorep(
        ["pretrain", "atmorep", "--max-steps", "6", "--batch-size", "2", "--nproc-per-node", "2"], env
    ).stdout)
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return env, client, result["run_id"]


class changed_tag:
    """Set a tag of a run for the duration of a block, then restore it."""

    def __init__(self, client: MlflowClient, run_id: str, key: str, value: str) -> None:
        self.client, self.run_id, self.key, self.value = client, run_id, key, value

    def __enter__(self):
        self.original = self.client.get_run(self.run_id).data.tags.get(self.key)
        self.client.set_tag(self.run_id, self.key, self.value)

    def __exit__(self, *exc_info):
        if self.original is None:
            self.client.delete_tag(self.run_id, self.key)
        else:
            self.client.set_tag(self.run_id, self.key, self.original)


def test_reproduce_matches_final_loss(pretrained):
    env, client, run_id = pretrained
    recorded = client.get_run(run_id).data.metrics["pretrain/final_loss"]

    completed = atmorep(["reproduce", run_id, "--allow-dirty", "--format", "json"], env, check=False)

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    assert report["matches"] is True
    metrics = {item["name"]: item for item in report["metrics"]}
    assert metrics["pretrain/final_loss"]["reproduced"] == recorded
    assert metrics["pretrain/steps"]["reproduced"] == 6.0
    # The original run's losses.jsonl is still on disk, so every step is compared.
    assert metrics["losses.jsonl steps equal"]["recorded"] == 6.0
    assert metrics["losses.jsonl steps equal"]["reproduced"] == 6.0
    assert Path(report["output_dir"]).is_relative_to(Path(env["ATMOREP_HOME"]) / "reproductions")


def test_reproduce_rejects_unknown_commit(pretrained, monkeypatch, capsys):
    env, client, run_id = pretrained
    fake_commit = "0123456789abcdef0123456789abcdef01234567"

    with changed_tag(client, run_id, "mlflow.source.git.commit", fake_commit):
        status, stderr = reproduce_in_process([run_id, "--allow-dirty"], env, monkeypatch, capsys)

    assert status == 1
    assert f"commit {fake_commit} of run {run_id} is not in the repository" in stderr


def test_reproduce_rejects_changed_digest(pretrained, monkeypatch, capsys):
    env, client, run_id = pretrained
    other_digest = "f" * 64

    with changed_tag(client, run_id, "atmorep.dataset_digest", other_digest):
        status, stderr = reproduce_in_process([run_id, "--allow-dirty"], env, monkeypatch, capsys)

    assert status == 1
    assert f"has content digest {other_digest}" in stderr
    assert DATASET in stderr


def test_reproduce_rejects_dirty_run(pretrained, monkeypatch, capsys):
    env, client, run_id = pretrained

    with changed_tag(client, run_id, "atmorep.git_dirty", "true"):
        status, stderr = reproduce_in_process([run_id], env, monkeypatch, capsys)

    assert status == 1
    assert "uncommitted changes" in stderr
    assert "--allow-dirty" in stderr


def test_reproduce_rejects_ingest_run(pretrained, monkeypatch, capsys):
    env, client, run_id = pretrained
    ingest_run_id = client.get_run(run_id).data.tags["atmorep.upstream_run_id"]

    status, stderr = reproduce_in_process([ingest_run_id], env, monkeypatch, capsys)

    assert status == 1
    assert f"run {ingest_run_id} has stage ingest" in stderr
