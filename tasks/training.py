"""Launch `models.train` under torchrun and stream its log.

torchrun runs in its own process group (a new session), so cancelling the launching
flow run, or any exception in the launcher, terminates every training process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """torchrun exited with a non-zero status."""


def torchrun_command(
    config_path: Path,
    output_dir: Path,
    nproc_per_node: int,
    init_checkpoint: Path | None = None,
) -> list[str]:
    """Return the torchrun command line for one single-node training job."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "-m", "models.train",
        "--config", str(config_path),
        "--output-dir", str(output_dir),
    ]
    if init_checkpoint is not None:
        command += ["--init-checkpoint", str(init_checkpoint)]
    return command


def launch_training(
    config: dict[str, Any],
    output_dir: Path,
    nproc_per_node: int = 2,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    init_checkpoint: Path | None = None,
    run_logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> dict[str, Any]:
    """Train with `torchrun --nproc_per_node=N` and return the contents of `done.json`.

    `config` is a `models.config.RunConfig` dumped to JSON-compatible types. Rank 0 logs
    metrics to `mlflow_run_id`. The training log goes to `output_dir/train.log` and to
    `run_logger`. Training resumes from `checkpoint.pt` when `output_dir` already contains one.
    """
    run_logger = run_logger or logger
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / "config.json"
    config_path.write_text(json.dumps(config, indent=2))

    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("ATMOREP_MLFLOW_RUN_ID", None)
    if mlflow_run_id:
        env["ATMOREP_MLFLOW_RUN_ID"] = mlflow_run_id
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri

    command = torchrun_command(config_path, output_dir, nproc_per_node, init_checkpoint)
    run_logger.info("Starting training: %s", " ".join(command))
    log_path = output_dir / "train.log"

    with open(log_path, "a", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            for line in process.stdout:
                log_file.write(line)
                run_logger.info("[torchrun] %s", line.rstrip())
            returncode = process.wait()
        except BaseException:
            _kill_process_group(process)
            raise

    if returncode != 0:
        raise TrainingFailed(
            f"torchrun exited with status {returncode}; see the training log {log_path}"
        )

    done_path = output_dir / "done.json"
    if not done_path.exists():
        raise TrainingFailed(f"training ended without writing {done_path}; see {log_path}")
    return json.loads(done_path.read_text())


def _kill_process_group(process: subprocess.Popen) -> None:
    """Terminate torchrun and its workers, then kill what is left after 10 s."""
    if process.poll() is not None:
        return
    logger.warning("Stopping training process group %d", process.pid)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
