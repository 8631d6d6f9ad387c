"""Exact resume after kill -9, dead-rank handling and training options, on real ERA5 t2m over the UK.

The torchrun tests train 2 processes with gloo on a small run: 30 steps of 4 samples per
rank, with a checkpoint every 10 steps. They compare the per-step losses in
`losses.jsonl`, which rank 0 writes as the mean over ranks, with an uninterrupted run's.
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
import torch
from test_train import uk_zarr  # noqa: F401 - the real-data Zarr fixture

import models.train as train
from models.checkpoint import load_checkpoint, unwrap
from models.config import load_preset
from tasks.training import launch_training

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN = {
    "train.max_steps": 30,
    "train.batch_size": 4,
    "train.checkpoint_every": 10,
    "train.log_every": 5,
    "train.warmup_steps": 3,
}
TIMEOUT_S = 180


def torchrun(config_path: Path, output_dir: Path, dataset: Path, max_restarts: int) -> subprocess.Popen:
    """Start a 2-process gloo job in its own session, its output captured."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        f"--max-restarts={max_restarts}", "-m", "models.train",
        "--config", str(config_path), "--output-dir", str(output_dir), "--dataset-path", str(dataset),
    ]
    env = {key: value for key, value in os.environ.items() if key != "ATMOREP_MLFLOW_RUN_ID"}
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def wait_for_file(path: Path, process: subprocess.Popen, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, f"training exited with {process.returncode} before writing {path}"
        assert time.monotonic() < deadline, f"{path} not written within {timeout_s} s"
        time.sleep(0.01)


def rank_pid(process: subprocess.Popen, rank: int) -> int:
    """Return the pid of the training worker with RANK=`rank` under a torchrun process."""
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "models.train" in " ".join(child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {process.pid}")


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"torchrun did not exit within {TIMEOUT_S} s:\n{output[-6000:]}") from None
    return process.returncode, output


def read_losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(record["step"], record["loss"]) for record in train.read_losses(output_dir / train.LOSS_LOG_NAME)]


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "run.json"
    path.write_text(load_preset("demo", RUN).model_dump_json(indent=2))
    return path


