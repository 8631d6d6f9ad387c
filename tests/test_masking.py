import pytest
import torch

from models.config import FillProportions, MaskingConfig, StrategyWeights
from models.masking import (
    bert_mask,
    causal_mask,
    coarsen,
    corrupt,
    downscaling_mask,
    fill_in_time,
    forecast_mask,
    interpolation_mask,
    sample_mask,
)
from models.tokens import expand_token_mask, tokenise

GRID = (6, 4, 6)
TOKEN_SHAPE = (2, 8, 8)
SHAPES = {"t": TOKEN_SHAPE}


def field(batch=4, channels=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, channels, 12, 32, 48), generator=generator)


def test_forecast_mask_last_time_tokens():
    mask = forecast_mask(3, 2, GRID, 2)

    assert mask.shape == (3, 2, *GRID)
    assert mask.dtype == torch.bool
    assert bool(mask[:, :, 4:].all())
    assert not bool(mask[:, :, :4].any())


@pytest.mark.parametrize("n_tokens", [0, 6, 7])
def test_forecast_mask_rejects_invalid_length(n_tokens):
    with pytest.raises(ValueError, match="n_tokens"):
        forecast_mask(1, 1, GRID, n_tokens)


def test_interpolation_mask_middle_run():
    mask = interpolation_mask(2, 3, GRID, start=2, n_tokens=3)

    assert mask.shape == (2, 3, *GRID)
    assert bool(mask[:, :, 2:5].all())
    assert not bool(mask[:, :, :2].any())
    assert not bool(mask[:, :, 5:].any())


@pytest.mark.parametrize(("start", "n_tokens"), [(0, 1), (4, 2), (1, 5), (2, 0)])
def test_interpolation_mask_keeps_ends_visible(start, n_tokens):
    with pytest.raises(ValueError, match="strictly inside"):
        interpolation_mask(1, 1, GRID, start, n_tokens)


def test_bert_mask_exact_counts_per_sample():
    rates = torch.tensor([0.0, 0.1, 0.25, 0.5, 1.0])
    n_tokens = 2 * 6 * 4 * 6

    mask = bert_mask(5, 2, GRID, rates, torch.Generator().manual_seed(1))

    counts = mask.reshape(5, -1).sum(dim=1).tolist()
    assert counts == [1, round(0.1 * n_tokens), round(0.25 * n_tokens), round(0.5 * n_tokens), n_tokens]


def test_bert_mask_generator_determinism():
    first = bert_mask(4, 1, GRID, 0.3, torch.Generator().manual_seed(7))
    again = bert_mask(4, 1, GRID, 0.3, torch.Generator().manual_seed(7))
    other = bert_mask(4, 1, GRID, 0.3, torch.Generator().manual_seed(8))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_bert_mask_differs_between_samples():
    mask = bert_mask(2, 1, GRID, 0.5, torch.Generator().manual_seed(0))

    assert not torch.equal(mask[0], mask[1])


def test_bert_mask_rejects_invalid_rate():
    with pytest.raises(ValueError, match="rate"):
        bert_mask(1, 1, GRID, 1.5)


def test_downscaling_mask_all_tokens():
    mask = downscaling_mask(2, 3, GRID)

    assert mask.shape == (2, 3, *GRID)
    assert bool(mask.all())


def test_coarsen_block_means():
    x = torch.arange(16.0).reshape(1, 4, 4)

    coarse = coarsen(x, 2)

    expected = torch.tensor(
        [[2.5, 2.5, 4.5, 4.5], [2.5, 2.5, 4.5, 4.5], [10.5, 10.5, 12.5, 12.5], [10.5, 10.5, 12.5, 12.5]]
    )
    assert torch.equal(coarse[0], expected)


def test_coarsen_keeps_shape_and_block_mean():
    x = field()

    coarse = coarsen(x, 4)

    assert coarse.shape == x.shape
    blocks = coarse.reshape(4, 2, 12, 8, 4, 12, 4)
    assert torch.allclose(blocks, blocks[:, :, :, :, :1, :, :1].expand_as(blocks))
    assert torch.allclose(coarse.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=1e-5)


def test_coarsen_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="coarsening factor"):
        coarsen(torch.zeros(1, 6, 8), 4)


def test_corrupt_zero_fill():
    x = field()
    mask = forecast_mask(4, 2, GRID, 2)

    inputs = corrupt(x, mask, TOKEN_SHAPE, "zero")

    points = expand_token_mask(mask, TOKEN_SHAPE)
    assert bool((inputs[points] == 0).all())
    assert torch.equal(inputs[~points], x[~points])


