"""Every deployment of prefect.yaml on a real Prefect server, run and cancelled through a real worker.

The tests start `prefect server start` on 127.0.0.1, create the process work pool, deploy
everything with `prefect deploy --all` and start a process worker. They run
`pretrain/atmorep` with small parameters and check the flow run, its MLflow run and its
link and table artifacts, then cancel a long run mid-training and check that no training
process survives it.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
ATMOREP = str(Path(sys.executable).parent / "atmorep")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Prefect server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Prefect server at {url} not healthy after {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory, data_mirror):
    """A running Prefect server on 127.0.0.1 and the environment that points at it."""
    home = tmp_path_factory.mktemp("deploy-home")
    port = _free_port()
    env = {
        **os.environ,
        "ATMOREP_HOME": str(home),
        "ATMOREP_DATA_MIRROR": str(data_mirror),
        "ATMOREP_PROJECT_DIR": str(REPO_ROOT),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/api/health", server)
        yield home, env
    finally:
        _stop(server)
        log.close()


def _run(command: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, f"{command} failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
    return completed


def prefect_query(body: str, env: dict) -> object:
    """Run `body` (async code that sets `result`) against the server with the Prefect client; return `result` from JSON."""
    script = (
        "import asyncio, json\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as client:\n"
        + "".join(f"        {line}\n" for line in body.strip().splitlines())
        + "    return result\n"
        "print(json.dumps(asyncio.run(main()), default=str))\n"
    )
    return json.loads(_run([sys.executable, "-c", script], env).stdout.strip().splitlines()[-1])


def flow_run_state(flow_run_id: str, env: dict) -> str:
    return prefect_query(f"run = await client.read_flow_run('{flow_run_id}')\nresult = run.state.type.value", env)


def training_processes(marker: str) -> list[psutil.Process]:
    """Return the live processes whose command line contains `marker` (a checkpoint folder)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(process.info["cmdline"] or []) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def wait_for(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def deployed(prefect_env):
    """Every deployment of prefect.yaml on the server, the sample ingested, and a running process worker."""
    home, env = prefect_env
    _run([ATMOREP, "ingest", "era5", "sample:era5-2mt-2019-03-uk", "--name", "era5-t2m-uk-2019-03"], env)
    _run([PREFECT, "work-pool", "create", "atmorep-process", "--type", "process", "--overwrite"], env)
    # The Docker pool must exist for its deployment; no Docker worker runs here.
    _run([PREFECT, "work-pool", "create", "atmorep-docker", "--type", "docker", "--overwrite"], env)
    _run([PREFECT, "--no-prompt", "deploy", "--all"], env, timeout=600)

    worker_log = open(home / "worker.log", "w")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "atmorep-process"],
        cwd=REPO_ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield home, env
    finally:
        _stop(worker)
        worker_log.close()


def test_deploy_all_creates_every_deployment(deployed):
    _, env = deployed
    expected = {
        (deployment["entrypoint"].split(":")[1], deployment["name"])
        for deployment in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    }

    found = prefect_query(
        "deployments = await client.read_deployments()\n"
        "flows = {flow.id: flow.name for flow in await client.read_flows()}\n"
        "result = [[flows[d.flow_id], d.name, d.work_pool_name, [s.active for s in d.schedules]] for d in deployments]",
        env,
    )
    names = {(flow, name) for flow, name, _, _ in found}
    by_name = {f"{flow}/{name}": (pool, active) for flow, name, pool, active in found}

    assert len(found) == len(expected)
    assert {name for _, name in expected} == {name for _, name in names}
    assert by_name["pretrain/atmorep"][0] == "atmorep-process"
    assert by_name["pretrain/mae"][0] == "atmorep-process"
    assert by_name["finetune/mae"][0] == "atmorep-process"
    assert by_name["pipeline/end-to-end-docker"][0] == "atmorep-docker"
    assert by_name["ingest/era5-monthly-append"][1] == [False]
    assert by_name["pipeline/end-to-end"][1] == [False]


def test_pretrain_deployment_completes(deployed):
    home, env = deployed
    parameters = json.dumps({"params": {"max_steps": 4, "batch_size": 2, "nproc_per_node": 2}})
    _run(
        [PREFECT, "deployment", "run", "pretrain/atmorep", "--params", parameters, "--watch",
         "--watch-timeout", "600"],
        env,
        timeout=660,
    )

    runs = prefect_query(
        "runs = await client.read_flow_runs()\n"
        "result = [[str(r.id), r.name, r.state.type.value, str(r.deployment_id)] for r in runs if r.deployment_id]",
        env,
    )
    assert [state for _, _, state, _ in runs] == ["COMPLETED"], runs
    flow_run_id = runs[0][0]

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("atmorep")
    mlflow_runs = client.search_runs([experiment.experiment_id], "tags.`atmorep.stage` = 'pretrain'")
    assert len(mlflow_runs) == 1
    run = mlflow_runs[0]
    assert run.info.status == "FINISHED"
    assert "train/loss" in run.data.metrics
    assert run.data.tags["atmorep.prefect_flow_run_id"] == flow_run_id
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 1

    artifacts = prefect_query(
        "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId\n"
        f"flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=['{flow_run_id}']))\n"
        "artifacts = await client.read_artifacts(artifact_filter=flt)\n"
        "result = {a.key: [a.type, a.data] for a in artifacts}",
        env,
    )
    link_type, link = artifacts["mlflow-pretrain"]
    assert link_type == "markdown" or link_type == "link"
    assert run.info.run_id in link
    table_type, table = artifacts["pretrain-summary"]
    assert table_type == "table"
    rows = {row["name"]: row["value"] for row in json.loads(table)}
    assert rows["mlflow run"] == run.info.run_id
    assert float(rows["pretrain/final_loss"]) == pytest.approx(run.data.metrics["pretrain/final_loss"], rel=1e-5)


def test_cancel_stops_every_training_process(deployed):
    home, env = deployed
    parameters = json.dumps({"params": {"max_steps": 100000, "batch_size": 2, "nproc_per_node": 2}})
    output = _run([PREFECT, "deployment", "run", "pretrain/atmorep", "--params", parameters], env).stdout
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)

    # Mid-training: the workers are running and rank 0 has written some steps.
    marker = str(home / "checkpoints")
    wait_for(lambda: len(training_processes("models.train")) >= 2 and training_processes(marker), "torchrun workers", 300)
    wait_for(lambda: any(path.stat().st_size for path in home.glob("checkpoints/*/losses.jsonl")), "training steps", 120)
    assert flow_run_state(flow_run_id, env) == "RUNNING"

    _run([PREFECT, "flow-run", "cancel", flow_run_id], env)

    wait_for(lambda: flow_run_state(flow_run_id, env) == "CANCELLED", "the flow run to be cancelled", 120)
    wait_for(lambda: not training_processes(marker), "every training process to exit", 60)
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("atmorep").experiment_id],
        f"tags.`atmorep.prefect_flow_run_id` = '{flow_run_id}'",
    )[0]
    assert run.info.status == "KILLED"
