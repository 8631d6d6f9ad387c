"""Training losses over the masked tokens of one field, for deterministic and ensemble output.

Shapes: `members: [B, E, L, T, H, W]` (E ensemble members), `target: [B, L, T, H, W]`,
`mask: [B, L, nT, nH, nW]` bool with True = masked. Every loss first computes a value per
grid point, averages it over each token's grid points, and then averages over the masked
tokens only, so every masked token weighs the same. Values are in normalised units.

- `mse`: squared error of the ensemble mean, `(mean_e x_e - y)^2`.
- `crps`: the fair (unbiased) ensemble CRPS of the E members at each point,

      crps = 1/E sum_e |x_e - y|  -  1/(2 E (E - 1)) sum_{e, f} |x_e - x_f|,

  an unbiased estimate, for any E >= 2, of the CRPS of the distribution the members
  are drawn from.
- `mse_stats`: squared error of the ensemble mean plus a term that fits the spread to
  the error,

      mse_stats = (m - y)^2  +  (s^2 - sg[(m - y)^2])^2,

  with m the ensemble mean, s^2 the unbiased ensemble variance (divisor E - 1) and sg
  stopping the gradient. The second term is minimised in expectation when s^2 equals
  the expected squared error of the mean, so the spread learns to match the error of the
  mean without pulling the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.tokens import tokenise

LOSSES = ("mse", "crps", "mse_stats")


def ensemble_mean_and_spread(members: Tensor) -> tuple[Tensor, Tensor]:
    """Return the ensemble mean and spread of `members: [B, E, ...]`, each [B, ...].

    The spread is the standard deviation with divisor E - 1, and zero when E = 1.
    """
    mean = members.mean(dim=1)
    if members.shape[1] < 2:
        return mean, torch.zeros_like(mean)
    return mean, members.std(dim=1, unbiased=True)


def masked_token_mean(values: Tensor, mask: Tensor, token_shape: tuple[int, int, int]) -> Tensor:
    """Average per-point values over each masked token's points, then over the masked tokens.

    values: [B, L, T, H, W]. mask: [B, L, nT, nH, nW] bool. Returns a scalar tensor. Raises
    ValueError when no token is masked, because the mean would be undefined.
    """
    if not bool(mask.any()):
        raise ValueError("mask selects no token: the masked loss is undefined")
    per_token = tokenise(values, token_shape).mean(dim=-1)
    return per_token[mask].mean()


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor, token_shape: tuple[int, int, int]) -> Tensor:
    """Mean squared error of a deterministic prediction [B, L, T, H, W] over masked tokens."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from target {tuple(target.shape)}")
    return masked_token_mean((prediction.float() - target.float()) ** 2, mask, token_shape)


def fair_crps(members: Tensor, target: Tensor) -> Tensor:
    """Return the fair ensemble CRPS per point: members [B, E, ...], target [B, ...] -> [B, ...].

    Raises ValueError for fewer than 2 members, for which the fair CRPS is undefined.
    """
    n_members = members.shape[1]
    if n_members < 2:
        raise ValueError(f"the fair CRPS needs at least 2 ensemble members, got {n_members}")
    skill = (members - target.unsqueeze(1)).abs().mean(dim=1)
    # sum over all ordered pairs (e, f); the e == f terms are zero.
    pair_sum = torch.zeros_like(skill)
    for member in range(n_members):
        pair_sum = pair_sum + (members - members[:, member : member + 1]).abs().sum(dim=1)
    return skill - pair_sum / (2 * n_members * (n_members - 1))


def ensemble_loss(
    name: str, members: Tensor, target: Tensor, mask: Tensor, token_shape: tuple[int, int, int]
) -> Tensor:
    """Compute the loss `name` (one of LOSSES) of one field's ensemble over its masked tokens.

    members: [B, E, L, T, H, W]. target: [B, L, T, H, W]. mask: [B, L, nT, nH, nW].
    Returns a scalar tensor in normalised units (squared units for mse and mse_stats).
    """
    if members.dim() != 6 or members.shape[:1] + members.shape[2:] != target.shape:
        raise ValueError(
            f"members must have shape [B, E, L, T, H, W] matching target {tuple(target.shape)}, "
            f"got {tuple(members.shape)}"
        )
    members = members.float()
    target = target.float()
    mean, spread = ensemble_mean_and_spread(members)
    squared_error = (mean - target) ** 2

    if name == "mse":
        return masked_token_mean(squared_error, mask, token_shape)
    if name == "crps":
        return masked_token_mean(fair_crps(members, target), mask, token_shape)
    if name == "mse_stats":
        if members.shape[1] < 2:
            raise ValueError(f"loss mse_stats needs at least 2 ensemble members, got {members.shape[1]}")
        spread_error = (spread**2 - squared_error.detach()) ** 2
        return masked_token_mean(squared_error + spread_error, mask, token_shape)
    raise ValueError(f"unknown loss {name!r}: use one of {LOSSES}")
