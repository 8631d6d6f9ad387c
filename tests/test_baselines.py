"""Hand-checkable cases for the reference predictions in tasks.baselines."""

import numpy as np
import pytest

from tasks.baselines import bicubic_upsampling, block_average, linear_interpolation, persistence


def test_persistence_repeats_last_step():
    context = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    forecast = persistence(context, n_steps=4)
    assert forecast.shape == (2, 4, 2, 2)
    for step in range(4):
        np.testing.assert_array_equal(forecast[:, step], context[:, -1])


def test_persistence_rejects_zero_steps():
    with pytest.raises(ValueError, match="n_steps"):
        persistence(np.zeros((1, 2, 2)), n_steps=0)


def test_linear_interpolation_values():
    before = np.zeros((1, 2))
    after = np.full((1, 2), 3.0)
    hidden = linear_interpolation(before, after, n_hidden=2)
    assert hidden.shape == (2, 1, 2)
    np.testing.assert_allclose(hidden[:, 0, 0], [1.0, 2.0])


def test_linear_interpolation_reproduces_linear_field():
    # f(t, i, j) = 280 + 0.5 t + i - j on 6 steps: hiding steps 2 to 4 from steps 1 and 5.
    time = np.arange(6.0)[:, None, None]
    field = 280.0 + 0.5 * time + np.arange(3.0)[None, :, None] - np.arange(4.0)[None, None, :]
    hidden = linear_interpolation(field[1], field[5], n_hidden=3)
    np.testing.assert_allclose(hidden, field[2:5], rtol=0, atol=1e-12)


def test_linear_interpolation_leading_axes():
    before = np.zeros((2, 1, 2, 2))
    after = np.ones((2, 1, 2, 2))
    hidden = linear_interpolation(before, after, n_hidden=1)
    assert hidden.shape == (2, 1, 1, 2, 2)
    np.testing.assert_allclose(hidden, 0.5)


def test_linear_interpolation_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        linear_interpolation(np.zeros((2, 2)), np.zeros((2, 3)), n_hidden=1)


def test_block_average_values():
    field = np.arange(16.0).reshape(4, 4)
    np.testing.assert_allclose(block_average(field, 2), [[2.5, 4.5], [10.5, 12.5]])


def test_block_average_leading_axes():
    field = np.stack([np.zeros((4, 8)), np.ones((4, 8))])
    coarse = block_average(field, 4)
    assert coarse.shape == (2, 1, 2)
    np.testing.assert_allclose(coarse[1], 1.0)


def test_block_average_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="not divisible"):
        block_average(np.zeros((33, 49)), 4)


def test_bicubic_constant_field_exact():
    coarse = np.full((2, 3, 5), 281.25, dtype=np.float32)
    fine = bicubic_upsampling(coarse, 4)
    assert fine.shape == (2, 12, 20)
    assert fine.dtype == np.float32
    np.testing.assert_allclose(fine, 281.25, rtol=0, atol=1e-4)


def test_bicubic_aligns_block_centres():
    # A single interior spike is mirrored about the centre of its 4 x 4 block.
    coarse = np.zeros((5, 5))
    coarse[2, 2] = 1.0
    fine = bicubic_upsampling(coarse, 4)
    row = fine[9]
    np.testing.assert_allclose(row[8:12], row[8:12][::-1], atol=1e-12)
    np.testing.assert_allclose(fine[8:12, 10], fine[8:12, 10][::-1], atol=1e-12)
    assert row.argmax() in (9, 10)


def test_bicubic_keeps_interior_block_means_of_ramp():
    fine = np.add.outer(np.arange(24) * 0.5, np.arange(24) * 2.0)
    upsampled = bicubic_upsampling(block_average(fine, 4), 4)
    interior = (slice(8, 16), slice(8, 16))
    np.testing.assert_allclose(
        block_average(upsampled[interior], 4), block_average(fine[interior], 4), atol=1e-9
    )
