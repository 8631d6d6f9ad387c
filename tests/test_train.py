"""Data windows, tracking and real torchrun training on normalised ERA5 t2m over the UK."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

import models.train as train
from flows.params import PretrainParams
from flows.pretrain import rendezvous
from models.atmorep import AtmoRep
from models.checkpoint import load_checkpoint, load_model
from models.config import FieldConfig, ModelConfig, load_preset
from models.data import FieldDataset, WindowDataset, time_features
from models.tracking import MlflowTracker, NullTracker, tracker_from_env
from tasks.training import torchrun_command

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_PERIOD = ("2019-03-01T00:00:00", "2019-03-24T23:00:00")
TEST_PERIOD = ("2019-03-25T00:00:00", "2019-03-31T23:00:00")


@pytest.fixture(scope="module")
def uk_zarr(uk_t2m_grib, tmp_path_factory) -> Path:
    """The UK t2m GRIB normalised with training-period statistics, as a Zarr v3 store."""
    source = xr.open_dataset(uk_t2m_grib, engine="cfgrib", backend_kwargs={"indexpath": ""})
    t2m = source["t2m"].drop_vars([name for name in source["t2m"].coords if name not in source["t2m"].dims])
    train = t2m.sel(time=slice(*TRAIN_PERIOD))
    mean, std = float(train.mean()), float(train.std())

    ds = ((t2m - mean) / std).astype("float32").to_dataset(name="t2m")
    ds["t2m"].attrs = {key: t2m.attrs[key] for key in ("units", "long_name", "standard_name")}
    ds.attrs = {
        "name": "era5-t2m-uk-2019-03",
        "statistics": {"t2m": {"mean": [mean], "std": [std]}},
        "train_period": list(TRAIN_PERIOD),
        "test_period": list(TEST_PERIOD),
    }
    path = tmp_path_factory.mktemp("data") / "era5-t2m-uk-2019-03.zarr"
    ds.chunk({"time": 24}).to_zarr(path, zarr_format=3, consolidated=False)
    return path


@pytest.fixture(scope="module")
def uk_ds(uk_zarr) -> xr.Dataset:
    return xr.open_zarr(uk_zarr, consolidated=False)


# Time features


def test_time_features_known_values():
    times = np.array(["2019-03-01T00:00", "2019-03-01T06:00", "2019-01-01T12:00"], dtype="datetime64[ns]")

    features = time_features(times)

    assert features.shape == (3, 4)
    assert features.dtype == np.float32
    np.testing.assert_allclose(features[0, :2], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(features[1, :2], [1.0, 0.0], atol=1e-6)
    day_angle = 2 * np.pi * 59 / 365.25  # 1 March is 59 days after 1 January 2019
    np.testing.assert_allclose(features[0, 2:], [np.sin(day_angle), np.cos(day_angle)], atol=1e-6)
    np.testing.assert_allclose(features[2, 2:], [np.sin(np.pi / 365.25), np.cos(np.pi / 365.25)], atol=1e-6)


# Window dataset


def test_windows_cover_train_period(uk_ds):
    dataset = WindowDataset(uk_ds, ["t2m"], TRAIN_PERIOD, (12, 32, 48))

    assert len(dataset) == 576 - 12 + 1
    x, features = dataset[0]
    assert x.shape == (1, 12, 32, 48)
    assert x.dtype == torch.float32
    assert features.shape == (12, 4)
    assert dataset.window_times(len(dataset) - 1)[-1] == np.datetime64("2019-03-24T23:00")
    assert abs(float(dataset.values.mean())) < 1e-3


def test_windows_time_stride(uk_ds):
    dataset = WindowDataset(uk_ds, ["t2m"], TRAIN_PERIOD, (12, 32, 48), time_stride=6)

    assert len(dataset) == (576 - 12) // 6 + 1
    assert dataset.window_times(1)[0] == np.datetime64("2019-03-01T06:00")


def test_fixed_crop_matches_source(uk_ds):
    dataset = WindowDataset(uk_ds, ["t2m"], TEST_PERIOD, (12, 32, 48), random_crop=False)

    x, features = dataset[3]

    expected = uk_ds["t2m"].sel(time=slice(*TEST_PERIOD)).values[3:15, :32, :48]
    np.testing.assert_array_equal(x[0].numpy(), expected)
    np.testing.assert_array_equal(features.numpy(), time_features(dataset.window_times(3)))
    assert dataset.crop_offset(3) == (0, 0)


def test_random_crop_seeded(uk_ds):
    first = WindowDataset(uk_ds, ["t2m"], TRAIN_PERIOD, (12, 32, 48), seed=1)
    again = WindowDataset(uk_ds, ["t2m"], TRAIN_PERIOD, (12, 32, 48), seed=1)

    offsets = [first.crop_offset(index) for index in range(40)]
    assert offsets == [again.crop_offset(index) for index in range(40)]
    assert set(offsets) == {(0, 0), (0, 1), (1, 0), (1, 1)}

    first.set_epoch(1)
    assert [first.crop_offset(index) for index in range(40)] != offsets

    x, _ = again[5]
    lat, lon = again.crop_offset(5)
    expected = uk_ds["t2m"].values[5:17, lat : lat + 32, lon : lon + 48]
    np.testing.assert_array_equal(x[0].numpy(), expected)


def test_windows_skip_time_gap(uk_ds):
    # Drop 2019-03-02T05 so the windows containing it straddle a gap.
    gap = uk_ds.drop_sel(time=np.datetime64("2019-03-02T05:00"))

    dataset = WindowDataset(gap, ["t2m"], TRAIN_PERIOD, (12, 32, 48))

    assert len(dataset) == 565 - 12
    for index in range(len(dataset)):
        steps = np.diff(dataset.window_times(index))
        assert (steps == np.timedelta64(1, "h")).all()


def test_windows_reject_missing_variable(uk_ds):
    with pytest.raises(KeyError, match="'t'"):
        WindowDataset(uk_ds, ["t"], TRAIN_PERIOD, (12, 32, 48))


def test_windows_reject_short_period(uk_ds):
    with pytest.raises(ValueError, match="no window"):
        WindowDataset(uk_ds, ["t2m"], ("2019-03-01T00", "2019-03-01T05"), (12, 32, 48))


def test_windows_reject_large_crop(uk_ds):
    with pytest.raises(ValueError, match="smaller than the sample crop"):
        WindowDataset(uk_ds, ["t2m"], TRAIN_PERIOD, (12, 40, 48))


def test_fields_reject_large_crop(uk_ds):
    config = ModelConfig(fields=[FieldConfig(name="t2m", token_shape=(2, 8, 8), num_tokens=(3, 8, 4))])

    with pytest.raises(ValueError, match=r"field 't2m'.*reduce model.fields\[t2m\].num_tokens or token_shape"):
        FieldDataset(uk_ds, config, TRAIN_PERIOD)


def test_windows_multi_level_channels(data_mirror):
    folder = data_mirror / "era5" / "era5-pl-2020-01-01"
    u = xr.open_dataset(folder / "ERA5_2020-01-01_pl_u.nc")
    u10 = xr.open_dataset(folder / "ERA5_2020-01-01_u10.nc")
    ds = xr.merge([u, u10])
    period = ("2020-01-01T00", "2020-01-01T23")

    dataset = WindowDataset(ds, ["u10", "u"], period, (4, 32, 32), levels={"u": [850, 500]}, random_crop=False)
    x, _ = dataset[2]

    assert x.shape == (3, 4, 32, 32)
    np.testing.assert_allclose(x[0].numpy(), ds["u10"].values[2:6, :32, :32], rtol=1e-6)
    np.testing.assert_allclose(x[1].numpy(), ds["u"].sel(level=850).values[2:6, :32, :32], rtol=1e-6)
    np.testing.assert_allclose(x[2].numpy(), ds["u"].sel(level=500).values[2:6, :32, :32], rtol=1e-6)
    with pytest.raises(ValueError, match="model.levels"):
        WindowDataset(ds, ["u"], period, (4, 32, 32))
    with pytest.raises(ValueError, match="levels \\[880\\]"):
        WindowDataset(ds, ["u"], period, (4, 32, 32), levels={"u": [880]})


# Tracking


def test_tracker_from_env_without_run_id(monkeypatch):
    monkeypatch.delenv("ATMOREP_MLFLOW_RUN_ID", raising=False)

    assert isinstance(tracker_from_env(), NullTracker)


def test_tracker_failure_only_warns(monkeypatch, caplog):
    # Nothing listens on port 1, so every call fails at once.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = MlflowTracker("0123456789abcdef", tracking_uri="http://127.0.0.1:1")

    with caplog.at_level(logging.WARNING, logger="models.tracking"):
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        tracker.close()

    assert tracker.failures == 1
    assert "MLflow tracking failed for run 0123456789abcdef" in caplog.text


# Training with torchrun


def write_config(path: Path, overrides: dict) -> Path:
    config = load_preset("demo", overrides)
    path.write_text(config.model_dump_json(indent=2))
    return path


def launch_training(arguments: list[str], env: dict[str, str], launcher: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*launcher, "-m", "models.train", *arguments],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SMALL_RUN = {
    "train.batch_size": 8,
    "train.log_every": 5,
    "train.checkpoint_every": 10,
    "train.warmup_steps": 3,
}


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    """A fresh MLflow run in a sqlite store, returned as (tracking_uri, run_id)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("train-test")
    run = client.create_run(experiment_id)
    return uri, run.info.run_id


