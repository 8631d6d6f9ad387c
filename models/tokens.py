"""Split fields into space-time tokens and back.

A token is a block of `token_shape = (tT, tH, tW)` grid values (time steps, latitude
points, longitude points) of one channel. For a field `x: [B, C, T, H, W]` the token grid
is `(nT, nH, nW) = (T // tT, H // tH, W // tW)`, and the tokens of one channel are ordered
time-major, then latitude, then longitude.
"""

from __future__ import annotations

from torch import Tensor


def grid_tokens(sample_shape: tuple[int, int, int], token_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Return the token grid (nT, nH, nW) of a (T, H, W) sample; raise if it does not divide evenly."""
    counts = []
    for axis, size, token in zip(("time", "latitude", "longitude"), sample_shape, token_shape, strict=True):
        if size % token != 0:
            raise ValueError(
                f"sample size {size} along {axis} is not a multiple of the token size {token} "
                f"(sample shape {tuple(sample_shape)}, token shape {tuple(token_shape)})"
            )
        counts.append(size // token)
    return counts[0], counts[1], counts[2]


def tokenise(x: Tensor, token_shape: tuple[int, int, int]) -> Tensor:
    """Cut a field into tokens.

    x: [B, C, T, H, W] -> tokens: [B, C, nT, nH, nW, tT * tH * tW], where the last axis
    contains one token's values in (time, latitude, longitude) order.
    """
    batch, channels, steps, height, width = x.shape
    n_time, n_lat, n_lon = grid_tokens((steps, height, width), token_shape)
    token_t, token_h, token_w = token_shape

    blocks = x.reshape(batch, channels, n_time, token_t, n_lat, token_h, n_lon, token_w)
    blocks = blocks.permute(0, 1, 2, 4, 6, 3, 5, 7)
    return blocks.reshape(batch, channels, n_time, n_lat, n_lon, token_t * token_h * token_w)


def detokenise(tokens: Tensor, token_shape: tuple[int, int, int]) -> Tensor:
    """Reassemble a field from tokens, inverting `tokenise`.

    tokens: [B, C, nT, nH, nW, tT * tH * tW] -> x: [B, C, nT * tT, nH * tH, nW * tW].
    """
    batch, channels, n_time, n_lat, n_lon, token_size = tokens.shape
    token_t, token_h, token_w = token_shape
    if token_size != token_t * token_h * token_w:
        raise ValueError(
            f"tokens have {token_size} values each, but token shape {tuple(token_shape)} "
            f"needs {token_t * token_h * token_w}"
        )

    blocks = tokens.reshape(batch, channels, n_time, n_lat, n_lon, token_t, token_h, token_w)
    blocks = blocks.permute(0, 1, 2, 5, 3, 6, 4, 7)
    return blocks.reshape(batch, channels, n_time * token_t, n_lat * token_h, n_lon * token_w)


def expand_token_mask(mask: Tensor, token_shape: tuple[int, int, int]) -> Tensor:
    """Spread a token mask over the grid points of each token.

    mask: [B, C, nT, nH, nW] -> [B, C, nT * tT, nH * tH, nW * tW], same dtype.
    """
    token_t, token_h, token_w = token_shape
    expanded = mask.repeat_interleave(token_t, dim=2)
    expanded = expanded.repeat_interleave(token_h, dim=3)
    return expanded.repeat_interleave(token_w, dim=4)


def token_mean(values: Tensor, token_steps: int) -> Tensor:
    """Average per-step values over the steps of each time token.

    values: [B, T, F] -> [B, T // token_steps, F].
    """
    batch, steps, features = values.shape
    if steps % token_steps != 0:
        raise ValueError(f"{steps} time steps are not a multiple of the token length {token_steps}")
    return values.reshape(batch, steps // token_steps, token_steps, features).mean(dim=2)


