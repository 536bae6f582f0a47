"""Tests for jdrop.variants.gaussian (gaussian_dropout, gaussian_noise): Keras's ``GaussianDropout`` and
``GaussianNoise`` formulas with the normals of ``jax.random.normal(key, shape)``, their statistics, no per-element
residual, and errors. Also checks the test helpers' normals and uniforms against ``jax.random``.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import (
    assert_variant_matches_reference,
    grad_of,
    keep_mask,
    mean_tolerance,
    normal_input,
    normal_variance_tolerance,
    realised_keep,
    standard_normal,
)

from jdrop import masks, variants


@partial(jax.jit, static_argnums=1)
def uniform(key, shape):
    """The uniforms concrete dropout draws: ``jax.random.uniform(key, shape)``, via ``jdrop.masks``."""
    return masks.uniform_from_bits(masks.random_bits(key, shape))


def test_masks_float_helpers_match_jax_random(key):
    shape = (50, 40)  # the shape of the next test: JAX compiles its threefry once per shape
    np.testing.assert_array_equal(uniform(key, shape), jax.jit(jax.random.uniform, static_argnums=1)(key, shape))
    np.testing.assert_array_equal(standard_normal(key, shape), jax.jit(jax.random.normal, static_argnums=1)(key, shape))
    bits = jax.jit(masks.random_bits, static_argnums=1)(key, shape)
    scaled = jax.jit(lambda b: masks.uniform_from_bits(b, -2.0, 3.0))(bits)
    assert scaled.dtype == jnp.float32 and float(scaled.min()) >= -2.0 and float(scaled.max()) < 3.0
    # The uniforms' top 23 bits are those of the keep test: u < keep exactly where the mask keeps.
    np.testing.assert_array_equal(uniform(key, shape) < realised_keep(0.3), keep_mask(key, shape, 0.3))


def test_gaussian_dropout_formula_noise_and_gradient(variant):
    """Keras's multiplicative noise and its gradient, with and without jit."""
    key = jax.random.key(0)
    rate, shape = 0.2, (50, 40)
    x = normal_input(shape)
    z = standard_normal(key, shape)  # = jax.random.normal(key, shape), test_masks_float_helpers_match_jax_random
    stddev = math.sqrt(rate / (1 - rate))
    noise = 1 + stddev * z
    assert_variant_matches_reference(
        variants.gaussian_dropout, key, x, rate, lambda v: v * noise, rtol=1e-6, atol=1e-6, transform=variant
    )


def test_gaussian_dropout_statistics(key):
    rate, n = 0.4, 200_000
    noise = np.asarray(jax.jit(lambda k: variants.gaussian_dropout(k, jnp.ones(n), rate))(key), np.float64)
    variance = rate / (1 - rate)  # Keras's GaussianDropout: N(1, rate / (1 - rate))
    # The mean of n normals with this variance: standard error sqrt(variance / n).
    assert abs(noise.mean() - 1.0) < mean_tolerance(variance, n)
    # The sample variance of normals: standard error variance * sqrt(2 / (n - 1)).
    assert abs(noise.var() - variance) < normal_variance_tolerance(variance, n)


def test_gaussian_dropout_keeps_no_noise_residual(key):
    x = normal_input((256, 64))
    for fn, rate in [
        (variants.gaussian_dropout, 0.3),
        (variants.gaussian_noise, 0.3),
        (variants.gaussian_dropout, jnp.float32(0.3)),
    ]:
        # The residuals are the leaves of the vjp function; eval_shape lists them without running anything.
        vjp = jax.eval_shape(lambda v, f=fn, r=rate: jax.vjp(lambda u: f(key, u, r), v)[1], x)
        # The backward pass draws the noise again from the key: nothing per element is kept.
        assert all(math.prod(leaf.shape) <= 2 for leaf in jax.tree_util.tree_leaves(vjp))


def test_gaussian_noise_formula_and_statistics(variant):
    """Keras's additive noise, its statistics and gradient, with and without jit."""
    key = jax.random.key(0)
    stddev, n = 0.5, 200_000
    x = normal_input((n,))
    fn = variant(lambda k, v, s: variants.gaussian_noise(k, v, s))
    y = fn(key, x, stddev)
    z = standard_normal(key, (n,))
    np.testing.assert_allclose(y, x + stddev * z, rtol=1e-6, atol=1e-6)
    added = np.asarray(y - x, np.float64)
    # n normals with variance stddev^2: 5 standard errors of their mean and of their variance.
    assert abs(added.mean()) < mean_tolerance(stddev**2, n)
    assert abs(added.var() - stddev**2) < normal_variance_tolerance(stddev**2, n)
    np.testing.assert_array_equal(grad_of(lambda v: fn(key, v, stddev), x[:10]), grad_of(lambda v: v, x[:10]))
    np.testing.assert_array_equal(variants.gaussian_noise(None, x, stddev, deterministic=True), x)
    # A traced invalid stddev poisons (a concrete one is an error: tests below).
    assert bool(jnp.all(jnp.isnan(jax.jit(variants.gaussian_noise)(key, x[:3], jnp.float32(-1.0)))))


def test_gaussian_variants_errors(key):
    x = jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\) for Gaussian dropout"):
        variants.gaussian_dropout(key, x, 1.0)
    with pytest.raises(ValueError, match="stddev"):
        variants.gaussian_noise(key, x, -0.5)
    with pytest.raises(ValueError, match="stddev"):
        variants.gaussian_noise(key, x, float("inf"))
    with pytest.raises(TypeError, match="floating"):
        variants.gaussian_noise(key, jnp.ones(3, jnp.int32), 0.1)
    with pytest.raises(TypeError, match="PRNG key"):
        variants.gaussian_noise(0, x, 0.1)
    rates = jnp.array([0.3, 1.0, -0.1])
    outputs = jax.jit(jax.vmap(lambda r: variants.gaussian_dropout(key, x, r)))(rates)
    assert not np.isnan(outputs[0]).any() and np.isnan(outputs[1:]).all()
