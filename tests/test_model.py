import json

import pytest
import torch
from pydantic import ValidationError

from models.atmorep import AtmoRep
from models.checkpoint import check_compatible, load_checkpoint, load_model, save_checkpoint
from models.config import CONFIG_VERSION, ModelConfig, RunConfig, load_preset
from models.losses import masked_mse
from models.masking import bert_mask
from models.tokens import expand_token_mask

SMALL = ModelConfig(
    fields=[{"name": "t2m", "token_shape": (2, 8, 8), "num_tokens": (3, 2, 2)}],
    embed_dim=32,
    depth=2,
    num_heads=2,
)
# Two coupled fields with different levels, token sizes and crops, and an ensemble.
COUPLED = ModelConfig(
    fields=[
        {"name": "u", "levels": [500, 850], "token_shape": (2, 8, 8), "num_tokens": (3, 2, 2), "neighbours": ["d2m"]},
        {"name": "d2m", "token_shape": (2, 4, 4), "num_tokens": (3, 2, 3), "neighbours": ["u"]},
    ],
    embed_dim=32,
    depth=2,
    decoder_depth=1,
    num_heads=2,
    ensemble_size=3,
    loss="crps",
)


def inputs(config: ModelConfig, batch: int = 2, seed: int = 0):
    """Random fields, BERT masks at rate 0.5 and time features for `config`, per field name."""
    generator = torch.Generator().manual_seed(seed)
    fields, masks = {}, {}
    for field in config.fields:
        fields[field.name] = torch.randn((batch, field.num_levels, *field.sample_shape), generator=generator)
        masks[field.name] = bert_mask(batch, field.num_levels, field.num_tokens, 0.5, generator)
    time_features = torch.randn((batch, config.sample_shape[0], 5), generator=generator)
    return fields, masks, time_features


# Configuration


def test_demo_preset_values():
    config = load_preset("demo")

    assert config.version == CONFIG_VERSION
    assert config.model.field_names == ["t2m"]
    assert config.model.fields[0].token_shape == (2, 8, 8)
    assert config.model.fields[0].num_tokens == (6, 4, 6)
    assert config.model.sample_shape == (12, 32, 48)
    assert config.model.ensemble_size == 1
    assert config.train.dataset == "era5-t2m-uk-2019-03"
    assert config.masking.weights.downscaling == 0.2
    assert config.model.residual
    assert config.masking.forecast_fill == "persistence"


def test_multifield_preset_values():
    config = load_preset("pl-multifield")

    assert config.model.field_names == ["u", "v", "q", "tcw", "d2m"]
    assert all(field.neighbours for field in config.model.fields)
    assert config.model.field("d2m").sample_shape == (6, 24, 24)
    assert config.model.sample_shape == (6, 32, 32)
    assert config.model.ensemble_size > 1
    assert config.train.dataset == "era5-pl-2020-01-01"


def test_preset_dotted_overrides():
    forecast_only = {"forecast": 1, "bert": 0, "interpolation": 0}
    config = load_preset("demo", {"train.max_steps": 7, "masking.weights": forecast_only})

    assert config.train.max_steps == 7
    assert config.masking.weights.forecast == 1
    assert config.masking.weights.bert == 0


def test_preset_unknown_key_named():
    with pytest.raises(ValidationError, match="max_step"):
        load_preset("demo", {"train.max_step": 7})


def test_preset_override_into_value_rejected():
    with pytest.raises(ValueError, match="train.max_steps"):
        load_preset("demo", {"train.max_steps.value": 7})


def test_preset_unknown_name():
    with pytest.raises(FileNotFoundError, match="demo"):
        load_preset("no-such-preset")


def test_preset_from_json_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(load_preset("demo", {"train.seed": 3}).model_dump_json())

    assert load_preset(path).train.seed == 3


def test_config_rejects_unknown_neighbour():
    with pytest.raises(ValidationError, match=r"neighbours \['v'\]"):
        ModelConfig(fields=[{"name": "u", "neighbours": ["v"]}])


def test_config_rejects_unequal_time_tokens():
    fields = [{"name": "u"}, {"name": "v", "token_shape": (3, 8, 8), "num_tokens": (4, 4, 6)}]

    with pytest.raises(ValidationError, match="share the time tokens"):
        ModelConfig(fields=fields)


