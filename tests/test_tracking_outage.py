"""Training survives an MLflow server outage and loses no metric.

A real `mlflow server` (sqlite store) runs on 127.0.0.1. A single-process training run of
`models.train` on real ERA5 t2m logs every step to it. The test kills the server while
training runs, lets training take several steps with the server down, pauses the trainer
(SIGSTOP) while the server restarts on the same port, then lets training finish and checks
that the server holds `train/loss` for every step exactly once, equal to `losses.jsonl`.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_train import uk_zarr  # noqa: F401 - the real-data Zarr fixture

from models.config import load_preset
from models.tracking import BUFFER_NAME, MlflowTracker, read_buffer, sync_buffer

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).parent / "mlflow")
MAX_STEPS = 60
STEPS_WHILE_DOWN = 5


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """Start `mlflow server` on 127.0.0.1:`port` over the sqlite store in `folder`, wait until healthy."""
    log = open(folder / "server.log", "a")
    server = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow server exited with {server.returncode}, see {folder / 'server.log'}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise AssertionError(f"mlflow server on port {port} not healthy within 120 s")


def stop_server(server: subprocess.Popen, stop_signal: int = signal.SIGTERM) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, stop_signal)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def count_losses(output_dir: Path) -> int:
    path = output_dir / "losses.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_until(condition, process: subprocess.Popen, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"training exited with {process.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def test_training_survives_mlflow_outage(uk_zarr, tmp_path):  # noqa: F811
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    store = tmp_path / "store"
    store.mkdir()
    server = start_server(store, port)
    trainer = None
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id

        config = load_preset("demo", {
            "train.max_steps": MAX_STEPS, "train.batch_size": 2, "train.log_every": 1,
            "train.checkpoint_every": MAX_STEPS, "train.warmup_steps": 2,
        })
        config_path = tmp_path / "config.json"
        config_path.write_text(config.model_dump_json())
        output_dir = tmp_path / "run"
        env = os.environ | {
            "MLFLOW_TRACKING_URI": uri, "ATMOREP_MLFLOW_RUN_ID": run_id, "ATMOREP_TRACKING_RETRY_S": "0.5",
        }
        log = open(tmp_path / "train.log", "w")
        trainer = subprocess.Popen(
            [sys.executable, "-m", "models.train", "--config", str(config_path), "--output-dir", str(output_dir),
             "--dataset-path", str(uk_zarr)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

        # Kill the server once training has logged a few steps through it. Training is
        # paused meanwhile, so that it cannot finish before the outage begins.
        wait_until(lambda: count_losses(output_dir) >= 3, trainer, "the first steps")
        os.killpg(trainer.pid, signal.SIGSTOP)
        stop_server(server, signal.SIGKILL)
        os.killpg(trainer.pid, signal.SIGCONT)
        down_at = count_losses(output_dir)
        wait_until(lambda: count_losses(output_dir) >= down_at + STEPS_WHILE_DOWN, trainer, "steps with the server down")
        buffered = read_buffer(output_dir / BUFFER_NAME)
        assert buffered, "training ran with the server down but buffered no metric"

        # Pause training while the server restarts, so that the outage does not outlast it.
        os.killpg(trainer.pid, signal.SIGSTOP)
        server = start_server(store, port)
        os.killpg(trainer.pid, signal.SIGCONT)
        assert trainer.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-4000:]
    finally:
        if trainer is not None and trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
        stop_server(server)

    # The server has stopped, so its store is read directly.
    history = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}").get_metric_history(run_id, "train/loss")
    losses = [json.loads(line) for line in (output_dir / "losses.jsonl").read_text().splitlines()]
    steps = [metric.step for metric in history]

    assert sorted(steps) == list(range(1, MAX_STEPS + 1)), f"steps in MLflow: {sorted(steps)}"
    assert {metric.step: metric.value for metric in history} == {row["step"]: row["loss"] for row in losses}
    assert not (output_dir / BUFFER_NAME).exists()
    assert "MLflow tracking failed" in (tmp_path / "train.log").read_text()


def test_buffer_survives_tracker_restart(tmp_path):
    """A buffer left by a tracker that never reached the server is sent to its run by the next sync."""
    store = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = store.create_run(store.create_experiment("sync")).info.run_id
    buffer_path = tmp_path / BUFFER_NAME
    tracker = MlflowTracker(run_id, tracking_uri="http://127.0.0.1:1", buffer_path=buffer_path)
    tracker.log_metrics({"train/loss": 1.5, "train/lr": 0.1}, step=1)
    tracker.log_metrics({"train/loss": 1.25}, step=2)
    tracker.close()

    records = read_buffer(buffer_path)
    assert [(record["run_id"], record["key"], record["step"]) for record in records] == [
        (run_id, "train/loss", 1), (run_id, "train/lr", 1), (run_id, "train/loss", 2),
    ]

    # The records name their run, so the default run id of the sync is not used.
    assert sync_buffer(store, "f" * 32, buffer_path) == 3
    assert sync_buffer(store, run_id, buffer_path) == 0
    history = store.get_metric_history(run_id, "train/loss")
    assert [(metric.step, metric.value) for metric in history] == [(1, 1.5), (2, 1.25)]
    assert not buffer_path.exists()
