"""Token masks, model inputs built from them, and the masked reconstruction loss.

A token mask `mask: [B, C, nT, nH, nW]` is boolean, and True marks a token that the model
must predict. The strategies are:

- `bert`: a random subset of tokens per sample, at a rate drawn uniformly from
  (0, bert_max_rate]. Masked tokens are zeroed, replaced by standard normal noise, or
  replaced by their coarsened version, in the proportions of `MaskingConfig.bert_fill`.
- `forecast`: the last `forecast_tokens` time tokens, whole grid and all channels, zeroed.
- `interpolation`: a run of time tokens that never includes the first or the last time
  token, whole grid and all channels, zeroed.
- `downscaling`: every token masked and replaced by its coarsened version, so the model
  reconstructs the full-resolution field from a block-averaged one.

Fields are normalised, so zero is the climatological mean and unit-variance noise has the
scale of the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from models.config import MaskingConfig
from models.tokens import expand_token_mask, tokenise

STRATEGIES = ("bert", "forecast", "interpolation", "downscaling")
FILLS = ("zero", "noise", "coarsen")


@dataclass(frozen=True)
class MaskedBatch:
    """Model input built by one masking strategy.

    inputs: [B, C, T, H, W] corrupted field.
    mask: [B, C, nT, nH, nW] bool, True = masked.
    """

    inputs: Tensor
    mask: Tensor
    strategy: str


def _empty_mask(batch: int, channels: int, grid_tokens: tuple[int, int, int]) -> Tensor:
    return torch.zeros((batch, channels, *grid_tokens), dtype=torch.bool)


def forecast_mask(batch: int, channels: int, grid_tokens: tuple[int, int, int], n_tokens: int) -> Tensor:
    """Mask the last `n_tokens` time tokens of every channel and grid cell.

    Returns [B, C, nT, nH, nW] bool. Raises ValueError unless 1 <= n_tokens < nT.
    """
    n_time = grid_tokens[0]
    if not 1 <= n_tokens < n_time:
        raise ValueError(f"forecast needs 1 <= n_tokens < {n_time} time tokens, got n_tokens={n_tokens}")
    mask = _empty_mask(batch, channels, grid_tokens)
    mask[:, :, n_time - n_tokens :] = True
    return mask


def interpolation_mask(
    batch: int, channels: int, grid_tokens: tuple[int, int, int], start: int, n_tokens: int
) -> Tensor:
    """Mask time tokens `start` to `start + n_tokens - 1` of every channel and grid cell.

    Returns [B, C, nT, nH, nW] bool. The first and last time tokens must stay visible, so
    ValueError is raised unless 1 <= start and start + n_tokens <= nT - 1.
    """
    n_time = grid_tokens[0]
    if n_tokens < 1 or start < 1 or start + n_tokens > n_time - 1:
        raise ValueError(
            f"interpolation gap of {n_tokens} tokens at time token {start} must lie strictly "
            f"inside the {n_time} time tokens (1 <= start, start + n_tokens <= {n_time - 1})"
        )
    mask = _empty_mask(batch, channels, grid_tokens)
    mask[:, :, start : start + n_tokens] = True
    return mask


def bert_mask(
    batch: int,
    channels: int,
    grid_tokens: tuple[int, int, int],
    rate: float | Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask a uniformly random subset of each sample's tokens.

    `rate` is one float for the batch or a [B] tensor of per-sample rates in [0, 1]. Each
    sample gets exactly max(1, round(rate * C * nT * nH * nW)) masked tokens, so the loss
    is never empty. Returns [B, C, nT, nH, nW] bool.
    """
    n_tokens = channels * grid_tokens[0] * grid_tokens[1] * grid_tokens[2]
    rates = torch.as_tensor(rate, dtype=torch.float64).expand(batch)
    if bool(((rates < 0) | (rates > 1)).any()):
        raise ValueError(f"BERT mask rate must lie in [0, 1], got {rates.tolist()}")
    counts = torch.round(rates * n_tokens).long().clamp(min=1)

    # Rank random scores within each sample: the tokens with the `count` lowest scores are masked.
    scores = torch.rand((batch, n_tokens), generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    mask = ranks < counts[:, None]
    return mask.reshape(batch, channels, *grid_tokens)


def downscaling_mask(batch: int, channels: int, grid_tokens: tuple[int, int, int]) -> Tensor:
    """Mask every token: [B, C, nT, nH, nW] all True."""
    return torch.ones((batch, channels, *grid_tokens), dtype=torch.bool)


def coarsen(x: Tensor, factor: int) -> Tensor:
    """Average `factor x factor` blocks of grid points and repeat each average over its block.

    x: [..., H, W] -> same shape. H and W must be multiples of `factor`. With tokens whose
    spatial size is a multiple of `factor`, coarsening the field equals coarsening each token.
    """
    *leading, height, width = x.shape
    if height % factor or width % factor:
        raise ValueError(f"grid {height} x {width} is not divisible by the coarsening factor {factor}")
    blocks = x.reshape(*leading, height // factor, factor, width // factor, factor)
    means = blocks.mean(dim=(-3, -1))
    return means.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _fill_codes(
    mask: Tensor, fill: str | Mapping[str, float], generator: torch.Generator | None
) -> Tensor:
    """Draw one fill code (index into FILLS) per token: [B, C, nT, nH, nW] long."""
    if isinstance(fill, str):
        if fill not in FILLS:
            raise ValueError(f"unknown fill {fill!r}: use one of {FILLS}")
        return torch.full(mask.shape, FILLS.index(fill), dtype=torch.long)

    unknown = set(fill) - set(FILLS)
    if unknown:
        raise ValueError(f"unknown fill names {sorted(unknown)}: use {FILLS}")
    proportions = torch.tensor([float(fill.get(name, 0.0)) for name in FILLS])
    if bool((proportions < 0).any()) or float(proportions.sum()) <= 0:
        raise ValueError(f"fill proportions must be non-negative with a positive sum, got {dict(fill)}")
    codes = torch.multinomial(proportions, mask.numel(), replacement=True, generator=generator)
    return codes.reshape(mask.shape)


def corrupt(
    x: Tensor,
    mask: Tensor,
    token_shape: tuple[int, int, int],
    fill: str | Mapping[str, float] = "zero",
    coarsen_factor: int = 4,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Build the model input by replacing the content of masked tokens.

    x: [B, C, T, H, W] normalised field.
    mask: [B, C, nT, nH, nW] bool.
    `fill` is "zero", "noise" (standard normal) or "coarsen" for every masked token, or a
    mapping of proportions such as {"zero": 0.4, "noise": 0.2, "coarsen": 0.4} from which
    each masked token draws its own fill. Unmasked tokens are returned unchanged.
    Returns [B, C, T, H, W] on the device of `x`.
    """
    codes = _fill_codes(mask, fill, generator).to(x.device)
    point_mask = expand_token_mask(mask.to(x.device), token_shape)
    point_codes = expand_token_mask(codes, token_shape)

    result = x.clone()
    zero_points = point_mask & (point_codes == FILLS.index("zero"))
    result[zero_points] = 0.0

    noise_points = point_mask & (point_codes == FILLS.index("noise"))
    if bool(noise_points.any()):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        result[noise_points] = noise[noise_points]

    coarse_points = point_mask & (point_codes == FILLS.index("coarsen"))
    if bool(coarse_points.any()):
        coarse = coarsen(x, coarsen_factor)
        result[coarse_points] = coarse[coarse_points]
    return result


def _draw_strategy(config: MaskingConfig, generator: torch.Generator | None) -> str:
    weights = torch.tensor([getattr(config.weights, name) for name in STRATEGIES], dtype=torch.float64)
    index = int(torch.multinomial(weights, 1, generator=generator))
    return STRATEGIES[index]


def _draw_int(low: int, high: int, generator: torch.Generator | None) -> int:
    """Draw an integer uniformly from [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def sample_mask(
    config: MaskingConfig,
    x: Tensor,
    token_shape: tuple[int, int, int],
    generator: torch.Generator | None = None,
    strategy: str | None = None,
) -> MaskedBatch:
    """Draw one strategy for the batch by `config.weights`, then build its mask and input.

    x: [B, C, T, H, W] normalised target field. `strategy` forces one strategy instead of
    drawing it. All random choices come from `generator`, so a seeded generator repeats
    the same masks. Returns a MaskedBatch whose `inputs` is on the device of `x`.
    """
    batch, channels, steps, height, width = x.shape
    grid = (steps // token_shape[0], height // token_shape[1], width // token_shape[2])
    strategy = strategy or _draw_strategy(config, generator)

    if strategy == "bert":
        rates = torch.rand(batch, generator=generator, dtype=torch.float64) * config.bert_max_rate
        mask = bert_mask(batch, channels, grid, rates, generator)
        fill: str | Mapping[str, float] = config.bert_fill.model_dump()
    elif strategy == "forecast":
        mask = forecast_mask(batch, channels, grid, config.forecast_tokens)
        fill = "zero"
    elif strategy == "interpolation":
        gaps = config.interpolation_tokens
        gap = gaps[_draw_int(0, len(gaps) - 1, generator)]
        start = _draw_int(1, grid[0] - 1 - gap, generator)
        mask = interpolation_mask(batch, channels, grid, start, gap)
        fill = "zero"
    elif strategy == "downscaling":
        mask = downscaling_mask(batch, channels, grid)
        fill = "coarsen"
    else:
        raise ValueError(f"unknown masking strategy {strategy!r}: use one of {STRATEGIES}")

    inputs = corrupt(x, mask, token_shape, fill, config.coarsen_factor, generator)
    return MaskedBatch(inputs=inputs, mask=mask.to(x.device), strategy=strategy)


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor, token_shape: tuple[int, int, int]) -> Tensor:
    """Mean squared error over the grid points of masked tokens only.

    prediction, target: [B, C, T, H, W].
    mask: [B, C, nT, nH, nW] bool.
    Every masked token weighs the same. Returns a scalar tensor in squared normalised units. Raises ValueError
    when no token is masked, because the mean would be undefined.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from target {tuple(target.shape)}")
    if not bool(mask.any()):
        raise ValueError("mask selects no token: the masked loss is undefined")

    squared_error = (prediction.float() - target.float()) ** 2
    per_token = tokenise(squared_error, token_shape).mean(dim=-1)
    return per_token[mask].mean()