def test_config_rejects_ensemble_loss_without_members():
    with pytest.raises(ValidationError, match="ensemble_size >= 2"):
        ModelConfig(loss="crps", ensemble_size=1)


def test_config_rejects_coarsen_factor_not_dividing_token():
    with pytest.raises(ValidationError, match="coarsen_factor"):
        RunConfig.model_validate({"masking": {"coarsen_factor": 3}})


def test_config_rejects_long_forecast():
    with pytest.raises(ValidationError, match="forecast_tokens"):
        RunConfig.model_validate({"masking": {"forecast_tokens": 6}})


def test_config_rejects_long_interpolation_gap():
    with pytest.raises(ValidationError, match="interpolation_tokens"):
        RunConfig.model_validate({"masking": {"interpolation_tokens": [5]}})


def test_config_levels_define_channels():
    config = ModelConfig(fields=[{"name": "t2m"}, {"name": "t", "levels": [850, 500]}, {"name": "u", "levels": [850]}])

    assert config.channels == [("t2m", None), ("t", 850), ("t", 500), ("u", 850)]
    assert config.channel_names == ["t2m", "t_850", "t_500", "u_850"]
    assert config.levels == {"t": [850, 500], "u": [850]}


def test_version_1_config_migrated(caplog):
    old = {
        "model": {"variables": ["t2m", "t"], "levels": {"t": [850]}, "token_shape": [2, 8, 8],
                  "sample_shape": [12, 32, 48], "embed_dim": 64},
        "masking": {},
        "train": {"max_steps": 5},
    }

    config = RunConfig.model_validate(old)

    assert config.version == CONFIG_VERSION
    assert config.model.field_names == ["t2m", "t"]
    assert config.model.field("t").levels == [850]
    assert config.model.field("t").num_tokens == (6, 4, 6)
    assert config.model.field("t2m").neighbours == ["t"]
    assert config.model.architecture_version == 1
    assert config.model.embed_dim == 64
    assert "version-1 keys" in caplog.text


def test_newer_config_version_rejected():
    with pytest.raises(ValidationError, match="version 3 is not supported"):
        RunConfig.model_validate({"version": 3})


def test_version_1_model_not_built():
    config = RunConfig.model_validate({"model": {"variables": ["t2m"]}})

    with pytest.raises(ValueError, match="architecture_version 1"):
        AtmoRep(config.model)


# Model


def test_forward_demo_shape():
    config = load_preset("demo").model
    model = AtmoRep(config)
    fields, masks, time_features = inputs(config)

    members = model(fields, masks, time_features)

    assert members["t2m"].shape == (2, 1, 1, 12, 32, 48)
    assert members["t2m"].dtype == torch.float32
    assert bool(torch.isfinite(members["t2m"]).all())


def test_forward_coupled_fields_shapes():
    model = AtmoRep(COUPLED)
    fields, masks, time_features = inputs(COUPLED, batch=3)

    members = model(fields, masks, time_features)

    assert members["u"].shape == (3, 3, 2, 6, 16, 16)
    assert members["d2m"].shape == (3, 3, 1, 6, 8, 12)
    assert not torch.allclose(members["u"][:, 0], members["u"][:, 1])


def test_cross_attention_couples_neighbours():
    torch.manual_seed(0)
    model = AtmoRep(COUPLED).eval()
    fields, masks, time_features = inputs(COUPLED)
    changed = dict(fields, d2m=fields["d2m"] + 1.0)

    with torch.no_grad():
        reference = model(fields, masks, time_features)["u"]
        other = model(changed, masks, time_features)["u"]

    assert not torch.allclose(reference, other)


def test_uncoupled_fields_independent():
    uncoupled = ModelConfig.model_validate(
        COUPLED.model_dump() | {"fields": [field.model_dump() | {"neighbours": []} for field in COUPLED.fields]}
    )
    torch.manual_seed(0)
    model = AtmoRep(uncoupled).eval()
    fields, masks, time_features = inputs(uncoupled)
    changed = dict(fields, d2m=fields["d2m"] + 1.0)

    with torch.no_grad():
        reference = model(fields, masks, time_features)["u"]
        other = model(changed, masks, time_features)["u"]

    assert torch.equal(reference, other)


