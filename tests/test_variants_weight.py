"""Tests for jdrop.variants.weight (dropconnect, dropconnect_moments, dropconnect_predict): Wan et al. 2013's
DropConnect against a naive ``where(keep_mask, w / keep, 0)`` layer with per-example masks, the moment formulas against
sampled masks, and the Gaussian-average prediction against the closed form of E[relu(u)].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import grad_of, mean_tolerance, normal_input, realised_keep, standard_normal, variance_tolerance

import jdrop
from jdrop import variants


def test_dropconnect_per_example_masks_under_vmap(variant):
    """Per-example weight masks under vmap and their gradients, with and without jit."""
    key = jax.random.key(0)
    rate, batch, d_in, d_out = 0.5, 5, 6, 4
    w = normal_input((d_in, d_out))
    xs = normal_input((batch, d_in), seed=2)

    def run(w, xs):
        keys = jdrop.example_keys(key, batch)
        weight_masks = jax.vmap(lambda k: jdrop.keep_mask(k, (d_in, d_out), rate))(keys)

        def layer(w, xs):
            return jax.vmap(lambda k, xi: xi @ variants.dropconnect(k, w, rate))(keys, xs)

        def naive(w, xs):
            return jnp.einsum("bi,bio->bo", xs, jnp.where(weight_masks, w / 0.5, 0.0))

        outputs = layer(w, xs), naive(w, xs)
        grads = grad_of(layer, w, xs, argnums=(0, 1)), grad_of(naive, w, xs, argnums=(0, 1))
        classic = (
            variants.dropconnect(key, w, rate, scale="classic"),
            jnp.where(jdrop.keep_mask(key, w.shape, rate), w, 0.0),
        )
        return weight_masks, outputs, grads, classic

    weight_masks, outputs, grads, classic = variant(run)(w, xs)
    np.testing.assert_allclose(*outputs, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(weight_masks[0], weight_masks[1])  # each example its own mask
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(*classic)  # the paper's training rule: M * W
    np.testing.assert_allclose(variants.dropconnect(None, w, rate, scale="classic", deterministic=True), 0.5 * w)


def test_dropconnect_moments_match_sampled_masks(key):
    scale = "inverted"  # "classic" moments are checked against the paper's formula below
    rate, samples, d_in, d_out = 0.3, 4000, 8, 3
    w = normal_input((d_in, d_out))
    x = normal_input((2, d_in), seed=2)
    keys = jdrop.example_keys(key, samples)
    outputs = jax.jit(jax.vmap(lambda k: x @ variants.dropconnect(k, w, rate, scale=scale)))(keys)
    mean, variance = variants.dropconnect_moments(x, w, rate, scale=scale)
    sample_mean = np.asarray(outputs, np.float64).mean(0)
    sample_var = np.asarray(outputs, np.float64).var(0)
    # The mean of `samples` draws with this variance: standard error sqrt(variance / samples).
    np.testing.assert_array_less(np.abs(sample_mean - mean), mean_tolerance(variance, samples))
    # Sample variance: standard error sqrt((mu4 - sigma^4) / samples), mu4 estimated from the draws.
    centred = np.asarray(outputs, np.float64) - sample_mean
    spread = variance_tolerance(np.mean(centred**4, 0), sample_var, samples)
    np.testing.assert_array_less(np.abs(sample_var - variance), spread)


def test_dropconnect_predict_gaussian_average(key):
    rate, samples = 0.4, 20_000
    w = normal_input((6, 3))
    x = normal_input((6,), seed=2)
    bias = jnp.array([0.1, -0.2, 0.3])
    predict = jax.jit(
        lambda k: variants.dropconnect_predict(
            k, x, w, rate, activation=jax.nn.relu, num_samples=samples, bias=bias, scale="classic"
        )
    )
    y = predict(key)
    mean, variance = variants.dropconnect_moments(x, w, rate, bias=bias, scale="classic")
    keep = realised_keep(rate)
    np.testing.assert_allclose(mean, keep * (x @ w) + bias, rtol=1e-5)  # Wan et al.: N(p W v, p (1 - p) (W*W)(v*v))
    np.testing.assert_allclose(variance, keep * (1 - keep) * (x**2 @ w**2), rtol=1e-5)
    # Naive reference with the same normals.
    z = standard_normal(key, (samples, 3))
    np.testing.assert_allclose(y, jnp.mean(jax.nn.relu(mean + jnp.sqrt(variance) * z), 0), rtol=1e-5, atol=1e-6)
    # E[relu(u)] for u ~ N(mu, s^2) is mu Phi(mu / s) + s phi(mu / s); relu(u) has variance <= E[u^2].
    sigma = np.sqrt(np.asarray(variance, np.float64))
    mu = np.asarray(mean, np.float64)
    ratio = mu / sigma
    phi = np.exp(-0.5 * ratio**2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + np.vectorize(math.erf)(ratio / math.sqrt(2)))
    exact = mu * Phi + sigma * phi
    np.testing.assert_array_less(np.abs(np.asarray(y) - exact), mean_tolerance(mu**2 + sigma**2, samples))
    with pytest.raises(ValueError, match="compatible"):
        variants.dropconnect_moments(x, w.T, rate)
    with pytest.raises(ValueError, match="num_samples"):
        variants.dropconnect_predict(key, x, w, rate, activation=jnp.tanh, num_samples=0)
