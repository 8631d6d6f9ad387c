"""A pretraining flow process that is killed or terminated leaves no process behind.

Each test starts `atmorep pretrain` for far more steps than it will run, waits for the
first training step, then stops the flow process. After SIGKILL, torchrun and its workers
must exit on their own. After SIGTERM, the CLI must also stop its temporary Prefect server.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_reproduce import DATASET, atmorep, atmorep_env

REPO_ROOT = Path(__file__).resolve().parents[1]
ATMOREP = str(Path(sys.executable).parent / "atmorep")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, data_mirror):
    """ATMOREP_HOME with the ingested UK sample; returns (home, env)."""
    home = tmp_path_factory.mktemp("killed-flow-home")
    env = atmorep_env(home, data_mirror)
    atmorep(["ingest", "era5", "sample:era5-2mt-2019-03-uk", "--name", DATASET], env)
    return home, env


def wait_for(condition, description: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {description}"
        time.sleep(1)


def live(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Return the processes that still run (zombies count as exited)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def start_training(home: Path, env: dict, seed: int) -> tuple[subprocess.Popen, Path]:
    """Start a long pretraining run and return the CLI process and its run folder, once it trains."""
    before = set((home / "checkpoints").glob("*")) if (home / "checkpoints").exists() else set()
    command = [ATMOREP, "pretrain", "atmorep", "--max-steps", "100000", "--batch-size", "2",
               "--nproc-per-node", "1", "--seed", str(seed)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def new_folder() -> Path | None:
        folders = set((home / "checkpoints").glob("*")) - before if (home / "checkpoints").exists() else set()
        return next(iter(folders), None)

    def training_started() -> bool:
        assert process.poll() is None, f"atmorep pretrain exited early with status {process.returncode}"
        folder = new_folder()
        losses = folder / "losses.jsonl" if folder else None
        return bool(losses and losses.exists() and losses.stat().st_size > 0)

    wait_for(training_started, "the first training step", timeout_s=300)
    return process, new_folder()


def command_line(process: psutil.Process) -> str:
    """Return the process's command line, or "" once it has exited."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def stop_all(processes: list[psutil.Process]) -> None:
    for process in live(processes):
        process.kill()


@pytest.mark.slow
def test_sigkill_of_flow_stops_training(ingested):
    home, env = ingested
    process, folder = start_training(home, env, seed=7)
    descendants = psutil.Process(process.pid).children(recursive=True)
    training = [child for child in descendants if str(folder) in command_line(child)]
    assert len(training) >= 2, f"expected torchrun and a worker training into {folder}, found {training}"

    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    try:
        wait_for(lambda: not live(training), f"the training processes of {folder} to exit", timeout_s=60)
    finally:
        # The temporary Prefect server of a SIGKILLed CLI is left behind: stop it here.
        stop_all(descendants)


@pytest.mark.slow
def test_sigterm_of_cli_stops_training_and_server(ingested):
    home, env = ingested
    process, folder = start_training(home, env, seed=8)
    descendants = psutil.Process(process.pid).children(recursive=True)
    server = [child for child in descendants if "prefect" in command_line(child)]
    assert server, f"no temporary Prefect server among the CLI's children: {[command_line(c) for c in descendants]}"

    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(timeout=90)
        assert status != 0
        wait_for(lambda: not live(descendants), "every child of the terminated CLI to exit", timeout_s=60)
    finally:
        stop_all(descendants)
    assert not (folder / "done.json").exists()
