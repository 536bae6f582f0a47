"""Tests for jdrop.variants.feature (feature_dropout: Dropout1d/2d/3d, SpatialDropout): the output against
``where(keep_mask(key, shape, rate, broadcast_dims=spatial axes), x / keep, 0)``, the channel-drop statistics,
PyTorch's ``dropout2d`` semantics, per-example keys under ``vmap``, eval mode and argument errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import bernoulli_mean_tolerance, grad_of, keep_mask, mean_tolerance, positive_input, realised_keep

import jdrop
from jdrop import variants


@pytest.mark.parametrize(
    "shape, channel_axis, batch_axis, shared",
    [
        ((6, 9, 5), -1, 0, (1,)),  # (B, L, C): Dropout1d / SpatialDropout1D channels-last
        ((6, 4, 3, 5), -1, 0, (1, 2)),  # (B, H, W, C): Dropout2d / SpatialDropout2D
        ((6, 5, 4, 3, 2), 1, 0, (2, 3, 4)),  # (B, C, D, H, W): PyTorch's Dropout3d layout
        ((4, 3, 5), -1, None, (0, 1)),  # one example (inside vmap)
        ((6, 5), -1, 0, ()),  # no spatial axes: ordinary dropout
    ],
)
def test_feature_dropout_formula(variant, shape, channel_axis, batch_axis, shared):
    """The formula and mask structure, with and without jit."""
    key = jax.random.key(0)
    rate = 0.3
    x = positive_input(shape)
    fn = variant(
        lambda k, v: variants.feature_dropout(k, v, rate, channel_axis=channel_axis, batch_axis=batch_axis)
    )
    y = fn(key, x)
    mask = keep_mask(key, shape, rate, broadcast_dims=shared)
    np.testing.assert_allclose(y, np.where(mask, x / realised_keep(rate), 0.0), rtol=1e-6)
    # Mask structure: constant along the shared (spatial) axes.
    kept = np.asarray(y != 0)
    for axis in shared:
        assert np.all(kept == np.take(kept, [0], axis=axis))
    if len(shared) == 2:  # the gradient (the core's backward with broadcast dims), once
        grad = grad_of(lambda v: fn(key, v), x)
        naive = grad_of(lambda v: jnp.where(mask, v / realised_keep(rate), 0.0), x)
        np.testing.assert_allclose(grad, naive, rtol=1e-6)


def test_feature_dropout_statistics(key):
    rate, batch, channels = 0.2, 400, 64
    y = jax.jit(lambda k: variants.feature_dropout(k, jnp.ones((batch, 3, 3, channels)), rate))(key)
    dropped = np.asarray(y[:, 0, 0, :] == 0)
    # batch * channels independent Bernoulli(rate) channel drops: 5 sigma of their mean.
    assert abs(dropped.mean() - rate) < bernoulli_mean_tolerance(batch * channels, rate)
    # Unbiased: mean of y over all elements = mean of m / keep; the same 25600 channel draws.
    keep = 1 - rate
    assert abs(float(jnp.mean(y)) - 1.0) < mean_tolerance(rate / keep, batch * channels)


def test_feature_dropout_matches_torch_semantics():
    torch = pytest.importorskip("torch")
    rate = 0.4
    torch.manual_seed(0)
    x = torch.rand(8, 5, 4, 3) + 1.0  # (B, C, H, W)
    y = torch.nn.functional.dropout2d(x, rate, training=True).numpy()
    kept = y != 0
    # PyTorch's Dropout2d drops whole (example, channel) maps and scales the rest by 1 / keep: our formula.
    assert np.all(kept == kept[:, :, :1, :1])
    np.testing.assert_allclose(y, np.where(kept, x.numpy() / (1 - rate), 0.0), rtol=1e-6)
    ours = jax.jit(lambda k, v: variants.feature_dropout(k, v, rate, channel_axis=1))(jax.random.key(0), x.numpy())
    ours_kept = np.asarray(ours != 0)
    assert np.all(ours_kept == ours_kept[:, :, :1, :1])
    np.testing.assert_allclose(ours, np.where(ours_kept, x.numpy() / realised_keep(rate), 0.0), rtol=1e-6)


def test_feature_dropout_per_example_keys_under_vmap(key):
    rate, shape = 0.5, (4, 3, 5)
    keys = jdrop.example_keys(key, 6)
    x = positive_input((6, *shape))
    y = jax.jit(jax.vmap(lambda k, v: variants.feature_dropout(k, v, rate, batch_axis=None)))(keys, x)
    for i in range(6):
        mask = keep_mask(keys[i], shape, rate, broadcast_dims=(0, 1))
        np.testing.assert_allclose(y[i], np.where(mask, x[i] / 0.5, 0.0), rtol=1e-6)


def test_feature_dropout_eval_and_errors(key):
    x = jnp.ones((2, 3, 4))
    np.testing.assert_array_equal(variants.feature_dropout(None, x, 0.5, deterministic=True), x)
    with pytest.raises(ValueError, match="batch_axis.*channel_axis"):
        variants.feature_dropout(key, x, 0.5, channel_axis=0)
    with pytest.raises(ValueError, match="channel_axis"):
        variants.feature_dropout(key, x, 0.5, channel_axis=3)
    with pytest.raises(TypeError, match="channel_axis"):
        variants.feature_dropout(key, x, 0.5, channel_axis=1.0)
    with pytest.raises(ValueError, match="rank >= 1"):
        variants.feature_dropout(key, jnp.ones(()), 0.5)
