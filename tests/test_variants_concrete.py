"""Tests for jdrop.variants.concrete (concrete_dropout, concrete_dropout_regulariser): Gal et al. 2017's relaxed
dropout against the reference implementation's formula, its cold limit (ordinary dropout), the regulariser formula,
learning the rate in the right direction, and errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import bernoulli_mean_tolerance, grad_of, normal_input

import jdrop
from jdrop import masks, variants


def concrete_reference(x, u, rate_logit, temperature, eps=1e-7):
    """Gal et al. 2017's relaxed dropout as the reference implementation writes it."""
    p = jax.nn.sigmoid(rate_logit)
    logit = jnp.log(p + eps) - jnp.log(1 - p + eps) + jnp.log(u + eps) - jnp.log(1 - u + eps)
    return x * (1 - jax.nn.sigmoid(logit / temperature)) / (1 - p)


def test_concrete_dropout_formula_and_gradients(variant):
    """The relaxed mask and its gradients, with and without jit."""
    key = jax.random.key(0)
    x, logit, temperature = normal_input((30, 20)), jnp.float32(-1.0), 0.1
    per_feature = jnp.linspace(-2.0, 2.0, 20)  # one learnable rate per feature

    def ours(v, l):
        return variants.concrete_dropout(key, v, l, temperature=temperature)

    @jax.jit  # the reference, jitted either way
    def reference(x, logit):
        u = masks.uniform_from_bits(masks.random_bits(key, x.shape))

        def naive(v, l):
            return concrete_reference(v, u, l, temperature)

        return [naive(x, l) for l in (logit, per_feature)], grad_of(naive, x, logit, argnums=(0, 1))

    outputs = variant(lambda x, logit: [ours(x, l) for l in (logit, per_feature)])(x, logit)
    grads = grad_of(variant(ours), x, logit, argnums=(0, 1))
    expected_outputs, naive_grads = reference(x, logit)
    for got, expected in zip(outputs, expected_outputs):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, naive_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(variants.concrete_dropout(None, x, logit, deterministic=True), x)


def test_concrete_dropout_cold_limit_is_dropout(key):
    rate, n = 0.3, 100_000
    logit = jnp.float32(math.log(rate / (1 - rate)))
    y = np.asarray(jax.jit(lambda k: variants.concrete_dropout(k, jnp.ones(n), logit, temperature=1e-3))(key))
    dropped = y < 0.5
    # At low temperature the relaxed mask is nearly binary: 0 or 1 / (1 - p).
    assert np.mean(np.abs(y[~dropped] * (1 - rate) - 1) < 1e-2) > 0.99
    # n independent Bernoulli(rate) drops: 5 sigma of their mean.
    assert abs(dropped.mean() - rate) < bernoulli_mean_tolerance(n, rate)


def test_concrete_dropout_regulariser_formula():
    logit, kernel = jnp.float32(0.4), normal_input((6, 3))
    p = float(jax.nn.sigmoid(logit))
    value = variants.concrete_dropout_regulariser(logit, kernel, 6, weight_regulariser=0.01, dropout_regulariser=0.2)
    expected = 0.01 * float(jnp.sum(kernel**2)) / (1 - p) + 0.2 * 6 * (p * math.log(p) + (1 - p) * math.log(1 - p))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # The entropy term alone pulls p towards 1/2.
    entropy_grad = jax.grad(
        lambda l: variants.concrete_dropout_regulariser(l, kernel, 6, weight_regulariser=0.0, dropout_regulariser=1.0)
    )
    assert entropy_grad(jnp.float32(-1.0)) < 0 < entropy_grad(jnp.float32(1.0))
    with pytest.raises(ValueError, match="scalar"):
        variants.concrete_dropout_regulariser(jnp.zeros(3), kernel, 6, weight_regulariser=0.1, dropout_regulariser=0.1)
    with pytest.raises(ValueError, match="weight_regulariser"):
        variants.concrete_dropout_regulariser(logit, kernel, 6, weight_regulariser=-1.0, dropout_regulariser=0.1)


def concrete_learned_rate(n, signal, init_rate, steps=200):
    """Fits a linear model behind a concrete dropout layer (MSE + regulariser, Adam); returns the learned rate.

    Traceable: call it under ``jit``.
    """
    import optax

    rng = np.random.default_rng(0)
    d = 8
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    targets = x @ rng.standard_normal((d, 1)) if signal else rng.standard_normal((n, 1))
    y = jnp.asarray(targets, jnp.float32)
    params = {"w": jnp.zeros((d, 1)), "logit": jnp.float32(math.log(init_rate / (1 - init_rate)))}
    optimiser = optax.adam(0.05)

    def loss(p, k):
        prediction = variants.concrete_dropout(k, x, p["logit"]) @ p["w"]
        regulariser = variants.concrete_dropout_regulariser(
            p["logit"], p["w"], d, weight_regulariser=1.0 / n, dropout_regulariser=2.0 / n
        )
        return jnp.mean((prediction - y) ** 2) + regulariser

    def step(carry, k):
        p, state = carry
        updates, state = optimiser.update(jax.grad(loss)(p, k), state, p)
        return (optax.apply_updates(p, updates), state), None

    keys = jdrop.example_keys(jax.random.key(0), steps)
    return jax.nn.sigmoid(jax.lax.scan(step, (params, optimiser.init(params)), keys)[0][0]["logit"])


def test_concrete_dropout_learns_rate_in_right_direction():
    @jax.jit
    def learned_rates():
        # Plenty of noiseless data: dropout only adds prediction noise, so the rate falls (from 0.5).
        # Eight points of pure noise: nothing to fit, the regulariser wins and the rate rises (from 0.12).
        return concrete_learned_rate(1000, True, 0.5), concrete_learned_rate(8, False, 0.12)

    clean, noise = learned_rates()
    assert clean < 0.1 and noise > 0.25


def test_concrete_dropout_errors(key):
    with pytest.raises(ValueError, match="temperature"):
        variants.concrete_dropout(key, jnp.ones(3), 0.0, temperature=0.0)
    with pytest.raises(TypeError, match="rate_logit"):
        variants.concrete_dropout(key, jnp.ones(3), jnp.ones((), jnp.int32))
    with pytest.raises(TypeError, match="floating"):
        variants.concrete_dropout(key, jnp.ones(3, jnp.int32), 0.0)
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        variants.concrete_dropout(None, jnp.ones(3), 0.0)
