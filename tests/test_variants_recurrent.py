"""Tests for jdrop.variants.recurrent (locked_dropout, embedding_dropout, zoneout): each against its naive
``jnp.where`` formula with masks from ``jdrop.keep_mask`` (Gal & Ghahramani 2016's time-shared mask, Merity et al.
2018's word-type dropout, Krueger et al. 2017's zoneout), gradients through ``lax.scan``, statistics and errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import bernoulli_mean_tolerance, grad_of, keep_mask, normal_input, positive_input, realised_keep

from jdrop import variants


def test_locked_dropout_formula_and_structure(variant):
    """The time-shared mask, with and without jit."""
    key = jax.random.key(0)
    rate, shape = 0.5, (7, 4, 6)  # (T, B, D)
    x = positive_input(shape)
    y = variant(lambda k, v: variants.locked_dropout(k, v, rate, time_axis=0))(key, x)
    mask = keep_mask(key, shape, rate, broadcast_dims=(0,))
    np.testing.assert_allclose(y, np.where(mask, x * 2.0, 0.0), rtol=1e-6)
    kept = np.asarray(y != 0)
    assert np.all(kept == kept[:1])  # the same mask at every time step
    assert 0 < kept[0].mean() < 1  # but not the same for every unit


def test_locked_dropout_inside_scan_equals_whole_sequence(key):
    rate, steps, batch, width = 0.3, 9, 4, 5
    key_x, key_h = jax.random.key(1), jax.random.key(2)
    xs = positive_input((steps, batch, width))
    w = 0.3 * normal_input((width, width), seed=3)

    def rnn(xs, w, dropped_outside):
        def step(h, x_t):
            if not dropped_outside:
                x_t = variants.locked_dropout(key_x, x_t, rate, time_axis=None)
            h = jnp.tanh(x_t + variants.locked_dropout(key_h, h, rate, time_axis=None) @ w)
            return h, h

        if dropped_outside:
            xs = variants.locked_dropout(key_x, xs, rate, time_axis=0)
        return jax.lax.scan(step, jnp.ones((batch, width)), xs)[1]

    def inside(xs, w):
        return rnn(xs, w, False)

    np.testing.assert_allclose(*jax.jit(lambda xs, w: (inside(xs, w), rnn(xs, w, True)))(xs, w), rtol=1e-6)
    # The gradient through the scan (the core's backward at every step) equals the naive one.
    mask_x = keep_mask(key_x, (batch, width), rate)
    mask_h = keep_mask(key_h, (batch, width), rate)
    keep = realised_keep(rate)

    def naive(xs, w):
        def step(h, x_t):
            h = jnp.tanh(jnp.where(mask_x, x_t / keep, 0.0) + jnp.where(mask_h, h / keep, 0.0) @ w)
            return h, h

        return jax.lax.scan(step, jnp.ones((batch, width)), xs)[1]

    grads = jax.jit(lambda xs, w: [grad_of(f, xs, w, argnums=(0, 1)) for f in (inside, naive)])(xs, w)
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_embedding_dropout_drops_word_types(variant):
    """Whole word types dropped, with and without jit."""
    key = jax.random.key(0)
    rate, vocab, dim = 0.25, 4000, 3
    table = positive_input((vocab, dim))
    fn = variant(lambda k, t: variants.embedding_dropout(k, t, rate))
    dropped_table = fn(key, table)
    mask = keep_mask(key, (vocab, dim), rate, broadcast_dims=(1,))
    np.testing.assert_allclose(dropped_table, np.where(mask, table / 0.75, 0.0), rtol=1e-6)
    kept = np.asarray(dropped_table != 0)
    assert np.all(kept == kept[:, :1])  # whole rows
    # vocab independent Bernoulli(rate) row drops: 5 sigma of their mean.
    assert abs((~kept[:, 0]).mean() - rate) < bernoulli_mean_tolerance(vocab, rate)
    # Every occurrence of a dropped word embeds to zero; gradients reach only kept rows, scaled.
    tokens = jnp.array([3, 3, 17, 3, 42])

    def embed(t):
        return fn(key, t)[tokens]

    grad = grad_of(embed, table)
    naive = grad_of(lambda t: jnp.where(mask, t / 0.75, 0.0)[tokens], table)
    np.testing.assert_allclose(grad, naive, rtol=1e-6)
    np.testing.assert_array_equal(variants.embedding_dropout(None, table, rate, deterministic=True), table)
    with pytest.raises(ValueError, match="vocabulary"):
        variants.embedding_dropout(key, jnp.ones(()), rate)


def test_zoneout_formula_gradient_and_statistics(variant):
    """The zoneout formula, its gradient and statistics, with and without jit."""
    key = jax.random.key(0)
    rate, shape = 0.3, (200, 50)
    h_prev = normal_input(shape, seed=1)
    h_new = normal_input(shape, seed=2)
    fn = variant(lambda k, a, b: variants.zoneout(k, a, b, rate))
    h = fn(key, h_prev, h_new)
    # m = 1 - keep_mask: a unit zones out (keeps h_prev) with probability rate.
    zoned = ~keep_mask(key, shape, rate)
    np.testing.assert_array_equal(h, jnp.where(zoned, h_prev, h_new))  # exact, not just close
    # 10000 independent Bernoulli(rate) zoneout draws: 5 sigma of their mean.
    assert abs(float(jnp.mean(zoned)) - rate) < bernoulli_mean_tolerance(zoned.size, rate)
    grads = grad_of(fn, key, h_prev, h_new, argnums=(1, 2))
    naive = grad_of(lambda k, a, b: jnp.where(zoned, a, b), key, h_prev, h_new, argnums=(1, 2))
    for ours, reference in zip(grads, naive):
        np.testing.assert_array_equal(ours, reference)
    evaluated = variants.zoneout(None, h_prev, h_new, rate, deterministic=True)
    np.testing.assert_allclose(evaluated, rate * h_prev + (1 - rate) * h_new, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jax.jit(variants.zoneout)(key, h_prev, h_new, 1.0), h_prev)
    np.testing.assert_array_equal(variants.zoneout(key, h_prev, h_new, 0.0), h_new)


def test_zoneout_errors(key):
    with pytest.raises(ValueError, match="same shape and dtype"):
        variants.zoneout(key, jnp.ones((2, 3)), jnp.ones((3, 2)), 0.1)
    with pytest.raises(ValueError, match="same shape and dtype"):
        variants.zoneout(key, jnp.ones(3, jnp.float16), jnp.ones(3), 0.1)
    with pytest.raises(TypeError, match="h_new"):
        variants.zoneout(key, jnp.ones(3), jnp.ones(3, jnp.int32), 0.1)


def test_locked_dropout_errors(key):
    with pytest.raises(ValueError, match="time_axis"):
        variants.locked_dropout(key, jnp.ones((2, 4, 6, 3)), 0.5, time_axis=7)
