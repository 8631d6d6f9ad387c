"""Token masks per field, model inputs built from them, and the strategies that draw them.

A field's token mask `mask: [B, L, nT, nH, nW]` is boolean (L levels, the field's token
grid), and True marks a token that the model must predict. The mask functions below take
the number of channels `C` (a field's levels) and the token grid. One strategy is drawn
per batch and applied to every field with the same random choices, so all fields hide the
same time tokens. The strategies are:

- `bert`: a random subset of tokens per sample and field, at a rate drawn per sample
  uniformly from (0, bert_max_rate]. Each masked token draws its fill from the
  proportions of `MaskingConfig.bert_fill`.
- `forecast`: the last `forecast_tokens` time tokens, all levels and grid cells, filled
  with `MaskingConfig.forecast_fill`.
- `interpolation`: a run of time tokens that never includes the first or the last time
  token, all levels and grid cells, filled with `MaskingConfig.interpolation_fill`.
- `downscaling`: every token masked and replaced by its coarsened version, so the model
  reconstructs the full-resolution field from a block-averaged one.
- `causal`: every time token from a drawn time token k in [1, nT - 1] on, filled with
  `MaskingConfig.forecast_fill`, so the model predicts everything after time token k - 1
  from what precedes it, as GPT-style training does.

The fills (`FILLS`) are:

- `zero`: zeros. Fields are normalised, so zero is the climatological mean.
- `noise`: standard normal noise, which has the scale of the data.
- `coarsen`: the averages of `coarsen_factor` x `coarsen_factor` blocks of grid points,
  brought back to the fine grid by `MaskingConfig.coarsen_upsampling`.
- `persistence`: at each grid point, the value of the last visible time step before the
  masked one (the first visible one after it where none precedes it).
- `linear`: at each grid point, linear interpolation in time between the nearest visible
  steps before and after the masked one, or persistence where only one side has one.

The last three start the model from the baselines of downscaling, forecasting and
temporal interpolation. With `ModelConfig.residual` the model then predicts only the
correction to them. A point with no visible step at all gets zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.config import MaskingConfig
from models.tokens import expand_token_mask

STRATEGIES = ("bert", "forecast", "interpolation", "downscaling", "causal")
FILLS = ("zero", "noise", "coarsen", "persistence", "linear")
UPSAMPLING = ("repeat", "bilinear", "bicubic")


@dataclass(frozen=True)
class MaskedBatch:
    """Model inputs built by one masking strategy, per field name.

    inputs: field -> [B, L, T, H, W] corrupted field.
    masks: field -> [B, L, nT, nH, nW] bool, True = masked.
    """

    inputs: dict[str, Tensor]
    masks: dict[str, Tensor]
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


def causal_mask(batch: int, channels: int, grid_tokens: tuple[int, int, int], first_token: int) -> Tensor:
    """Mask every time token from `first_token` on, for every channel and grid cell.

    Returns [B, C, nT, nH, nW] bool. Time tokens before `first_token` stay visible, so
    ValueError is raised unless 1 <= first_token < nT.
    """
    n_time = grid_tokens[0]
    if not 1 <= first_token < n_time:
        raise ValueError(
            f"causal mask needs 1 <= first_token < {n_time} time tokens, got first_token={first_token}"
        )
    mask = _empty_mask(batch, channels, grid_tokens)
    mask[:, :, first_token:] = True
    return mask


def coarsen(x: Tensor, factor: int, upsampling: str = "repeat") -> Tensor:
    """Average `factor x factor` blocks of grid points and bring the averages back to the grid.

    x: [..., H, W] -> same shape. H and W must be multiples of `factor`. With `upsampling`
    "repeat" each average is repeated over its block; with tokens whose spatial size is a
    multiple of `factor`, coarsening the field then equals coarsening each token. With
    "bilinear" or "bicubic" the averages sit at their block centres and are interpolated
    between them (`torch.nn.functional.interpolate`, align_corners=False), as the
    downscaling baselines of `tasks.baselines` do.
    """
    if upsampling not in UPSAMPLING:
        raise ValueError(f"unknown coarsen upsampling {upsampling!r}: use one of {UPSAMPLING}")
    *leading, height, width = x.shape
    if height % factor or width % factor:
        raise ValueError(f"grid {height} x {width} is not divisible by the coarsening factor {factor}")
    blocks = x.reshape(*leading, height // factor, factor, width // factor, factor)
    means = blocks.mean(dim=(-3, -1))
    if upsampling == "repeat":
        return means.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    images = means.reshape(-1, 1, height // factor, width // factor)
    upsampled = F.interpolate(images, size=(height, width), mode=upsampling, align_corners=False)
    return upsampled.reshape(x.shape)


def fill_in_time(x: Tensor, point_mask: Tensor, mode: str) -> Tensor:
    """Fill masked points from the visible time steps at the same grid point.

    x: [B, C, T, H, W]; point_mask: [B, C, T, H, W] bool, True = masked. `mode` is
    "persistence" (the last visible step before, else the first one after) or "linear"
    (linear in time between the nearest visible steps before and after, else
    persistence). Points with no visible step get zero. Returns a tensor shaped like x
    whose values at visible points are x's.
    """
    if mode not in ("persistence", "linear"):
        raise ValueError(f"unknown time fill {mode!r}: use 'persistence' or 'linear'")
    steps = x.shape[2]
    time = torch.arange(steps, device=x.device).view(1, 1, steps, 1, 1).expand(x.shape)
    visible = ~point_mask
    # Nearest visible step at or before each step (-1 where none), and at or after it (`steps` where none).
    before = torch.where(visible, time, torch.full_like(time, -1)).cummax(dim=2).values
    after = torch.where(visible, time, torch.full_like(time, steps)).flip(2).cummin(dim=2).values.flip(2)
    has_before, has_after = before >= 0, after < steps
    value_before = x.gather(2, before.clamp(min=0))
    value_after = x.gather(2, after.clamp(max=steps - 1))

    zeros = torch.zeros_like(x)
    filled = torch.where(has_before, value_before, torch.where(has_after, value_after, zeros))
    if mode == "linear":
        both = has_before & has_after
        span = (after - before).clamp(min=1).to(x.dtype)
        weight = (time - before).to(x.dtype) / span
        filled = torch.where(both, value_before + weight * (value_after - value_before), filled)
    return filled


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
    upsampling: str = "repeat",
) -> Tensor:
    """Build the model input by replacing the content of masked tokens.

    x: [B, C, T, H, W] normalised field.
    mask: [B, C, nT, nH, nW] bool.
    `fill` is one of `FILLS` for every masked token, or a mapping of proportions such as
    {"zero": 0.4, "noise": 0.2, "coarsen": 0.4} from which each masked token draws its own
    fill. The time fills read only visible tokens. `upsampling` is the coarsen fill's
    `coarsen` mode. Unmasked tokens are returned unchanged.
    Returns [B, C, T, H, W] on the device of `x`.
    """
    codes = _fill_codes(mask, fill, generator).to(x.device)
    point_mask = expand_token_mask(mask.to(x.device), token_shape)
    point_codes = expand_token_mask(codes, token_shape)

    result = x.clone()
    for code, name in enumerate(FILLS):
        points = point_mask & (point_codes == code)
        if not bool(points.any()):
            continue
        if name == "zero":
            result[points] = 0.0
            continue
        if name == "noise":
            values = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        elif name == "coarsen":
            values = coarsen(x, coarsen_factor, upsampling)
        else:
            values = fill_in_time(x, point_mask, name)
        result[points] = values[points]
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
    fields: Mapping[str, Tensor],
    token_shapes: Mapping[str, tuple[int, int, int]],
    generator: torch.Generator | None = None,
    strategy: str | None = None,
) -> MaskedBatch:
    """Draw one strategy for the batch by `config.weights`, then build every field's mask and input.

    fields: name -> [B, L, T, H, W] normalised target. token_shapes: name -> (tT, tH, tW).
    All fields must have the same number of time tokens, so the forecast, interpolation and
    causal masks cover the same time tokens in every field, and BERT uses the same
    per-sample rate in every field. `strategy` forces one strategy instead of drawing it.
    All random choices come from `generator`, so a seeded generator repeats the same
    masks. Each input and mask is on the device of its field.
    """
    if not fields:
        raise ValueError("sample_mask needs at least one field")
    grids = {}
    for name, x in fields.items():
        steps, height, width = x.shape[2:]
        token_t, token_h, token_w = token_shapes[name]
        grids[name] = (steps // token_t, height // token_h, width // token_w)
    time_token_counts = {grid[0] for grid in grids.values()}
    if len(time_token_counts) != 1:
        raise ValueError(f"fields must have the same number of time tokens, got token grids {grids}")
    n_time = time_token_counts.pop()
    batch = next(iter(fields.values())).shape[0]
    strategy = strategy or _draw_strategy(config, generator)

    # The batch's random choices are drawn once, so every field gets the same ones.
    fill: str | Mapping[str, float] = "zero"
    if strategy == "bert":
        rates = torch.rand(batch, generator=generator, dtype=torch.float64) * config.bert_max_rate
        fill = config.bert_fill.model_dump()
    elif strategy == "interpolation":
        gaps = config.interpolation_tokens
        gap = gaps[_draw_int(0, len(gaps) - 1, generator)]
        start = _draw_int(1, n_time - 1 - gap, generator)
        fill = config.interpolation_fill
    elif strategy == "causal":
        first_token = _draw_int(1, n_time - 1, generator)
        fill = config.forecast_fill
    elif strategy == "downscaling":
        fill = "coarsen"
    elif strategy == "forecast":
        fill = config.forecast_fill
    else:
        raise ValueError(f"unknown masking strategy {strategy!r}: use one of {STRATEGIES}")

    inputs, masks = {}, {}
    for name, x in fields.items():
        channels, grid = x.shape[1], grids[name]
        if strategy == "bert":
            mask = bert_mask(batch, channels, grid, rates, generator)
        elif strategy == "forecast":
            mask = forecast_mask(batch, channels, grid, config.forecast_tokens)
        elif strategy == "interpolation":
            mask = interpolation_mask(batch, channels, grid, start, gap)
        elif strategy == "causal":
            mask = causal_mask(batch, channels, grid, first_token)
        else:
            mask = downscaling_mask(batch, channels, grid)
        inputs[name] = corrupt(
            x, mask, token_shapes[name], fill, config.coarsen_factor, generator, config.coarsen_upsampling
        )
        masks[name] = mask.to(x.device)
    return MaskedBatch(inputs=inputs, masks=masks, strategy=strategy)