def test_corrupt_noise_fill():
    x = field()
    mask = bert_mask(4, 2, GRID, 0.5, torch.Generator().manual_seed(0))

    inputs = corrupt(x, mask, TOKEN_SHAPE, "noise", generator=torch.Generator().manual_seed(1))

    points = expand_token_mask(mask, TOKEN_SHAPE)
    assert torch.equal(inputs[~points], x[~points])
    assert not bool((inputs[points] == x[points]).any())
    assert abs(float(inputs[points].std()) - 1.0) < 0.05


def test_corrupt_coarsen_fill():
    x = field()
    mask = bert_mask(4, 2, GRID, 0.5, torch.Generator().manual_seed(0))

    inputs = corrupt(x, mask, TOKEN_SHAPE, "coarsen", coarsen_factor=4)

    points = expand_token_mask(mask, TOKEN_SHAPE)
    assert torch.equal(inputs[points], coarsen(x, 4)[points])
    assert torch.equal(inputs[~points], x[~points])


def test_corrupt_fill_proportions():
    x = field(batch=8)
    mask = downscaling_mask(8, 2, GRID)
    proportions = {"zero": 0.4, "noise": 0.2, "coarsen": 0.4}

    inputs = corrupt(x, mask, TOKEN_SHAPE, proportions, 4, torch.Generator().manual_seed(3))

    input_tokens = tokenise(inputs, TOKEN_SHAPE)
    coarse_tokens = tokenise(coarsen(x, 4), TOKEN_SHAPE)
    zero = (input_tokens == 0).all(dim=-1)
    coarse = (input_tokens == coarse_tokens).all(dim=-1)
    noise = ~zero & ~coarse
    total = mask.numel()
    assert abs(float(zero.sum()) / total - 0.4) < 0.05
    assert abs(float(coarse.sum()) / total - 0.4) < 0.05
    assert abs(float(noise.sum()) / total - 0.2) < 0.05


def test_corrupt_rejects_unknown_fill():
    x = field(batch=1)
    with pytest.raises(ValueError, match="unknown fill"):
        corrupt(x, downscaling_mask(1, 2, GRID), TOKEN_SHAPE, "mean")


def test_sample_mask_forced_strategies():
    x = field()
    config = MaskingConfig(forecast_tokens=3)
    generator = torch.Generator().manual_seed(0)

    forecast = sample_mask(config, {"t": x}, SHAPES, generator, strategy="forecast")
    downscaling = sample_mask(config, {"t": x}, SHAPES, generator, strategy="downscaling")

    assert forecast.strategy == "forecast"
    assert torch.equal(forecast.masks["t"], forecast_mask(4, 2, GRID, 3))
    assert torch.equal(downscaling.masks["t"], downscaling_mask(4, 2, GRID))
    assert torch.equal(downscaling.inputs["t"], coarsen(x, 4))


def test_sample_mask_forecast_only_weights():
    config = MaskingConfig(weights=StrategyWeights(bert=0, forecast=1, interpolation=0))
    generator = torch.Generator().manual_seed(0)

    strategies = {sample_mask(config, {"t": field(batch=1)}, SHAPES, generator).strategy for _ in range(20)}

    assert strategies == {"forecast"}


def test_sample_mask_interpolation_inside_window():
    config = MaskingConfig(
        weights=StrategyWeights(bert=0, forecast=0, interpolation=1), interpolation_tokens=[1, 2]
    )
    generator = torch.Generator().manual_seed(0)
    x = field(batch=1, channels=1)

    gaps = set()
    for _ in range(50):
        masked = sample_mask(config, {"t": x}, SHAPES, generator)
        time_tokens = masked.masks["t"][0, 0, :, 0, 0]
        assert not bool(time_tokens[0])
        assert not bool(time_tokens[-1])
        assert bool((masked.masks["t"] == masked.masks["t"][:, :, :, :1, :1]).all())
        gaps.add(int(time_tokens.sum()))

    assert gaps == {1, 2}


def test_sample_mask_bert_rates_and_fill():
    config = MaskingConfig(
        weights=StrategyWeights(bert=1, forecast=0, interpolation=0),
        bert_max_rate=0.3,
        bert_fill=FillProportions(zero=1, noise=0, coarsen=0),
    )
    x = field(batch=16, channels=1)

    masked = sample_mask(config, {"t": x}, SHAPES, torch.Generator().manual_seed(0))

    rates = masked.masks["t"].reshape(16, -1).float().mean(dim=1)
    assert bool((rates <= 0.3 + 1 / 144).all())
    assert bool((rates > 0).all())
    assert len(set(rates.tolist())) > 1
    points = expand_token_mask(masked.masks["t"], TOKEN_SHAPE)
    assert bool((masked.inputs["t"][points] == 0).all())


