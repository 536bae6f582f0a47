"""Statistical battery for the masks, with fixed keys and 5-sigma tolerances derived next to each assertion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import bernoulli_mean_tolerance, realised_keep

import jdrop
from jdrop import masks

N = 1 << 20  # elements per sample


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_keep_fraction_over_rate_sweep(rate):
    keep = float(realised_keep(rate))
    kept = int(jnp.sum(jdrop.keep_mask(jax.random.key(11), (N,), rate)))
    # kept ~ Binomial(N, keep): |kept - N keep| <= 5 sqrt(N keep (1 - keep)).
    assert abs(kept - N * keep) <= N * bernoulli_mean_tolerance(N, keep)


def test_thresholds_are_uniform_chi_squared():
    # The keep test compares the top 23 bits u = bits >> 9 with a threshold; u must be uniform.
    u = np.asarray(masks.random_bits(jax.random.key(5), (N,)) >> 9)
    bins = 256
    counts = np.bincount(u >> (23 - 8), minlength=bins)
    expected = N / bins
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    # chi2 ~ chi-squared(255): mean 255, sd sqrt(2 * 255) ~ 22.6; 5 sigma above the mean is ~368.
    df = bins - 1
    assert chi2 <= df + 5 * np.sqrt(2 * df)
    # And not suspiciously uniform either (5 sigma below the mean).
    assert chi2 >= df - 5 * np.sqrt(2 * df)


def _assert_independent(a, b, keep):
    """Two masks with independent Bernoulli(keep) elements: P(both kept) = keep^2."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    n = a.size
    both = int(np.sum(a & b))
    p = keep * keep
    # both ~ Binomial(n, keep^2) under independence; 5 sigma bound.
    assert abs(both - n * p) <= n * bernoulli_mean_tolerance(n, p), (both, n * p)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_independence_between_examples(rate):
    keys = jdrop.example_keys(jax.random.key(3), 256)
    m = jax.vmap(lambda k: jdrop.keep_mask(k, (4096,), rate))(keys)
    keep = 1.0 - rate
    _assert_independent(m[:-1], m[1:], keep)  # neighbouring examples
    _assert_independent(m[:128], m[128:], keep)  # distant examples


def test_independence_between_layers_of_the_mlp():
    # jdrop.mlp folds the layer index into the example key; layers 1 and 2 of the same example are independent.
    keys = jdrop.example_keys(jax.random.key(4), 256)
    layer = lambda l: jax.vmap(lambda k: jdrop.keep_mask(jax.random.fold_in(k, l), (4096,), 0.5))(keys)  # noqa: E731
    _assert_independent(layer(1), layer(2), 0.5)
    _assert_independent(layer(0), layer(1), 0.5)


def test_independence_between_consecutive_steps():
    run = jax.random.key(8)
    step_mask = lambda s: jax.vmap(lambda k: jdrop.keep_mask(k, (4096,), 0.5))(  # noqa: E731
        jdrop.example_keys(jax.random.fold_in(run, s), 64))
    _assert_independent(step_mask(0), step_mask(1), 0.5)
    _assert_independent(step_mask(41), step_mask(42), 0.5)


def test_no_serial_correlation_within_a_mask():
    # Lag-1 and lag-64 (a row apart) agreement of one large mask at keep 0.5.
    m = np.asarray(jdrop.keep_mask(jax.random.key(9), (N,), 0.5))
    for lag in (1, 64, 4096):
        _assert_independent(m[:-lag], m[lag:], 0.5)


def test_broadcast_mask_is_shared_and_rows_independent():
    m = np.asarray(jdrop.keep_mask(jax.random.key(2), (512, 16, 1024), 0.5, broadcast_dims=(1,)))
    assert (m == m[:, :1, :]).all()  # shared along the broadcast dim
    _assert_independent(m[:-1, 0], m[1:, 0], 0.5)
