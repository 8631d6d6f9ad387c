import pytest
import torch

from models.tokens import detokenise, expand_token_mask, grid_tokens, token_mean, tokenise

SHAPES = [
    # (B, C, T, H, W), token_shape
    ((2, 1, 12, 32, 48), (2, 8, 8)),
    ((1, 3, 6, 16, 16), (3, 4, 8)),
    ((3, 2, 4, 8, 12), (1, 8, 4)),
    ((1, 1, 2, 2, 2), (2, 2, 2)),
]


@pytest.mark.parametrize(("shape", "token_shape"), SHAPES)
def test_tokenise_round_trip(shape, token_shape):
    x = torch.randn(shape)

    tokens = tokenise(x, token_shape)

    batch, channels, steps, height, width = shape
    expected = (
        batch,
        channels,
        steps // token_shape[0],
        height // token_shape[1],
        width // token_shape[2],
        token_shape[0] * token_shape[1] * token_shape[2],
    )
    assert tokens.shape == expected
    assert torch.equal(detokenise(tokens, token_shape), x)


def test_token_contains_its_block():
    x = torch.randn(2, 3, 6, 16, 24)
    token_shape = (2, 8, 8)

    tokens = tokenise(x, token_shape)

    # Token (c=1, t=2, h=1, w=2) covers steps 4-5, latitudes 8-15, longitudes 16-23.
    block = x[1, 1, 4:6, 8:16, 16:24].reshape(-1)
    assert torch.equal(tokens[1, 1, 2, 1, 2], block)


def test_tokenise_rejects_uneven_shape():
    with pytest.raises(ValueError, match="latitude"):
        tokenise(torch.zeros(1, 1, 4, 10, 8), (2, 4, 4))


def test_detokenise_rejects_wrong_token_size():
    with pytest.raises(ValueError, match="token shape"):
        detokenise(torch.zeros(1, 1, 2, 2, 2, 10), (2, 2, 2))


def test_grid_tokens_counts():
    assert grid_tokens((12, 32, 48), (2, 8, 8)) == (6, 4, 6)


def test_expand_token_mask_matches_tokens():
    mask = torch.zeros(1, 2, 3, 2, 2, dtype=torch.bool)
    mask[0, 1, 2, 0, 1] = True
    token_shape = (2, 4, 4)

    points = expand_token_mask(mask, token_shape)

    assert points.shape == (1, 2, 6, 8, 8)
    assert int(points.sum()) == 2 * 4 * 4
    assert bool(points[0, 1, 4:6, 0:4, 4:8].all())
    assert torch.equal(tokenise(points.float(), token_shape).amax(dim=-1).bool(), mask)


def test_token_mean_averages_steps():
    values = torch.arange(12.0).reshape(1, 6, 2)

    means = token_mean(values, 3)

    assert means.shape == (1, 2, 2)
    assert torch.equal(means[0, 0], torch.tensor([2.0, 3.0]))
    assert torch.equal(means[0, 1], torch.tensor([8.0, 9.0]))
