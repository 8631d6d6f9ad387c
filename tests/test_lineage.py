"""Resumed pretraining runs and `atmorep lineage` on real runs.

A pretraining run on the real UK 2 m temperature is killed after its first checkpoint.
Running the same command again resumes it: the new MLflow run is a child of the killed
one, tagged `atmorep.resumed`, and trains in its checkpoint folder. `atmorep lineage` on
the registered model then prints the chain down to the source file's sha256.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient
from test_reproduce import DATASET, atmorep, atmorep_env

from models.config import PRESET_DIR

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ATMOREP = str(Path(sys.executable).parent / "atmorep")
MAX_STEPS = 30


def training_processes(marker: str) -> list[psutil.Process]:
    """Return the live processes whose command line contains `marker`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(scope="module")
def resumed_home(tmp_path_factory, data_mirror):
    """Kill a pretraining run after its first checkpoint, run the command again; return (env, client, first run id)."""
    home = tmp_path_factory.mktemp("lineage-home")
    env = atmorep_env(home, data_mirror)
    atmorep(["ingest", "era5", "sample:era5-2mt-2019-03-uk", "--name", DATASET], env)

    preset = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
    preset["train"].update({"checkpoint_every": 2, "log_every": 2, "warmup_steps": 2})
    preset_path = home / "preset.yaml"
    preset_path.write_text(yaml.safe_dump(preset))
    command = [
        ATMOREP, "pretrain", "atmorep", "--preset", str(preset_path), "--max-steps", str(MAX_STEPS),
        "--batch-size", "2", "--nproc-per-node", "2",
    ]

    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = home / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*/checkpoint.pt")):
        assert first.poll() is None, f"pretraining ended before its first checkpoint:\n{first.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    (first_dir,) = [path.parent for path in checkpoints.glob("*/checkpoint.pt")]
    for process in training_processes(str(first_dir)):
        try:
            command_line = " ".join(process.cmdline())
        except psutil.Error:
            # A worker of a process group killed earlier in this loop: exited, or a zombie.
            continue
        if "torch.distributed.run" in command_line:
            os.killpg(process.pid, signal.SIGKILL)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 1, output[-3000:]

    atmorep(command[1:], env)
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return env, client, first_dir.name


def test_rerun_resumes_as_child_run(resumed_home):
    _, client, first_run_id = resumed_home
    experiment = client.get_experiment_by_name("atmorep")
    runs = client.search_runs([experiment.experiment_id], "tags.`atmorep.stage` = 'pretrain'")
    by_id = {run.info.run_id: run for run in runs}

    assert len(runs) == 2
    assert by_id[first_run_id].info.status == "FAILED"
    (resumed,) = [run for run in runs if run.info.run_id != first_run_id]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["atmorep.resumed"] == "true"
    assert resumed.data.tags["mlflow.parentRunId"] == first_run_id
    assert resumed.data.tags["atmorep.parent_run_id"] == first_run_id
    assert resumed.data.tags["atmorep.checkpoint_dir"] == by_id[first_run_id].data.tags["atmorep.checkpoint_dir"]
    assert resumed.data.tags["atmorep.config_digest"] == by_id[first_run_id].data.tags["atmorep.config_digest"]
    assert resumed.data.metrics["pretrain/steps"] == MAX_STEPS

    # The resumed run logs only the steps after the checkpoint it resumed from.
    resumed_steps = [metric.step for metric in client.get_metric_history(resumed.info.run_id, "train/loss")]
    assert resumed_steps and min(resumed_steps) > 2
    assert max(resumed_steps) == MAX_STEPS
    losses = Path(resumed.data.tags["atmorep.checkpoint_dir"]) / "losses.jsonl"
    assert [json.loads(line)["step"] for line in losses.read_text().splitlines()] == list(range(1, MAX_STEPS + 1))


def test_lineage_json_records_everything(resumed_home):
    env, _, first_run_id = resumed_home

    lineage = json.loads(atmorep(["lineage", "models:/atmorep/latest", "--format", "json"], env).stdout)

    pretrain = lineage["run"]
    assert lineage["registered_model"] == "atmorep"
    assert pretrain["stage"] == "pretrain"
    assert pretrain["resumed"] is True
    assert pretrain["weights_parent_run_id"] == first_run_id
    assert len(pretrain["git_commit"]) == 40
    assert pretrain["git_dirty"] in ("true", "false")
    assert pretrain["prefect_flow_run_id"]
    assert pretrain["dataset"] == DATASET
    assert pretrain["dataset_version"] == "1"
    assert len(pretrain["dataset_digest"]) == 64
    assert set(pretrain["package_versions"]) >= {"torch", "mlflow", "prefect", "numpy"}

    ingest = pretrain["upstream"]
    assert ingest["stage"] == "ingest"
    assert ingest["dataset_digest"] == pretrain["dataset_digest"]
    assert ingest["upstream"] is None
    (source,) = ingest["sources"]
    assert source["path"].endswith("era5-2mt-2019-03-uk.grib")
    assert len(source["sha256"]) == 64


def test_lineage_text_tree_shows_resume(resumed_home):
    env, _, first_run_id = resumed_home

    text = atmorep(["lineage", "models:/atmorep/latest"], env).stdout

    assert "└── pretrain run" in text
    assert f"resumed from run: {first_run_id}" in text
    assert "packages: " in text
    assert "torch " in text
    assert "└── ingest run" in text
    assert "sha256 " in text