def test_forward_uses_mask_and_time_features():
    torch.manual_seed(0)
    model = AtmoRep(SMALL).eval()
    fields, masks, time_features = inputs(SMALL)
    inverted = {name: ~mask for name, mask in masks.items()}
    later_year = time_features.clone()
    later_year[..., 4] += 0.1

    with torch.no_grad():
        reference = model(fields, masks, time_features)["t2m"]
        other_mask = model(fields, inverted, time_features)["t2m"]
        other_year = model(fields, masks, later_year)["t2m"]

    assert not torch.allclose(reference, other_mask)
    assert not torch.allclose(reference, other_year)


def test_forward_rejects_wrong_shapes():
    model = AtmoRep(COUPLED)
    fields, masks, time_features = inputs(COUPLED)

    with pytest.raises(ValueError, match="field 'u' must have shape"):
        model(dict(fields, u=fields["u"][:, :1]), masks, time_features)
    with pytest.raises(ValueError, match="mask of field 'd2m' must be bool"):
        model(fields, dict(masks, d2m=masks["d2m"].float()), time_features)
    with pytest.raises(ValueError, match="must contain the fields"):
        model({"u": fields["u"]}, masks, time_features)
    with pytest.raises(ValueError, match="time_features"):
        model(fields, masks, time_features[..., :4])


def test_every_parameter_gets_gradient():
    from models.losses import ensemble_loss

    model = AtmoRep(COUPLED)
    fields, masks, time_features = inputs(COUPLED)
    members = model(fields, masks, time_features)

    loss = sum(
        ensemble_loss("crps", members[field.name], fields[field.name], masks[field.name], field.token_shape)
        for field in COUPLED.fields
    )
    loss.backward()

    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert missing == []


# Deterministic loss


def test_masked_mse_value():
    target = torch.zeros(1, 1, 2, 4, 4)
    prediction = torch.zeros(1, 1, 2, 4, 4)
    prediction[0, 0, :, :2, :2] = 2.0  # token (0, 0, 0): squared error 4
    prediction[0, 0, :, 2:, 2:] = 1.0  # token (0, 1, 1): squared error 1, unmasked
    mask = torch.zeros(1, 1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0, 0] = True
    mask[0, 0, 0, 0, 1] = True

    loss = masked_mse(prediction, target, mask, (2, 2, 2))

    assert float(loss) == pytest.approx(2.0)


def test_masked_mse_ignores_unmasked_predictions():
    fields, masks, _ = inputs(SMALL)
    x, mask = fields["t2m"], masks["t2m"]
    token_shape = SMALL.fields[0].token_shape
    prediction = torch.randn_like(x)
    points = expand_token_mask(mask, token_shape)

    changed = prediction.clone()
    changed[~points] += 10.0
    changed_masked = prediction.clone()
    changed_masked[points] += 1.0

    loss = masked_mse(prediction, x, mask, token_shape)
    assert torch.equal(masked_mse(changed, x, mask, token_shape), loss)
    assert not torch.equal(masked_mse(changed_masked, x, mask, token_shape), loss)


def test_masked_mse_gradient_only_on_masked_points():
    fields, masks, _ = inputs(SMALL)
    x, mask = fields["t2m"], masks["t2m"]
    token_shape = SMALL.fields[0].token_shape
    prediction = torch.randn_like(x, requires_grad=True)

    masked_mse(prediction, x, mask, token_shape).backward()

    points = expand_token_mask(mask, token_shape)
    assert bool((prediction.grad[~points] == 0).all())
    assert bool((prediction.grad[points] != 0).all())


def test_masked_mse_rejects_empty_mask():
    fields, masks, _ = inputs(SMALL)

    with pytest.raises(ValueError, match="no token"):
        masked_mse(fields["t2m"], fields["t2m"], torch.zeros_like(masks["t2m"]), SMALL.fields[0].token_shape)


