"""Launch `models.train` under torchrun and stream its log.

torchrun runs in its own process group (a new session), so cancelling the launching
flow run, or any exception in the launcher, terminates every training process on this
node. torchrun's agent restarts all workers up to `max_restarts` times when one fails,
and they resume from the last checkpoint.

A single-node job uses `torchrun --standalone`. A multi-node job starts the same launcher
on every node with the same `rdzv_id` and `rdzv_endpoint` (see `Rendezvous`), and its
output folder must be on storage that every node reads, because every rank resumes from
the checkpoint that rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """torchrun exited with a non-zero status."""


@dataclass(frozen=True)
class Rendezvous:
    """Rendezvous settings through which the nodes of a torchrun job find each other (`--rdzv-*`).

    `nnodes` is a count such as "2", or "MIN:MAX" for an elastic job. With one node and no
    endpoint, the job is standalone: torchrun starts its own rendezvous on a free local
    port. `node_rank` is needed by the static backend only; c10d assigns ranks itself.
    """

    nnodes: str = "1"
    node_rank: int | None = None
    backend: str = "c10d"
    endpoint: str | None = None
    run_id: str = "atmorep"
    max_restarts: int = 0

    @property
    def standalone(self) -> bool:
        return self.nnodes == "1" and self.endpoint is None

    def arguments(self) -> list[str]:
        """Return the torchrun options for this rendezvous."""
        if self.standalone:
            options = ["--standalone"]
        else:
            options = [
                f"--nnodes={self.nnodes}",
                f"--rdzv-backend={self.backend}",
                f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id={self.run_id}",
            ]
            if self.node_rank is not None:
                options.append(f"--node-rank={self.node_rank}")
        return [*options, f"--max-restarts={self.max_restarts}"]


def torchrun_command(
    config_path: Path,
    output_dir: Path,
    nproc_per_node: int,
    init_checkpoint: Path | None = None,
    rendezvous: Rendezvous | None = None,
    dataset_path: Path | None = None,
) -> list[str]:
    """Return the torchrun command line that runs this node's share of a training job."""
    rendezvous = rendezvous or Rendezvous()
    command = [
        sys.executable, "-m", "torch.distributed.run",
        *rendezvous.arguments(),
        f"--nproc-per-node={nproc_per_node}",
        "-m", "models.train",
        "--config", str(config_path),
        "--output-dir", str(output_dir),
    ]
    if init_checkpoint is not None:
        command += ["--init-checkpoint", str(init_checkpoint)]
    if dataset_path is not None:
        command += ["--dataset-path", str(dataset_path)]
    return command


# Run by the launcher's Python before it becomes torchrun: Linux sends SIGTERM to torchrun
# when the thread that started it dies, SIGKILL of the flow process included, so torchrun
# stops its workers instead of training on beside a re-run. Inline code, not a module,
# because `source_dir` may hold an older checkout without it.
_EXEC_WITH_PARENT_DEATH_SIGNAL = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(f"the flow process {parent} exited before training started")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def launch_training(
    config: dict[str, Any],
    output_dir: Path,
    nproc_per_node: int = 2,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    init_checkpoint: Path | None = None,
    run_logger: logging.Logger | logging.LoggerAdapter | None = None,
    rendezvous: Rendezvous | None = None,
    dataset_path: Path | None = None,
    source_dir: Path | None = None,
) -> dict[str, Any]:
    """Train with `torchrun --nproc-per-node=N` and return the contents of `done.json`.

    `config` is a `models.config.RunConfig` dumped to JSON-compatible types. Rank 0 logs
    metrics to `mlflow_run_id`. The training log goes to `output_dir/train.log` and to
    `run_logger`. Training resumes from `checkpoint.pt` when `output_dir` already contains
    one. `dataset_path` replaces the catalog entry `train.dataset` with a Zarr store.
    torchrun runs in its own process group, which is stopped when this call is interrupted,
    and on Linux it gets SIGTERM when the calling thread dies, even by SIGKILL.
    `source_dir` runs the `models` package of another checkout, such as an exported
    commit, instead of this one.
    """
    rendezvous = rendezvous or Rendezvous()
    run_logger = run_logger or logger
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / "config.json"
    config_path.write_text(json.dumps(config, indent=2))

    env = dict(os.environ)
    if rendezvous.standalone:
        # A single-node job talks over loopback. Across nodes, gloo picks the interface
        # that resolves the host name unless GLOO_SOCKET_IFNAME is set by the caller.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONUNBUFFERED"] = "1"
    if source_dir is not None:
        # `python -m` looks in the working folder and PYTHONPATH before the installed project.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source_dir), env.get("PYTHONPATH")]))
    env.pop("ATMOREP_MLFLOW_RUN_ID", None)
    if mlflow_run_id:
        env["ATMOREP_MLFLOW_RUN_ID"] = mlflow_run_id
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri

    command = torchrun_command(config_path, output_dir, nproc_per_node, init_checkpoint, rendezvous, dataset_path)
    run_logger.info("Starting training: %s", " ".join(command))
    log_path = output_dir / "train.log"

    with open(log_path, "a", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *command[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=source_dir,
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
