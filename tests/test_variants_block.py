"""Tests for jdrop.variants.block (dropblock): Ghiasi et al. 2018's DropBlock against a naive numpy reference
that loops over the dropped block centres (the TF reference's valid-centre clip), the exact expected kept fraction,
edge cases and errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import grad_of, keep_mask, mean_tolerance, positive_input

import jdrop
from jdrop import variants


def dropblock_reference(x, centres_kept, block, channel_axis=-1):
    """Naive DropBlock with the given centre draws: loops over dropped centres, numpy, (B, H, W, C) layout."""
    x = np.moveaxis(np.asarray(x, np.float64), channel_axis, -1)
    centres_kept = np.moveaxis(np.asarray(centres_kept), channel_axis, -1)
    _, height, width, _ = x.shape
    bh, bw = min(block, height), min(block, width)
    kept = np.ones(centres_kept.shape)
    for b, i, j, c in zip(*np.nonzero(~centres_kept)):
        # Valid centres: the whole block inside the map (the reference's clip mask).
        if bh // 2 <= i < height - (bh - 1) // 2 and bw // 2 <= j < width - (bw - 1) // 2:
            kept[b, i - bh // 2 : i + (bh - 1) // 2 + 1, j - bw // 2 : j + (bw - 1) // 2 + 1, c] = 0
    y = x * kept * kept.size / kept.sum()
    return np.moveaxis(y, -1, channel_axis)


def dropblock_gamma(rate, block, height, width):
    bh, bw = min(block, height), min(block, width)
    return rate * height * width / (bh * bw) / ((height - bh + 1) * (width - bw + 1))


@pytest.mark.parametrize(
    "block, couple, shape, channel_axis",
    [
        (3, True, (4, 9, 8, 3), -1),
        (4, True, (4, 9, 8, 3), -1),  # even block: SAME padding, centre at offset block // 2
        (3, False, (4, 3, 9, 8), 1),  # per-channel masks (the TF reference), PyTorch layout
        (20, True, (2, 6, 5, 2), -1),  # block clipped to the map
    ],
)
def test_dropblock_matches_naive_reference(variant, block, couple, shape, channel_axis):
    """DropBlock against the naive reference, with and without jit."""
    key = jax.random.key(0)
    rate = 0.3
    x = positive_input(shape)
    fn = variant(
        lambda k, v: variants.dropblock(k, v, rate, block, channel_axis=channel_axis, couple_channels=couple)
    )
    y = fn(key, x)
    height, width = [size for axis, size in enumerate(shape) if axis not in (0, channel_axis % 4)]
    gamma = min(dropblock_gamma(rate, block, height, width), 1.0)
    mask_shape = tuple(1 if couple and axis == channel_axis % 4 else s for axis, s in enumerate(shape))
    centres_kept = np.broadcast_to(keep_mask(key, mask_shape, gamma), mask_shape)
    reference = dropblock_reference(x, centres_kept, block, channel_axis)
    np.testing.assert_allclose(y, reference, rtol=1e-5)
    assert np.any(reference == 0) and np.any(reference != 0)
    if couple:
        kept = np.asarray(y != 0)
        assert np.all(kept == np.take(kept, [0], axis=channel_axis))
    if block == 4:  # the gradient (autodiff through the checkpointed mask), once
        scale = jnp.asarray(reference / np.asarray(x), jnp.float32)
        np.testing.assert_allclose(grad_of(lambda v: fn(key, v), x), grad_of(lambda v: v * scale, x), rtol=1e-5)


def test_dropblock_statistics(key):
    rate, block, batch, size = 0.15, 5, 256, 20
    y = jax.jit(lambda k: variants.dropblock(k, jnp.ones((batch, size, size, 1)), rate, block))(key)
    # Ones in, so the output's mean is exactly 1: the count / kept normalisation keeps the total.
    assert abs(float(jnp.mean(y)) - 1.0) < 1e-5
    # Exact expected kept fraction: position (i, j) survives iff none of the n_i * n_j valid centres whose
    # block covers it is dropped, probability (1 - gamma)^(n_i n_j).
    gamma = dropblock_gamma(rate, block, size, size)
    centres = np.arange(size)
    valid = (centres >= block // 2) & (centres < size - (block - 1) // 2)
    covering = np.array(
        [np.sum(valid & (centres - block // 2 <= i) & (i <= centres + (block - 1) // 2)) for i in range(size)]
    )
    expected_kept = np.mean((1 - gamma) ** np.outer(covering, covering))
    assert abs(expected_kept - (1 - rate)) < 0.05  # the paper's gamma targets `rate` (overlaps make it inexact)
    # Positions sharing no centre are independent; each shares centres with at most (2 block - 1)^2 positions,
    # so Var(sum of N kept indicators) <= N (2 block - 1)^2 / 4: 5 sigma of the mean.
    n = batch * size * size
    kept_fraction = float(jnp.mean(y != 0))
    assert abs(kept_fraction - expected_kept) < mean_tolerance((2 * block - 1) ** 2 / 4, n)


def test_dropblock_edge_cases_and_errors(key):
    x = positive_input((2, 6, 6, 3))
    np.testing.assert_array_equal(variants.dropblock(None, x, 0.3, 3, deterministic=True), x)
    np.testing.assert_array_equal(variants.dropblock(key, x, 0.0, 3), x)
    fn = jax.jit(lambda k, v, r: variants.dropblock(k, v, r, 3))
    np.testing.assert_array_equal(fn(key, x, 1.0), jnp.zeros_like(x))  # rate 1 drops everything
    np.testing.assert_array_equal(grad_of(lambda v: fn(key, v, 1.0), x), jnp.zeros_like(x))
    assert bool(jnp.all(jnp.isnan(fn(key, x, jnp.float32(1.5)))))  # a traced invalid rate poisons
    single = jax.jit(jax.vmap(lambda k, v: variants.dropblock(k, v, 0.3, 3, batch_axis=None)))(
        jdrop.example_keys(key, 2), x
    )
    assert single.shape == x.shape
    with pytest.raises(ValueError, match="rank 4"):
        variants.dropblock(key, jnp.ones((6, 6, 3)), 0.1, 3)
    with pytest.raises(ValueError, match="block_size"):
        variants.dropblock(key, x, 0.1, 0)
    with pytest.raises(TypeError, match="block_size"):
        variants.dropblock(key, x, 0.1, 2.5)