# Checkpoints


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    config = RunConfig.model_validate(
        {"model": COUPLED.model_dump(), "masking": {"forecast_tokens": 1, "interpolation_tokens": [1]}}
    )
    model = AtmoRep(COUPLED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fields, masks, time_features = inputs(COUPLED)
    members = model(fields, masks, time_features)
    (members["u"].square().mean() + members["d2m"].square().mean()).backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = tmp_path / "run" / "checkpoint.pt"
    rng_state = torch.get_rng_state()

    save_checkpoint(
        path, model=model, config=config, step=5, optimizer=optimizer, scheduler=scheduler, loss=0.5,
        rng=[{"torch": rng_state}],
    )
    loaded, loaded_config = load_model(path)

    assert loaded_config == config
    assert not loaded.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(fields, masks, time_features)["u"], model(fields, masks, time_features)["u"])
    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == 5
    assert checkpoint["loss"] == 0.5
    assert len(checkpoint["optimizer"]["state"]) == len(list(model.parameters()))
    assert checkpoint["scheduler"]["last_epoch"] == 0
    assert torch.equal(checkpoint["rng"][0]["torch"], rng_state)
    assert json.loads(json.dumps(checkpoint["config"])) == config.model_dump(mode="json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


def test_load_model_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")


def test_check_compatible_names_mismatch():
    fields = [SMALL.fields[0].model_dump() | {"num_tokens": (3, 2, 4)}]
    other = ModelConfig.model_validate(SMALL.model_dump() | {"embed_dim": 64, "fields": fields})

    with pytest.raises(ValueError, match="model.embed_dim: checkpoint 32, config 64") as error:
        check_compatible(SMALL, other, "ckpt.pt")

    assert "model.fields[t2m].num_tokens: checkpoint [3, 2, 2], config [3, 2, 4]" in str(error.value)
    assert "ckpt.pt" in str(error.value)


def test_check_compatible_names_field_list_change():
    with pytest.raises(ValueError, match=r"model.fields names: checkpoint \['t2m'\], config \['u', 'd2m'\]"):
        check_compatible(SMALL, COUPLED, "ckpt.pt")


def test_check_compatible_allows_dropout_and_loss():
    changed = COUPLED.model_dump() | {"dropout": 0.1, "loss": "mse_stats"}
    check_compatible(COUPLED, ModelConfig.model_validate(changed), "ckpt.pt")


def test_version_1_checkpoint_names_changed_setting(tmp_path):
    path = tmp_path / "old.pt"
    old_config = {
        "model": {"variables": ["t2m"], "token_shape": [2, 8, 8], "sample_shape": [6, 16, 16],
                  "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "dropout": 0.0},
        "masking": {"forecast_tokens": 1, "interpolation_tokens": [1]},
        "train": {},
    }
    torch.save({"model": {}, "config": old_config, "step": 1}, path)

    with pytest.raises(ValueError, match="model.architecture_version 1") as error:
        load_model(path)
    assert str(path) in str(error.value)

    migrated = RunConfig.model_validate(old_config).model
    current = ModelConfig.model_validate(migrated.model_dump() | {"architecture_version": 2})
    with pytest.raises(ValueError, match="model.architecture_version: checkpoint 1, config 2"):
        check_compatible(migrated, current, path)


def test_residual_model_starts_at_input():
    config = SMALL.model_copy(update={"residual": True})
    model = AtmoRep(config)
    fields, masks, time_features = inputs(config)

    members = model(fields, masks, time_features)

    # The heads start at zero, so every member is the input itself: the fill's baseline.
    assert torch.equal(members["t2m"][:, 0], fields["t2m"])
    target = fields["t2m"] + 1.0
    loss = masked_mse(members["t2m"][:, 0], target, masks["t2m"], (2, 8, 8))
    loss.backward()
    assert float(model.fields["t2m"].heads.weight.grad.abs().sum()) > 0


def test_plain_model_does_not_add_its_input():
    model = AtmoRep(SMALL)
    fields, masks, time_features = inputs(SMALL)
    residual = AtmoRep(SMALL.model_copy(update={"residual": True}))
    residual.load_state_dict(model.state_dict())

    plain_members = model(fields, masks, time_features)["t2m"]
    residual_members = residual(fields, masks, time_features)["t2m"]

    assert torch.allclose(residual_members - plain_members, fields["t2m"][:, None], atol=1e-5)
