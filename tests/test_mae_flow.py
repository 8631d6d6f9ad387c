"""The masked autoencoder end to end: config dispatch, checkpoints, exact resume and the flows.

The flow test runs `atmorep ingest imagenet`, `atmorep pretrain mae` (torchrun, 2 gloo
processes) and `atmorep finetune mae` on the real 1,000-image ImageNet sample, stored at
32 pixels, with a tiny model. The three commands run through `flows.cli.main` in one
subprocess, so they share one temporary Prefect server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

import models.train as train
from data_catalog import Catalog
from models.atmorep import AtmoRep
from models.checkpoint import check_checkpoint_config, load_checkpoint, load_model, save_checkpoint
from models.config import RunConfig, load_preset
from models.mae import MAERunConfig, MaskedAutoencoder
from models.mae_classifier import ClassifierHeadConfig, ClassifierRunConfig, MAEClassifier, holdout_split
from models.objective import objective_for
from tasks.imagenet import ingest_imagenet

REPO_ROOT = Path(__file__).resolve().parents[1]
STORED_SIZE = 32
TINY_MAE = {
    "family": "mae",
    "model": {
        "image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
    },
    "augment": {"min_crop_scale": 0.5},
    "train": {
        "dataset": "imagenet-sample", "max_steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
        "log_every": 2, "checkpoint_every": 3, "num_threads": 1,
    },
}


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "mae-tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_MAE))
    return path


@pytest.fixture(scope="module")
def sample_zarr(data_mirror, tmp_path_factory) -> Path:
    """The real ImageNet sample ingested at 32 pixels into a temporary catalog."""
    root = tmp_path_factory.mktemp("sample-home")
    result = ingest_imagenet(
        data_mirror / "images" / "imagenet-sample", "imagenet-sample", size=STORED_SIZE, workers=2,
        catalog=Catalog(root),
    )
    return result.zarr_path


def single_process() -> train.DistributedContext:
    return train.DistributedContext(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)


# --- configuration dispatch and checkpoints --------------------------------------------------


def test_load_preset_picks_schema_by_family(tiny_preset, tmp_path):
    atmorep_file = tmp_path / "atmorep.yaml"
    atmorep_file.write_text(yaml.safe_dump({"family": "atmorep", "train": {"max_steps": 3}}))

    mae = load_preset(tiny_preset, {"train.max_steps": 2})
    atmorep = load_preset(atmorep_file)

    assert isinstance(mae, MAERunConfig)
    assert mae.train.max_steps == 2
    assert type(objective_for(mae)).__name__ == "MAEObjective"
    assert isinstance(atmorep, RunConfig)
    assert atmorep.train.max_steps == 3
    assert isinstance(load_preset("mae-demo"), MAERunConfig)
    assert isinstance(load_preset("demo"), RunConfig)


def test_load_preset_rejects_unknown_family(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump({"family": "resnet"}))

    with pytest.raises(ValueError, match=r"other.yaml: model family 'resnet' is not supported"):
        load_preset(path)


def test_mae_config_json_round_trip(tiny_preset, tmp_path):
    config = load_preset(tiny_preset)
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())

    assert load_preset(path) == config


def test_atmorep_checkpoint_rejected_for_mae(tiny_preset, tmp_path):
    atmorep_config = load_preset("demo")
    path = tmp_path / "atmorep.pt"
    save_checkpoint(path, model=AtmoRep(atmorep_config.model), config=atmorep_config, step=1)
    saved = load_checkpoint(path)["config"]

    with pytest.raises(ValueError, match="contains a model of family atmorep, but the config is for family mae"):
        check_checkpoint_config(saved, load_preset(tiny_preset), path)


def test_mae_checkpoint_setting_mismatch_named(tiny_preset, tmp_path):
    config = load_preset(tiny_preset)
    path = tmp_path / "mae.pt"
    save_checkpoint(path, model=MaskedAutoencoder(config.model), config=config, step=1)
    saved = load_checkpoint(path)["config"]

    check_checkpoint_config(saved, load_preset(tiny_preset, {"model.mask_ratio": 0.5}), path)
    with pytest.raises(ValueError, match="model.depth: checkpoint 2, config 3"):
        check_checkpoint_config(saved, load_preset(tiny_preset, {"model.depth": 3}), path)


def test_load_model_rebuilds_mae(tiny_preset, tmp_path):
    config = load_preset(tiny_preset)
    torch.manual_seed(0)
    model = MaskedAutoencoder(config.model)
    path = tmp_path / "mae.pt"
    save_checkpoint(path, model=model, config=config, step=1)

    loaded, loaded_config = load_model(path)

    assert isinstance(loaded, MaskedAutoencoder)
    assert loaded_config == config
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# --- classifier --------------------------------------------------------------------------------


def test_holdout_split_fixed_and_disjoint():
    train_a, test_a = holdout_split(1000, 100, seed=0)
    train_b, test_b = holdout_split(1000, 100, seed=0)
    _, test_c = holdout_split(1000, 100, seed=1)

    assert len(test_a) == 100
    assert len(train_a) == 900
    assert np.array_equal(test_a, test_b)
    assert np.array_equal(train_a, train_b)
    assert not np.array_equal(test_a, test_c)
    assert not set(train_a) & set(test_a)
    with pytest.raises(ValueError, match="holdout_images 1000"):
        holdout_split(1000, 1000, seed=0)


@pytest.mark.parametrize(("mode", "trains_encoder"), [("linear-probe", False), ("full", True)])
def test_classifier_trainable_parameters(tiny_preset, mode, trains_encoder):
    mae = load_preset(tiny_preset)
    config = ClassifierRunConfig(
        model=mae.model, head=ClassifierHeadConfig(num_classes=10, mode=mode), train=mae.train
    )
    model = MAEClassifier(config)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}

    assert {"head.weight", "head.bias"} <= trainable
    assert ("backbone.blocks.0.qkv.weight" in trainable) is trains_encoder
    assert ("backbone.patch_embedding.weight" in trainable) is trains_encoder
    assert not any(name.startswith(("backbone.decoder", "backbone.mask_token")) for name in trainable)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert logits.requires_grad


# --- exact resume --------------------------------------------------------------------------------


class CrashAtStep:
    """Objective wrapper that raises during step `crash_step`, after the checkpoint of an earlier step."""

    def __init__(self, objective, crash_step: int) -> None:
        self.objective = objective
        self.crash_step = crash_step
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def loss(self, model, batch, generator):
        self.calls += 1
        if self.calls == self.crash_step:
            raise RuntimeError("simulated crash")
        return self.objective.loss(model, batch, generator)


def test_mae_resume_repeats_losses(tiny_preset, sample_zarr, tmp_path, monkeypatch):
    monkeypatch.delenv("ATMOREP_MLFLOW_RUN_ID", raising=False)
    config = load_preset(tiny_preset)
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    train.run_training(config, uninterrupted, dataset_path=sample_zarr, context=single_process())

    with monkeypatch.context() as patch:
        patch.setattr(train, "objective_for", lambda run_config: CrashAtStep(objective_for(run_config), 5))
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.run_training(config, resumed, dataset_path=sample_zarr, context=single_process())
    assert [record["step"] for record in train.read_losses(resumed / train.LOSS_LOG_NAME)] == [1, 2, 3, 4]
    assert load_checkpoint(resumed / train.CHECKPOINT_NAME)["step"] == 3
    train.run_training(config, resumed, dataset_path=sample_zarr, context=single_process())

    expected = train.read_losses(uninterrupted / train.LOSS_LOG_NAME)
    assert [record["step"] for record in expected] == [1, 2, 3, 4, 5, 6]
    assert train.read_losses(resumed / train.LOSS_LOG_NAME) == expected


# --- the flows through the CLI -------------------------------------------------------------------


FLOW_SCRIPT = """
import sys
from flows.cli import main
preset, = sys.argv[1:]
commands = [
    ["ingest", "imagenet", "sample:imagenet-sample", "--size", "32"],
    ["pretrain", "mae", "--preset", preset, "--nproc-per-node", "2", "--reconstruction-images", "4"],
    ["finetune", "mae", "--mode", "linear-probe", "--max-steps", "4", "--batch-size", "16", "--nproc-per-node", "1"],
]
for command in commands:
    status = main(command)
    if status:
        sys.exit(f"atmorep {' '.join(command)} exited with {status}")
