import json

import pytest
import torch
from pydantic import ValidationError

from models.atmorep import AtmoRep
from models.checkpoint import check_compatible, load_checkpoint, load_model, save_checkpoint
from models.config import ModelConfig, RunConfig, load_preset
from models.masking import bert_mask, masked_mse
from models.tokens import expand_token_mask

SMALL = ModelConfig(sample_shape=(6, 16, 16), token_shape=(2, 8, 8), embed_dim=32, depth=2, num_heads=2)


def inputs(config: ModelConfig, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, config.num_channels, *config.sample_shape), generator=generator)
    mask = bert_mask(batch, config.num_channels, config.grid_tokens, 0.5, generator)
    time_features = torch.randn((batch, config.sample_shape[0], 4), generator=generator)
    return x, mask, time_features


# Configuration


def test_demo_preset_values():
    config = load_preset("demo")

    assert config.model.variables == ["t2m"]
    assert config.model.token_shape == (2, 8, 8)
    assert config.model.sample_shape == (12, 32, 48)
    assert config.model.grid_tokens == (6, 4, 6)
    assert config.train.dataset == "era5-t2m-uk-2019-03"
    assert config.masking.weights.downscaling == 0


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


def test_config_rejects_uneven_sample_shape():
    with pytest.raises(ValidationError, match="not a multiple"):
        ModelConfig(sample_shape=(12, 30, 48))


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
    config = ModelConfig(variables=["t2m", "t", "u"], levels={"t": [850, 500], "u": [850]})

    assert config.channels == [("t2m", None), ("t", 850), ("t", 500), ("u", 850)]
    assert config.channel_names == ["t2m", "t_850", "t_500", "u_850"]
    assert config.num_channels == 4


def test_config_levels_for_unknown_variable():
    with pytest.raises(ValidationError, match="'q'"):
        ModelConfig(variables=["t"], levels={"q": [850]})


# Model


def test_forward_demo_shape():
    config = load_preset("demo").model
    model = AtmoRep(config)
    x, mask, time_features = inputs(config)

    prediction = model(x, mask, time_features)

    assert prediction.shape == (2, 1, 12, 32, 48)
    assert prediction.dtype == torch.float32
    assert bool(torch.isfinite(prediction).all())


def test_forward_multi_channel_shape():
    levels = {"variables": ["t2m", "t"], "levels": {"t": [850, 500]}}
    config = ModelConfig.model_validate(SMALL.model_dump() | levels)
    model = AtmoRep(config)
    x, mask, time_features = inputs(config, batch=3)

    prediction = model(x, mask, time_features)

    assert prediction.shape == (3, 3, 6, 16, 16)


def test_forward_uses_mask_and_time_features():
    torch.manual_seed(0)
    model = AtmoRep(SMALL).eval()
    x, mask, time_features = inputs(SMALL)

    with torch.no_grad():
        reference = model(x, mask, time_features)
        other_mask = model(x, ~mask, time_features)
        other_time = model(x, mask, time_features + 1.0)

    assert not torch.allclose(reference, other_mask)
    assert not torch.allclose(reference, other_time)


def test_forward_rejects_wrong_shapes():
    model = AtmoRep(SMALL)
    x, mask, time_features = inputs(SMALL)

    with pytest.raises(ValueError, match="x must have shape"):
        model(x[:, :, :4], mask, time_features)
    with pytest.raises(ValueError, match="mask must be bool"):
        model(x, mask.float(), time_features)
    with pytest.raises(ValueError, match="time_features"):
        model(x, mask, time_features[:, :4])


def test_every_parameter_gets_gradient():
    model = AtmoRep(SMALL)
    x, mask, time_features = inputs(SMALL)

    masked_mse(model(x, mask, time_features), x, mask, SMALL.token_shape).backward()

    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert missing == []


# Loss


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
    x, mask, _ = inputs(SMALL)
    prediction = torch.randn_like(x)
    points = expand_token_mask(mask, SMALL.token_shape)

    changed = prediction.clone()
    changed[~points] += 10.0
    changed_masked = prediction.clone()
    changed_masked[points] += 1.0

    loss = masked_mse(prediction, x, mask, SMALL.token_shape)
    assert torch.equal(masked_mse(changed, x, mask, SMALL.token_shape), loss)
    assert not torch.equal(masked_mse(changed_masked, x, mask, SMALL.token_shape), loss)


def test_masked_mse_gradient_only_on_masked_points():
    x, mask, _ = inputs(SMALL)
    prediction = torch.randn_like(x, requires_grad=True)

    masked_mse(prediction, x, mask, SMALL.token_shape).backward()

    points = expand_token_mask(mask, SMALL.token_shape)
    assert bool((prediction.grad[~points] == 0).all())
    assert bool((prediction.grad[points] != 0).all())


def test_masked_mse_rejects_empty_mask():
    x, mask, _ = inputs(SMALL)

    with pytest.raises(ValueError, match="no token"):
        masked_mse(x, x, torch.zeros_like(mask), SMALL.token_shape)


# Checkpoints


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    config = RunConfig.model_validate(
        {"model": SMALL.model_dump(), "masking": {"forecast_tokens": 1, "interpolation_tokens": [1]}}
    )
    model = AtmoRep(SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, mask, time_features = inputs(SMALL)
    masked_mse(model(x, mask, time_features), x, mask, SMALL.token_shape).backward()
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
        assert torch.equal(loaded(x, mask, time_features), model(x, mask, time_features))
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
    other = ModelConfig.model_validate(SMALL.model_dump() | {"embed_dim": 64, "sample_shape": (6, 16, 32)})

    with pytest.raises(ValueError, match="model.embed_dim: checkpoint 32, config 64") as error:
        check_compatible(SMALL, other, "ckpt.pt")

    assert "model.sample_shape" in str(error.value)
    assert "ckpt.pt" in str(error.value)


def test_check_compatible_allows_dropout():
    check_compatible(SMALL, ModelConfig.model_validate(SMALL.model_dump() | {"dropout": 0.1}), "ckpt.pt")
