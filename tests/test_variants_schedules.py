"""Tests for jdrop.variants.schedules (constant, linear, early and late dropout schedules): values against
numpy (Liu et al. 2023's ``drop_scheduler``), traced rates without recompiling, and errors.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdrop import variants


def test_schedules_values():
    steps = jnp.arange(12)
    np.testing.assert_allclose(jax.vmap(variants.constant_schedule(0.2))(steps), 0.2)
    warmup = jax.vmap(variants.linear_schedule(0.0, 0.4, 4, transition_begin=2))(steps)
    np.testing.assert_allclose(warmup, [0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4], atol=1e-7)
    decay = jax.vmap(variants.linear_schedule(0.5, 0.1, 8))(steps)
    np.testing.assert_allclose(decay, np.clip(0.5 - 0.05 * np.arange(12), 0.1, None), atol=1e-7)
    # Liu et al. 2023's drop_scheduler(mode="early"): np.full / np.linspace(rate, 0, cutoff) then zeros.
    early = jax.vmap(variants.early_dropout_schedule(0.1, 5))(steps)
    np.testing.assert_allclose(early, np.concatenate([np.full(5, 0.1), np.zeros(7)]), atol=1e-8)
    early_linear = jax.vmap(variants.early_dropout_schedule(0.1, 5, schedule="linear"))(steps)
    np.testing.assert_allclose(early_linear, np.concatenate([np.linspace(0.1, 0, 5), np.zeros(7)]), atol=1e-8)
    late = jax.vmap(variants.late_dropout_schedule(0.3, 4))(steps)
    np.testing.assert_allclose(late, np.concatenate([np.zeros(4), np.full(8, 0.3)]), atol=1e-8)


def test_schedules_drive_traced_rates_without_recompiling(key):
    schedule = variants.early_dropout_schedule(0.5, 3, schedule="linear")
    x = jnp.ones((64, 8))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(k, count):
        rate = schedule(count)
        return variants.feature_dropout(k, x, rate), variants.drop_path(k, x, rate), rate

    for count in range(5):
        y, path, rate = step(key, count)
        expected = float(schedule(count))
        np.testing.assert_allclose(rate, expected)
        if expected == 0.0:
            np.testing.assert_array_equal(y, x)
            np.testing.assert_array_equal(path, x)
        else:
            assert np.all((np.asarray(y) == 0) | np.isclose(y, 1 / (1 - expected), rtol=1e-5))


def test_schedules_errors():
    with pytest.raises(ValueError, match="init_rate"):
        variants.linear_schedule(1.5, 0.0, 10)
    with pytest.raises(ValueError, match="transition_steps"):
        variants.linear_schedule(0.1, 0.0, 0)
    with pytest.raises(ValueError, match="schedule"):
        variants.early_dropout_schedule(0.1, 10, schedule="cosine")
    with pytest.raises(ValueError, match="cutoff_step"):
        variants.early_dropout_schedule(0.1, -1)
    with pytest.raises(TypeError, match="step"):
        variants.constant_schedule(0.1)(jnp.zeros(3))