"""


@pytest.fixture(scope="module")
def flow_home(tiny_preset, data_mirror, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("mae-flow-home")
    env = {
        **os.environ,
        "ATMOREP_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "ATMOREP_DATA_MIRROR": str(data_mirror),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    completed = subprocess.run(
        [sys.executable, "-c", FLOW_SCRIPT, str(tiny_preset)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    return home


def stage_runs(home: Path) -> tuple[MlflowClient, dict]:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("atmorep")
    runs = client.search_runs([experiment.experiment_id])
    return client, {run.data.tags["atmorep.stage"]: run for run in runs}


@pytest.mark.slow
def test_pretrain_mae_flow_logs_and_registers(flow_home):
    client, runs = stage_runs(flow_home)
    run = runs["pretrain"]
    artifacts = [item.path for item in client.list_artifacts(run.info.run_id, "plots")]
    versions = client.search_model_versions("name = 'mae'")
    losses = client.get_metric_history(run.info.run_id, "train/loss")

    assert run.info.status == "FINISHED"
    assert [metric.step for metric in losses] == [2, 4, 6]
    assert all(np.isfinite(metric.value) for metric in losses)
    assert np.isfinite(run.data.metrics["pretrain/reconstruction_loss"])
    assert run.data.params["run_config.family"] == "mae"
    assert run.data.tags["atmorep.dataset"] == "imagenet-sample"
    assert run.data.tags["atmorep.upstream_run_id"] == runs["ingest"].info.run_id
    assert "plots/reconstructions.png" in artifacts
    assert [version.run_id for version in versions] == [run.info.run_id]


@pytest.mark.slow
def test_finetune_mae_flow_scores_and_registers(flow_home):
    client, runs = stage_runs(flow_home)
    run = runs["finetune"]
    metrics = run.data.metrics
    versions = client.search_model_versions("name = 'mae-linear-probe'")
    report_path = client.download_artifacts(run.info.run_id, "report.md", str(flow_home / "report"))
    report = Path(report_path).read_text()

    assert run.info.status == "FINISHED"
    assert run.data.tags["atmorep.init_run_id"] == runs["pretrain"].info.run_id
    assert metrics["finetune/test/images"] == 100
    assert metrics["finetune/train/images"] == 900
    for name in ("test/top1", "test/top5", "train/top1", "train/top5"):
        assert 0.0 <= metrics[f"finetune/{name}"] <= 1.0, name
    # One image per class: no held-out class occurs in the training split.
    assert metrics["finetune/test/seen_class_fraction"] == 0.0
    assert metrics["finetune/chance_top1"] == pytest.approx(0.001)
    assert "train/loss" in metrics
    assert "Most held-out classes never occur in training" in report
    assert [version.run_id for version in versions] == [run.info.run_id]

    checkpoint = flow_home / "checkpoints" / run.info.run_id / "checkpoint.pt"
    model, config = load_model(checkpoint)
    assert isinstance(model, MAEClassifier)
    assert config.head.mode == "linear-probe"
    pretrained, _ = load_model(flow_home / "checkpoints" / runs["pretrain"].info.run_id / "checkpoint.pt")
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), f"frozen encoder weight {name} changed"
    assert json.loads((checkpoint.parent / "done.json").read_text())["step"] == 4


@pytest.mark.parametrize("flow_name", ["pretrain", "finetune"])
def test_mae_deployment_entrypoint_matches_flow_name(flow_name):
    from prefect.flows import load_flow_from_entrypoint

    deployments = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    entrypoints = [item["entrypoint"] for item in deployments if item["name"] == "mae"]
    entrypoint = next(item for item in entrypoints if item.endswith(f":{flow_name}"))

    # `prefect deploy --name pretrain/mae` matches "pretrain" against the function name.
    assert entrypoint == f"flows/mae.py:{flow_name}"
    assert load_flow_from_entrypoint(str(REPO_ROOT / entrypoint)).name == flow_name
