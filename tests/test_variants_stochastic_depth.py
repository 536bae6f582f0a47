"""Tests for jdrop.variants.stochastic_depth (drop_path, drop_path_rates): one keep draw per example against
``keep_mask(key, shape, rate, broadcast_dims=non-batch axes)``, timm's ``drop_path`` formula (scale_by_keep) and
``torch.linspace`` depth rule, statistics, rate 1 and argument errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import bernoulli_mean_tolerance, grad_of, keep_mask, positive_input, realised_keep

import jdrop
from jdrop import variants


def test_drop_path_formula_and_gradient(variant):
    """timm's formula and its gradient, with and without jit."""
    key = jax.random.key(0)
    rate, shape = 0.4, (64, 3, 5)
    x = positive_input(shape)
    mask = keep_mask(key, shape, rate, broadcast_dims=(1, 2))
    for scale_by_keep, factor in [(True, 1 / realised_keep(rate)), (False, 1.0)]:
        fn = variant(lambda k, v, s=scale_by_keep: variants.drop_path(k, v, rate, scale_by_keep=s))
        y = fn(key, x)
        np.testing.assert_allclose(y, np.where(mask, x * factor, 0.0), rtol=1e-6)
        grad = grad_of(lambda v, f=fn: f(key, v), x)
        np.testing.assert_allclose(grad, grad_of(lambda v, c=factor: jnp.where(mask, v * c, 0.0), x), rtol=1e-6)
        # timm's evaluation is the identity whatever scale_by_keep.
        np.testing.assert_array_equal(
            variants.drop_path(None, x, rate, scale_by_keep=scale_by_keep, deterministic=True), x
        )
    # One draw per example: whole examples are kept or dropped.
    kept = np.asarray(fn(key, x) != 0)
    assert np.all(kept == kept[:, :1, :1])


def test_drop_path_statistics_and_rate_one(key):
    rate, batch = 0.3, 20000
    y = jax.jit(lambda k: variants.drop_path(k, jnp.ones((batch, 2)), rate))(key)
    # batch independent Bernoulli(rate) example drops: 5 sigma of their mean.
    assert abs(float(jnp.mean(y[:, 0] == 0)) - rate) < bernoulli_mean_tolerance(batch, rate)
    x = jnp.ones((4, 3))
    np.testing.assert_array_equal(jax.jit(variants.drop_path, static_argnums=2)(key, x, 1.0), jnp.zeros_like(x))
    np.testing.assert_array_equal(grad_of(lambda v: variants.drop_path(key, v, 1.0), x), jnp.zeros_like(x))


def test_drop_path_per_example_under_vmap(key):
    keys = jdrop.example_keys(key, 8)
    x = positive_input((8, 3, 2))
    y = jax.jit(jax.vmap(lambda k, v: variants.drop_path(k, v, 0.5, batch_axis=None)))(keys, x)
    for i in range(8):
        keep = bool(keep_mask(keys[i], (), 0.5))
        np.testing.assert_allclose(y[i], x[i] * 2.0 if keep else jnp.zeros_like(x[i]), rtol=1e-6)


def test_drop_path_rates_match_timm_linspace():
    rates = variants.drop_path_rates(0.3, 12)
    assert rates.dtype == jnp.float32 and rates.shape == (12,)
    # timm: [x.item() for x in torch.linspace(0, drop_path_rate, depth)].
    np.testing.assert_allclose(rates, np.linspace(0.0, 0.3, 12, dtype=np.float32), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(variants.drop_path_rates(0.3, 1), [0.0])
    traced = jax.jit(lambda r: variants.drop_path_rates(r, 4))(jnp.float32(0.6))
    np.testing.assert_allclose(traced, [0.0, 0.2, 0.4, 0.6], rtol=1e-6)
    with pytest.raises(ValueError, match="max_rate"):
        variants.drop_path_rates(1.5, 4)
    with pytest.raises(ValueError, match="depth"):
        variants.drop_path_rates(0.1, -1)


def test_drop_path_scale_classic_is_the_papers_rule_and_scale_by_keep_timms_alias(key):
    rate, x = 0.4, positive_input((64, 3))
    mask = keep_mask(key, x.shape, rate, broadcast_dims=(1,))
    keep = float(realised_keep(rate))
    run = jax.jit(lambda k, v: [variants.drop_path(k, v, rate, scale="classic"),
                                variants.drop_path(k, v, rate, scale_by_keep=True),
                                variants.drop_path(k, v, rate)])
    classic, timm_scaled, inverted = run(key, x)
    np.testing.assert_allclose(classic, np.where(mask, x, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(timm_scaled, inverted)
    # Huang et al. 2016 scale the branch by its survival probability at test time; timm's unscaled branch does not.
    np.testing.assert_allclose(variants.drop_path(None, x, rate, scale="classic", deterministic=True), x * keep,
                               rtol=1e-6)
    np.testing.assert_array_equal(variants.drop_path(None, x, rate, scale_by_keep=False, deterministic=True), x)
    with pytest.raises(ValueError, match="pass `scale` or its alias `scale_by_keep`, not both"):
        variants.drop_path(key, x, rate, scale="classic", scale_by_keep=False)


def test_drop_path_errors(key):
    with pytest.raises(ValueError, match="batch_axis"):
        variants.drop_path(key, jnp.ones(()), 0.1)
    with pytest.raises(TypeError, match="scale_by_keep"):
        variants.drop_path(key, jnp.ones((2, 3)), 0.1, scale_by_keep="yes")
