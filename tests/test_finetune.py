"""Fine-tuning from a small model pretrained on the real pressure-level set: the three tasks,
the freezing modes, the weight transfer and the `finetune` flow with its registered models."""

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.finetune import finetune_config
from flows.params import FinetuneParams
from models.checkpoint import load_checkpoint
from models.config import RunConfig
from models.data import FieldDataset
from models.finetune import (
    check_intended_changes,
    extend_time_positions,
    initialise_from_pretrained,
    parameter_group,
    summarise_names,
)
from models.masking import sample_mask
from models.objective import AtmoRepObjective
from models.train import DistributedContext, run_training

PL_NAME = "era5-pl-2020-01-01"
PL_TRAIN = ("2020-01-01T00:00", "2020-01-01T17:00")
PL_TEST = ("2020-01-01T18:00", "2020-01-01T23:00")
SINGLE_PROCESS = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)

# u and v at 850 hPa, 3 hours in 3 time tokens on a 16 x 16 crop, the forecast the last token.
BASE_CONFIG = {
    "model": {
        "fields": [
            {"name": "u", "levels": [850], "token_shape": [1, 8, 8], "num_tokens": [3, 2, 2], "neighbours": ["v"]},
            {"name": "v", "levels": [850], "token_shape": [1, 8, 8], "num_tokens": [3, 2, 2], "neighbours": ["u"]},
        ],
        "embed_dim": 32,
        "depth": 1,
        "decoder_depth": 1,
        "num_heads": 2,
        "ensemble_size": 2,
        "loss": "crps",
    },
    "masking": {"forecast_tokens": 1, "interpolation_tokens": [1], "coarsen_factor": 4,
                "weights": {"bert": 1.0, "forecast": 1.0, "interpolation": 0.0}},
    "train": {"dataset": PL_NAME, "max_steps": 3, "batch_size": 2, "warmup_steps": 0, "log_every": 1,
              "checkpoint_every": 100, "lr": 0.01},
}