@pytest.mark.slow
def test_torchrun_train_and_resume(uk_zarr, mlflow_run, tmp_path):
    uri, run_id = mlflow_run
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "ATMOREP_MLFLOW_RUN_ID": run_id}
    output = tmp_path / "run"
    first_config = write_config(tmp_path / "first.json", SMALL_RUN | {"train.max_steps": 20})
    arguments = ["--output-dir", str(output), "--dataset-path", str(uk_zarr)]

    first = launch_training(["--config", str(first_config), *arguments], env, TORCHRUN)

    assert first.returncode == 0, first.stderr[-8000:]
    done = json.loads((output / "done.json").read_text())
    assert done["step"] == 20
    assert np.isfinite(done["loss"])
    checkpoint = load_checkpoint(output / "checkpoint.pt")
    assert checkpoint["step"] == 20
    assert len(checkpoint["rng"]) == 2
    optimizer_steps = {float(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert optimizer_steps == {20.0}
    model, config = load_model(output / "checkpoint.pt")
    assert isinstance(model, AtmoRep)
    assert config.train.max_steps == 20

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    history = sorted(history, key=lambda metric: metric.step)
    losses = [metric.value for metric in history]
    assert [metric.step for metric in history] == [5, 10, 15, 20]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]

    resume_config = write_config(tmp_path / "resume.json", SMALL_RUN | {"train.max_steps": 30})
    resumed = launch_training(["--config", str(resume_config), *arguments], env, TORCHRUN)

    assert resumed.returncode == 0, resumed.stderr[-8000:]
    assert "resuming from" in resumed.stderr
    assert "at step 20" in resumed.stderr
    assert json.loads((output / "done.json").read_text())["step"] == 30
    checkpoint = load_checkpoint(output / "checkpoint.pt")
    assert checkpoint["step"] == 30
    assert checkpoint["scheduler"]["last_epoch"] == 30
    optimizer_steps = {float(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert optimizer_steps == {30.0}
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    steps = sorted(metric.step for metric in history)
    assert steps == [5, 10, 15, 20, 25, 30]


@pytest.mark.slow
def test_fine_tune_from_init_checkpoint(uk_zarr, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "ATMOREP_MLFLOW_RUN_ID"}
    pretrain = tmp_path / "pretrain"
    pretrain_config = write_config(tmp_path / "pretrain.json", SMALL_RUN | {"train.max_steps": 2})
    data = ["--dataset-path", str(uk_zarr)]

    pretrained = launch_training(
        ["--config", str(pretrain_config), "--output-dir", str(pretrain), *data], env, [sys.executable]
    )
    assert pretrained.returncode == 0, pretrained.stderr[-8000:]

    forecast_config = write_config(
        tmp_path / "forecast.json",
        SMALL_RUN | {"train.max_steps": 3, "masking.weights": {"bert": 0, "forecast": 1, "interpolation": 0}},
    )
    fine_tuned = launch_training(
        ["--config", str(forecast_config), "--output-dir", str(tmp_path / "forecast"),
         "--init-checkpoint", str(pretrain / "checkpoint.pt"), *data],
        env, [sys.executable],
    )
    assert fine_tuned.returncode == 0, fine_tuned.stderr[-8000:]
    assert "initialised model weights from" in fine_tuned.stderr
    assert json.loads((tmp_path / "forecast" / "done.json").read_text())["step"] == 3
    checkpoint = load_checkpoint(tmp_path / "forecast" / "checkpoint.pt")
    assert checkpoint["config"]["masking"]["weights"]["forecast"] == 1
    optimizer_steps = {float(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert optimizer_steps == {3.0}

    wider_config = write_config(tmp_path / "wider.json", SMALL_RUN | {"model.embed_dim": 64})
    mismatch = launch_training(
        ["--config", str(wider_config), "--output-dir", str(tmp_path / "wider"),
         "--init-checkpoint", str(pretrain / "checkpoint.pt"), *data],
        env, [sys.executable],
    )
    assert mismatch.returncode != 0
    assert "model.embed_dim: checkpoint 128, config 64" in mismatch.stderr
    assert not (tmp_path / "wider" / "done.json").exists()


def test_resume_matches_uninterrupted_run(uk_zarr, tmp_path, monkeypatch):
    monkeypatch.delenv("ATMOREP_MLFLOW_RUN_ID", raising=False)
    steps = {"train.max_steps": 12, "train.checkpoint_every": 6, "train.log_every": 6}
    config = load_preset("demo", SMALL_RUN | steps)
    context = train.DistributedContext(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    interrupted.mkdir()
    save_checkpoint = train.save_checkpoint

    def save_and_copy_step_6(path, **kwargs):
        save_checkpoint(path, **kwargs)
        if kwargs["step"] == 6:
            shutil.copy(path, interrupted / "checkpoint.pt")

    monkeypatch.setattr(train, "save_checkpoint", save_and_copy_step_6)
    full = train.run_training(config, uninterrupted, dataset_path=uk_zarr, context=context)
    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    resumed = train.run_training(config, interrupted, dataset_path=uk_zarr, context=context)

    assert full.step == 12
    assert resumed.step == 12
    assert resumed.loss == full.loss
    full_weights = load_checkpoint(uninterrupted / "checkpoint.pt")["model"]
    resumed_weights = load_checkpoint(interrupted / "checkpoint.pt")["model"]
    for name, weights in full_weights.items():
        assert torch.equal(resumed_weights[name], weights), name


# Launcher and rendezvous parameters


def test_torchrun_command_standalone_by_default():
    command = torchrun_command(Path("run.json"), Path("out"), nproc_per_node=2)

    assert "--standalone" in command
    assert "--max-restarts=0" in command
    assert "--nproc-per-node=2" in command
    assert not any(argument.startswith("--rdzv") for argument in command)


def test_torchrun_command_multi_node():
    params = PretrainParams(
        nnodes="2", nproc_per_node=4, rdzv_endpoint="node0:29400", rdzv_id="era5-run", max_restarts=3
    )

    command = torchrun_command(Path("run.json"), Path("out"), params.nproc_per_node, rendezvous=rendezvous(params))

    assert "--standalone" not in command
    for option in (
        "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=era5-run",
        "--max-restarts=3", "--nproc-per-node=4",
    ):
        assert option in command


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"nnodes": "2"}, "rdzv_endpoint is required"),
        ({"nnodes": "3:2", "rdzv_endpoint": "node0:29400"}, "MIN above MAX"),
        ({"nnodes": "2", "rdzv_endpoint": "node0:29400", "rdzv_backend": "static"}, "needs node_rank"),
        ({"nnodes": "2", "rdzv_endpoint": "node0:29400", "node_rank": 2}, "node_rank 2 must be below"),
        ({"rdzv_endpoint": "node0"}, "rdzv_endpoint"),
        ({"max_restarts": -1}, "max_restarts"),
    ],
)
def test_rendezvous_params_rejected(settings, message):
    with pytest.raises(ValidationError, match=message):
        PretrainParams(**settings)