@pytest.fixture(scope="module")
def reference_losses(run_config, uk_zarr, tmp_path_factory) -> list[tuple[int, float]]:  # noqa: F811
    """Per-step losses of the uninterrupted 2-process run."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    returncode, output = finish(torchrun(run_config, output_dir, uk_zarr, max_restarts=0))
    assert returncode == 0, output[-6000:]
    losses = read_losses(output_dir)
    assert [step for step, _ in losses] == list(range(1, 31))
    return losses


@pytest.mark.slow
def test_kill_rank_and_torchrun_restart(run_config, uk_zarr, reference_losses, tmp_path):  # noqa: F811
    output_dir = tmp_path / "killed"
    process = torchrun(run_config, output_dir, uk_zarr, max_restarts=1)
    wait_for_file(output_dir / train.CHECKPOINT_NAME, process)
    os.kill(rank_pid(process, rank=1), signal.SIGKILL)

    returncode, output = finish(process)

    assert returncode == 0, output[-6000:]
    assert "resuming from" in output, "the killed run finished without restarting from its checkpoint"
    assert read_losses(output_dir) == reference_losses
    checkpoint = load_checkpoint(output_dir / train.CHECKPOINT_NAME)
    assert checkpoint["step"] == 30
    assert checkpoint["loader"]["consumed_samples"] == 30 * 2 * 4
    assert checkpoint["loader"]["samples_per_step"] == 8
    assert len(checkpoint["rng"]) == 2
    assert set(checkpoint["rng"][1]) == {"torch", "generator", "cuda", "numpy", "python"}
    assert "scaler" in checkpoint


@pytest.mark.slow
def test_rerun_after_killing_whole_job(run_config, uk_zarr, reference_losses, tmp_path):  # noqa: F811
    output_dir = tmp_path / "rerun"
    process = torchrun(run_config, output_dir, uk_zarr, max_restarts=0)
    wait_for_file(output_dir / train.CHECKPOINT_NAME, process)
    workers = [rank_pid(process, rank) for rank in (0, 1)]
    # torchrun's process group contains torchrun alone: the workers have sessions of their own
    # and must die with it.
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    _, alive = psutil.wait_procs([psutil.Process(pid) for pid in workers if psutil.pid_exists(pid)], timeout=30)
    assert not alive, f"workers {[worker.pid for worker in alive]} outlived the killed torchrun"
    steps_at_kill = load_checkpoint(output_dir / train.CHECKPOINT_NAME)["step"]
    assert steps_at_kill < 30, "the job finished before it could be killed"

    # The flow's launcher re-runs the job in the same folder, which resumes it.
    config = json.loads(run_config.read_text())
    done = launch_training(config, output_dir, nproc_per_node=2, dataset_path=uk_zarr)

    assert done["step"] == 30
    assert read_losses(output_dir) == reference_losses
    assert f"at step {steps_at_kill}" in (output_dir / "train.log").read_text()


@pytest.mark.slow
def test_dead_rank_stops_job(run_config, uk_zarr, tmp_path):  # noqa: F811
    output_dir = tmp_path / "dead"
    process = torchrun(run_config, output_dir, uk_zarr, max_restarts=0)
    wait_for_file(output_dir / train.CHECKPOINT_NAME, process)
    killed_at = time.monotonic()
    os.kill(rank_pid(process, rank=1), signal.SIGKILL)

    returncode, output = finish(process)

    assert returncode != 0
    assert time.monotonic() - killed_at < 60, "the surviving rank took over a minute to stop"
    assert not (output_dir / train.DONE_NAME).exists()
    assert "models.train FAILED" in output or "ChildFailedError" in output, output[-3000:]


# In-process runs of one rank


def single_process() -> train.DistributedContext:
    return train.DistributedContext(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)


def test_resume_rejects_other_model_config(uk_zarr, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("ATMOREP_MLFLOW_RUN_ID", raising=False)
    short = {"train.max_steps": 1, "train.batch_size": 2}
    saved = load_preset("demo", short)
    train.run_training(saved, tmp_path, dataset_path=uk_zarr, context=single_process())
    depth = saved.model.depth + 1
    deeper = load_preset("demo", short | {"train.max_steps": 2, "model.depth": depth})

    with pytest.raises(ValueError, match=f"model.depth: checkpoint {saved.model.depth}, config {depth}"):
        train.run_training(deeper, tmp_path, dataset_path=uk_zarr, context=single_process())


def test_losses_truncated_to_checkpoint(tmp_path):
    log = train.LossLog(tmp_path / "losses.jsonl")
    for step in range(1, 6):
        log.append(step, 1.0 / step)
    log.close()
    with open(tmp_path / "losses.jsonl", "a") as handle:
        handle.write('{"step": 6, "lo')

    log.truncate(3)

    assert [record["step"] for record in train.read_losses(tmp_path / "losses.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize(
    "options",
    [
        {"train.precision": "bf16"},
        {"train.precision": "fp16"},
        {"train.activation_checkpointing": True},
        {"train.num_workers": 2},
    ],
    ids=["bf16", "fp16", "activation-checkpointing", "workers"],
)
def test_training_options_run(uk_zarr, tmp_path, monkeypatch, options):  # noqa: F811
    monkeypatch.delenv("ATMOREP_MLFLOW_RUN_ID", raising=False)
    short = {"train.max_steps": 3, "train.batch_size": 2, "train.warmup_steps": 1, "train.log_every": 1}
    baseline = train.run_training(
        load_preset("demo", short), tmp_path / "baseline", dataset_path=uk_zarr, context=single_process()
    )

    state = train.run_training(
        load_preset("demo", short | options), tmp_path / "option", dataset_path=uk_zarr, context=single_process()
    )

    losses = [loss for _, loss in read_losses(tmp_path / "option")]
    expected = [loss for _, loss in read_losses(tmp_path / "baseline")]
    assert state.step == 3
    scaler = load_checkpoint(tmp_path / "option" / train.CHECKPOINT_NAME)["scaler"]
    if "train.precision" in options:
        # Half-precision matmuls round to 8 (bf16) or 11 (fp16) mantissa bits: close to fp32, not equal.
        assert losses == pytest.approx(expected, rel=0.05)
    else:
        # Recomputed activations and worker-loaded batches change no value.
        assert losses == expected
    assert baseline.step == 3
    if options.get("train.precision") == "fp16":
        assert scaler["scale"] > 0
    else:
        # The scaler is disabled, and its empty state is still stored.
        assert scaler == {}


def test_compiled_model_saves_plain_keys():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))

    # torch.compile wraps lazily, so nothing is compiled here.
    compiled = torch.compile(model)

    assert list(unwrap(compiled).state_dict()) == list(model.state_dict())
    assert unwrap(model) is model