@pytest.fixture(scope="module")
def pl_home(data_mirror, tmp_path_factory):
    """The real pressure-level NetCDF set ingested once into a fresh ATMOREP_HOME."""
    from tasks.ingest import ingest_era5

    home = tmp_path_factory.mktemp("finetune-home")
    files = [data_mirror / "era5" / PL_NAME / f"ERA5_2020-01-01_pl_{name}.nc" for name in ("u", "v", "q")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATMOREP_HOME", str(home))
        ingest_era5(files, PL_NAME, PL_TRAIN, PL_TEST)
    return home


@pytest.fixture
def home(pl_home, monkeypatch):
    monkeypatch.setenv("ATMOREP_HOME", str(pl_home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return pl_home


@pytest.fixture(scope="module")
def pretrained(pl_home):
    """A u and v model pretrained for 3 steps in this process: (checkpoint path, config)."""
    config = RunConfig.model_validate(BASE_CONFIG)
    output = pl_home / "pretrained"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATMOREP_HOME", str(pl_home))
        patch.delenv("ATMOREP_MLFLOW_RUN_ID", raising=False)
        run_training(config, output, context=SINGLE_PROCESS)
    return output / "checkpoint.pt", config


def finetune_and_compare(pretrained, tmp_path, **params):
    """Fine-tune for 3 steps in this process; return (config, pretrained state, fine-tuned state)."""
    checkpoint_path, base = pretrained
    config = finetune_config(base, FinetuneParams(max_steps=3, batch_size=2, **params))
    run_training(config, tmp_path / "finetuned", init_checkpoint=checkpoint_path, context=SINGLE_PROCESS)
    before = load_checkpoint(checkpoint_path)["model"]
    after = load_checkpoint(tmp_path / "finetuned" / "checkpoint.pt")["model"]
    return config, before, after


def unchanged(before, after, names):
    return [name for name in names if name in before and before[name].shape == after[name].shape
            and torch.equal(before[name], after[name])]


def sample_batch(config: RunConfig, home: Path):
    """One batch of two real training windows for `config`'s fields."""
    from data_catalog import Catalog

    dataset = FieldDataset(Catalog(home).open_dataset(PL_NAME), config.model, PL_TRAIN, random_crop=False)
    items = [dataset[0], dataset[3]]
    fields = {name: torch.stack([item[0][name] for item in items]) for name in items[0][0]}
    return fields, torch.stack([item[1] for item in items])


# Architecture surgery and weight transfer


def test_time_positions_extended_linearly():
    table = torch.tensor([[0.0, 1.0], [1.0, 3.0]])

    extended = extend_time_positions(table, 4)

    assert torch.equal(extended[:2], table)
    assert torch.equal(extended[2], torch.tensor([2.0, 5.0]))
    assert torch.equal(extended[3], torch.tensor([3.0, 7.0]))
    with pytest.raises(ValueError, match="cannot shrink"):
        extend_time_positions(table, 1)


def test_parameter_groups_by_name():
    assert parameter_group("fields.u.encoder.0.mlp.0.weight") == "encoder"
    assert parameter_group("fields.u.time_position") == "encoder"
    assert parameter_group("fields.u.decoder.0.self_norm.bias") == "decoder"
    assert parameter_group("fields.u.downscaling_head.out.weight") == "decoder"
    assert summarise_names(["a.x.w", "a.x.b", "a.y"], ["a.x.w", "a.x.b", "a.y", "a.z"]) == ["a.x", "a.y"]


def test_forecast_config_longer_lead(pretrained):
    _, base = pretrained

    config = finetune_config(base, FinetuneParams(task="forecast", extra_time_tokens=2))

    assert config.model.time_tokens == 5
    assert config.masking.forecast_tokens == 3
    assert config.masking.weights.forecast == 1.0
    assert config.finetune.base_model == base.model
    assert all(field.num_tokens[1:] == (2, 2) for field in config.model.fields)


def test_new_field_already_in_model_rejected(pretrained):
    _, base = pretrained

    with pytest.raises(ValueError, match="new_field 'v' is already in the pretrained model's fields") as error:
        finetune_config(base, FinetuneParams(task="new-field", new_field="v"))
    assert "choose a variable" in str(error.value)


def test_downscaling_factor_not_dividing_tokens_rejected(pretrained):
    _, base = pretrained

    with pytest.raises(ValueError, match="task downscaling cannot be built on model") as error:
        finetune_config(base, FinetuneParams(task="downscaling", downscaling_factor=3))
    assert "3" in str(error.value)


def test_evaluation_window_checked_before_training(pretrained, home):
    from data_catalog import Catalog
    from tasks.evaluate import check_evaluation_inputs

    _, base = pretrained
    dataset = Catalog(home).open_dataset(PL_NAME)
    fits = finetune_config(base, FinetuneParams(task="forecast", extra_time_tokens=1))
    too_long = finetune_config(base, FinetuneParams(task="forecast", extra_time_tokens=4))

    assert check_evaluation_inputs(fits, dataset) == ("2020-01-01T18:00:00", "2020-01-01T23:00:00")
    with pytest.raises(ValueError, match="needs a longer test period") as error:
        check_evaluation_inputs(too_long, dataset)
    assert "no window of 7 consecutive hourly steps" in str(error.value)


def test_downscaling_head_starts_as_pretrained(pretrained, home):
    checkpoint_path, base = pretrained
    config = finetune_config(base, FinetuneParams(task="downscaling"))
    checkpoint = load_checkpoint(checkpoint_path)
    torch.manual_seed(0)
    pretrained_model = AtmoRepObjective(base).build_model()
    pretrained_model.load_state_dict(checkpoint["model"])
    model = AtmoRepObjective(config).build_model()

    new = initialise_from_pretrained(model, checkpoint, config, checkpoint_path)
    fields, features = sample_batch(config, home)
    masked = sample_mask(config.masking, fields, {"u": (1, 8, 8), "v": (1, 8, 8)}, strategy="downscaling")
    with torch.no_grad():
        finetuned_members = model.eval()(masked.inputs, masked.masks, features)
        pretrained_members = pretrained_model.eval()(masked.inputs, masked.masks, features)

    assert config.model.downscaling_head == 4
    assert new and all(".downscaling_head." in name for name in new)
    for name in ("u", "v"):
        torch.testing.assert_close(finetuned_members[name], pretrained_members[name], rtol=0, atol=0)


def test_unintended_mismatch_rejected(pretrained):
    checkpoint_path, base = pretrained
    config = finetune_config(base, FinetuneParams(task="forecast"))
    tree = config.model_dump(mode="json")
    tree["model"]["depth"] = 2
    deeper = RunConfig.model_validate(tree)
    tree = config.model_dump(mode="json")
    tree["model"]["fields"][0]["token_shape"] = [1, 4, 4]
    other_tokens = RunConfig.model_validate(tree)

    with pytest.raises(ValueError, match=r"model\.depth: checkpoint 1, config 2"):
        initialise_from_pretrained(AtmoRepObjective(deeper).build_model(), load_checkpoint(checkpoint_path),
                                   deeper, checkpoint_path)
    with pytest.raises(ValueError, match=r"model\.fields\[u\]\.token_shape"):
        check_intended_changes(base.model, other_tokens.model, "forecast", checkpoint_path)
    with pytest.raises(ValueError, match="model.downscaling_head"):
        check_intended_changes(base.model, config.model, "downscaling", checkpoint_path)


def test_new_field_params_validated():
    with pytest.raises(ValueError, match="needs new_field"):
        FinetuneParams(task="new-field")
    with pytest.raises(ValueError, match="leaves nothing to train"):
        FinetuneParams(task="forecast", freeze="all", extra_time_tokens=0)
    assert FinetuneParams(task="new-field", new_field="q").registered_name == "atmorep-q"


# Freezing: which tensors change in training


def test_forecast_freeze_all_trains_time_positions(pretrained, home, tmp_path):
    config, before, after = finetune_and_compare(pretrained, tmp_path, task="forecast", freeze="all")

    trained = [name for name in after if name.endswith(".time_position")]
    assert sorted(trained) == ["fields.u.time_position", "fields.v.time_position"]
    assert unchanged(before, after, after) == [name for name in after if name not in trained]
    for name in trained:
        assert after[name].shape == (4, 32)
        assert not torch.equal(after[name][:3], before[name])


def test_downscaling_freeze_encoders(pretrained, home, tmp_path):
    config, before, after = finetune_and_compare(pretrained, tmp_path, task="downscaling", freeze="encoders")

    encoder = [name for name in after if parameter_group(name) == "encoder"]
    decoder = [name for name in after if parameter_group(name) == "decoder"]
    assert config.masking.weights.downscaling == 1.0
    assert sorted(unchanged(before, after, after)) == sorted(encoder)
    assert any(".downscaling_head." in name for name in decoder)
    for name in decoder:
        assert name not in before or not torch.equal(before[name], after[name]), name


def test_forecast_freeze_none_trains_everything(pretrained, home, tmp_path):
    _, before, after = finetune_and_compare(pretrained, tmp_path, task="forecast", extra_time_tokens=0)

    assert unchanged(before, after, after) == []


def test_new_field_freeze_all_keeps_pretrained_fields(pretrained, home, tmp_path):
    checkpoint_path, base = pretrained
    config, before, after = finetune_and_compare(
        pretrained, tmp_path, task="new-field", new_field="q", new_field_levels=[500, 850], freeze="all"
    )
    new_field = config.model.field("q")
    pretrained_model = AtmoRepObjective(base).build_model()
    pretrained_model.load_state_dict(before)
    finetuned_model = AtmoRepObjective(config).build_model()
    finetuned_model.load_state_dict(after)
    fields, features = sample_batch(config, home)
    token_shapes = {field.name: field.token_shape for field in config.model.fields}
    masked = sample_mask(config.masking, fields, token_shapes, torch.Generator().manual_seed(1), strategy="bert")
    with torch.no_grad():
        old_only = pretrained_model.eval()(
            {name: masked.inputs[name] for name in ("u", "v")}, {name: masked.masks[name] for name in ("u", "v")},
            features,
        )
        finetuned_members = finetuned_model.eval()(masked.inputs, masked.masks, features)

    assert new_field.neighbours == ["u", "v"]
    assert new_field.levels == [500, 850]
    assert sorted(unchanged(before, after, after)) == sorted(before)
    for name in after:
        if name.startswith("fields.q."):
            assert name not in before
    assert finetuned_model.fields["q"].encoder[0].cross
    for name in ("u", "v"):
        torch.testing.assert_close(finetuned_members[name], old_only[name], rtol=0, atol=0)
    assert finetuned_members["q"].shape == (2, 2, 2, 3, 16, 16)


# The flow: torchrun, registration, lineage


@pytest.mark.slow
def test_finetune_flow_registers_each_task(pretrained, pl_home):
    from flows.finetune import finetune
    from tasks.registry import log_and_register_model
    from tasks.tracking import TAG_INIT_RUN, TAG_UPSTREAM, end_stage_run, start_stage_run

    checkpoint_path, _ = pretrained
    tasks = [
        {"task": "forecast", "freeze": "all"},
        {"task": "downscaling", "freeze": "encoders", "downscaling_factor": 2},
        {"task": "new-field", "new_field": "q", "new_field_levels": [850], "freeze": "all"},
    ]
    with pytest.MonkeyPatch.context() as patch, prefect_test_harness(server_startup_timeout=120):
        patch.setenv("ATMOREP_HOME", str(pl_home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        pretrain_run = start_stage_run("pretrain", dataset=PL_NAME)
        log_and_register_model(pretrain_run.run_id, checkpoint_path, "atmorep")
        end_stage_run(pretrain_run.run_id)
        results = [
            finetune(FinetuneParams(
                model_uri="models:/atmorep/1", max_steps=2, batch_size=2, nproc_per_node=1, window_stride=6, **task,
            ))
            for task in tasks
        ]

        client = MlflowClient(tracking_uri=f"sqlite:///{pl_home / 'mlflow.db'}")
        names = {model.name for model in client.search_registered_models()}
        runs = [client.get_run(result["run_id"]) for result in results]
        new_field_artifact = client.download_artifacts(results[2]["run_id"], "finetune_parameters.json", str(pl_home))

    assert {"atmorep-forecast", "atmorep-downscaling", "atmorep-q"} <= names
    for result, run in zip(results, runs, strict=True):
        assert run.data.tags[TAG_UPSTREAM] == pretrain_run.run_id
        assert run.data.tags[TAG_INIT_RUN] == pretrain_run.run_id
        assert run.info.status == "FINISHED"
        assert result["steps"] == 2
    assert runs[0].data.params["finetune.new_parameters"] == '["fields.u.time_position", "fields.v.time_position"]'
    assert "forecast/rmse/u_850/lead_2h" in runs[0].data.metrics
    assert "downscaling/rmse/v_850/factor_2" in runs[1].data.metrics
    assert runs[2].data.params["finetune.new_parameters"] == '["fields.q"]'
    assert "forecast/rmse/q_850/lead_1h" in runs[2].data.metrics
    changes = json.loads(Path(new_field_artifact).read_text())
    assert all(name.startswith("fields.q.") for name in changes["new"])
    assert all(name.startswith(("fields.u.", "fields.v.")) for name in changes["frozen"])