def test_sample_mask_strategy_frequencies():
    config = MaskingConfig()
    generator = torch.Generator().manual_seed(0)
    x = field(batch=1, channels=1)

    counts = {"bert": 0, "forecast": 0, "interpolation": 0, "downscaling": 0, "causal": 0}
    for _ in range(400):
        counts[sample_mask(config, {"t": x}, SHAPES, generator).strategy] += 1

    assert counts["downscaling"] == 0
    assert counts["causal"] == 0
    assert abs(counts["bert"] / 400 - 0.5) < 0.08
    assert abs(counts["forecast"] / 400 - 0.25) < 0.08
    assert abs(counts["interpolation"] / 400 - 0.25) < 0.08


def test_sample_mask_generator_determinism():
    config = MaskingConfig()
    x = field()

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return [sample_mask(config, {"t": x}, SHAPES, generator) for _ in range(10)]

    first, again, other = draw(5), draw(5), draw(6)

    for a, b in zip(first, again, strict=True):
        assert a.strategy == b.strategy
        assert torch.equal(a.masks["t"], b.masks["t"])
        assert torch.equal(a.inputs["t"], b.inputs["t"])
    assert any(not torch.equal(a.masks["t"], b.masks["t"]) for a, b in zip(first, other, strict=True))


def test_sample_mask_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown masking strategy"):
        sample_mask(MaskingConfig(), {"t": field(batch=1)}, SHAPES, strategy="inpainting")


def test_causal_mask_from_first_token():
    mask = causal_mask(2, 3, GRID, first_token=2)

    assert mask.shape == (2, 3, *GRID)
    assert bool(mask[:, :, 2:].all())
    assert not bool(mask[:, :, :2].any())


@pytest.mark.parametrize("first_token", [0, 6])
def test_causal_mask_keeps_input_and_target(first_token):
    with pytest.raises(ValueError, match="first_token"):
        causal_mask(1, 1, GRID, first_token)


def test_sample_mask_causal_masks_every_later_token():
    config = MaskingConfig(weights=StrategyWeights(bert=0, forecast=0, interpolation=0, causal=1))
    generator = torch.Generator().manual_seed(0)
    x = field(batch=2, channels=1)

    first_tokens = set()
    for _ in range(60):
        masked = sample_mask(config, {"t": x}, SHAPES, generator)
        time_tokens = masked.masks["t"][0, 0, :, 0, 0]
        first = int(time_tokens.int().argmax())
        assert masked.strategy == "causal"
        assert torch.equal(masked.masks["t"], causal_mask(2, 1, GRID, first))
        points = expand_token_mask(masked.masks["t"], TOKEN_SHAPE)
        assert bool((masked.inputs["t"][points] == 0).all())
        assert torch.equal(masked.inputs["t"][~points], x[~points])
        first_tokens.add(first)

    assert first_tokens == {1, 2, 3, 4, 5}


def two_fields(batch=3, seed=0):
    """Fields with the same 6 time tokens but other levels and spatial tokens."""
    generator = torch.Generator().manual_seed(seed)
    fields = {
        "u": torch.randn((batch, 3, 12, 32, 48), generator=generator),
        "d2m": torch.randn((batch, 1, 12, 24, 24), generator=generator),
    }
    return fields, {"u": (2, 8, 8), "d2m": (2, 4, 4)}


@pytest.mark.parametrize("strategy", ["forecast", "interpolation", "causal"])
def test_sample_mask_fields_share_time_tokens(strategy):
    fields, shapes = two_fields()
    config = MaskingConfig(forecast_tokens=2, interpolation_tokens=[2])

    masked = sample_mask(config, fields, shapes, torch.Generator().manual_seed(3), strategy=strategy)

    assert masked.masks["u"].shape == (3, 3, 6, 4, 6)
    assert masked.masks["d2m"].shape == (3, 1, 6, 6, 6)
    u_time = masked.masks["u"][:, 0, :, 0, 0]
    d2m_time = masked.masks["d2m"][:, 0, :, 0, 0]
    assert torch.equal(u_time, d2m_time)
    assert bool(u_time.any())
    assert not bool(u_time.all())


def test_sample_mask_bert_rate_shared_by_fields():
    fields, shapes = two_fields(batch=8)
    config = MaskingConfig(weights=StrategyWeights(bert=1, forecast=0, interpolation=0), bert_max_rate=0.8)

    masked = sample_mask(config, fields, shapes, torch.Generator().manual_seed(1))

    u_rates = masked.masks["u"].reshape(8, -1).float().mean(dim=1)
    d2m_rates = masked.masks["d2m"].reshape(8, -1).float().mean(dim=1)
    # Rounding to whole tokens: 216 tokens of u, 36 of d2m per sample.
    assert torch.allclose(u_rates, d2m_rates, atol=1 / 36)
    assert not torch.equal(masked.masks["u"][:, 0, :, :1, :1], masked.masks["u"][:, 1, :, :1, :1])


