"""`prefect deployment run pretrain/atmorep` against a real Prefect server and worker.

The test starts `prefect server start` on 127.0.0.1, creates the process work pool,
deploys from prefect.yaml, starts a worker, runs the deployment with small parameters
and checks that the flow run completed and left an MLflow run with metrics.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
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


def test_pretrain_deployment_completes(prefect_env):
    home, env = prefect_env
    _run([ATMOREP, "ingest", "era5", "sample:era5-2mt-2019-03-uk", "--name", "era5-t2m-uk-2019-03"], env)
    _run([PREFECT, "work-pool", "create", "atmorep-process", "--type", "process", "--overwrite"], env)
    _run([PREFECT, "--no-prompt", "deploy", "--name", "pretrain/atmorep"], env)

    worker_log = open(home / "worker.log", "w")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "atmorep-process"],
        cwd=REPO_ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        parameters = json.dumps({"params": {"max_steps": 4, "batch_size": 2, "nproc_per_node": 2}})
        _run(
            [PREFECT, "deployment", "run", "pretrain/atmorep", "--params", parameters, "--watch",
             "--watch-timeout", "600"],
            env,
            timeout=660,
        )
    finally:
        _stop(worker)
        worker_log.close()

    state = _run(
        [sys.executable, "-c", (
            "import asyncio\n"
            "from prefect.client.orchestration import get_client\n"
            "async def main():\n"
            "    async with get_client() as client:\n"
            "        runs = await client.read_flow_runs()\n"
            "        print([(r.name, r.state.type.value) for r in runs])\n"
            "asyncio.run(main())\n"
        )],
        env,
    ).stdout
    assert "COMPLETED" in state, state
    assert "FAILED" not in state, state
    assert "CRASHED" not in state, state

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("atmorep")
    runs = client.search_runs([experiment.experiment_id], "tags.`atmorep.stage` = 'pretrain'")
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert "train/loss" in runs[0].data.metrics
    assert runs[0].data.tags["atmorep.prefect_flow_run_id"]
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert len(history) >= 1