def test_sample_mask_downscaling_coarse_inputs_per_field():
    fields, shapes = two_fields()

    masked = sample_mask(MaskingConfig(), fields, shapes, strategy="downscaling")

    for name, x in fields.items():
        assert bool(masked.masks[name].all())
        assert torch.equal(masked.inputs[name], coarsen(x, 4))


def test_sample_mask_rejects_unequal_time_tokens():
    fields, shapes = two_fields()
    shapes["d2m"] = (4, 4, 4)

    with pytest.raises(ValueError, match="same number of time tokens"):
        sample_mask(MaskingConfig(), fields, shapes, strategy="forecast")


# Time fills and interpolated coarsening


def ramp_in_time(batch=1, channels=1, steps=6, height=2, width=2):
    """A field whose value at step t is 2 t + 1 at every grid point."""
    values = torch.arange(steps, dtype=torch.float32) * 2 + 1
    return values.view(1, 1, steps, 1, 1).expand(batch, channels, steps, height, width).clone()


def test_fill_in_time_linear_and_persistence_by_hand():
    x = ramp_in_time()
    point_mask = torch.zeros(x.shape, dtype=torch.bool)
    point_mask[:, :, 2:4] = True  # steps 2 and 3 hidden between visible steps 1 (3.0) and 4 (9.0)

    linear = fill_in_time(x, point_mask, "linear")[0, 0, :, 0, 0]
    persistence = fill_in_time(x, point_mask, "persistence")[0, 0, :, 0, 0]

    assert linear.tolist() == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
    assert persistence.tolist() == [1.0, 3.0, 3.0, 3.0, 9.0, 11.0]


def test_fill_in_time_edges_and_empty_points():
    x = ramp_in_time(height=1, width=2)
    point_mask = torch.zeros(x.shape, dtype=torch.bool)
    point_mask[..., 0, :, 0] = True  # first step hidden at the first point: only later steps
    point_mask[..., 4:, :, 0] = True  # last two steps hidden there too: only earlier steps
    point_mask[..., :, :, 1] = True  # nothing visible at the second point

    linear = fill_in_time(x, point_mask, "linear")[0, 0, :, 0]

    assert linear[:, 0].tolist() == [3.0, 3.0, 5.0, 7.0, 7.0, 7.0]
    assert linear[:, 1].tolist() == [0.0] * 6


def test_fill_in_time_rejects_unknown_mode():
    x = ramp_in_time()
    with pytest.raises(ValueError, match="'cubic'"):
        fill_in_time(x, torch.zeros(x.shape, dtype=torch.bool), "cubic")


def test_corrupt_persistence_fill_of_forecast_tokens():
    x = field(batch=2, channels=1)
    mask = forecast_mask(2, 1, GRID, 2)

    corrupted = corrupt(x, mask, TOKEN_SHAPE, "persistence")

    # The last visible step is step 7 (time tokens of 2 steps, tokens 4 and 5 hidden).
    assert torch.equal(corrupted[:, :, :8], x[:, :, :8])
    assert torch.equal(corrupted[:, :, 8:], x[:, :, 7:8].expand(-1, -1, 4, -1, -1))


def test_corrupt_linear_fill_matches_linear_baseline():
    from tasks.baselines import linear_interpolation

    x = field(batch=2, channels=1)
    mask = interpolation_mask(2, 1, GRID, 2, 2)  # steps 4 to 7 hidden

    corrupted = corrupt(x, mask, TOKEN_SHAPE, "linear")

    expected = linear_interpolation(x[:, :, 3].numpy(), x[:, :, 8].numpy(), 4)
    assert torch.allclose(corrupted[:, :, 4:8], torch.from_numpy(expected), atol=1e-6)
    assert torch.equal(corrupted[:, :, :4], x[:, :, :4])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_coarsen_interpolated_matches_upsampling_baseline(mode):
    from tasks import baselines

    x = field(batch=1, channels=2)

    upsampled = coarsen(x, 4, mode)

    upsample = baselines.bilinear_upsampling if mode == "bilinear" else baselines.bicubic_upsampling
    expected = upsample(baselines.block_average(x.numpy(), 4), 4)
    assert upsampled.shape == x.shape
    assert torch.allclose(upsampled, torch.from_numpy(expected), atol=1e-5)


def test_coarsen_rejects_unknown_upsampling():
    with pytest.raises(ValueError, match="'nearest'"):
        coarsen(field(batch=1), 4, "nearest")


def test_sample_mask_uses_configured_time_fills():
    config = MaskingConfig(
        weights=StrategyWeights(bert=0, forecast=1, interpolation=0, downscaling=0, causal=0),
        forecast_tokens=2,
        forecast_fill="persistence",
    )
    x = field(batch=2, channels=1)

    masked = sample_mask(config, {"t": x}, SHAPES, torch.Generator().manual_seed(0))

    assert torch.equal(masked.inputs["t"][:, :, 8:], x[:, :, 7:8].expand(-1, -1, 4, -1, -1))
