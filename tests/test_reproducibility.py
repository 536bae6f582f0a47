"""Bit-identical masks under jit, vmap and remat; vmapped multi-seed runs equal separate runs."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdrop
from jdrop import mlp

KEY = jax.random.key(17)
X = jax.random.normal(jax.random.key(1), (6, 33))


@pytest.mark.parametrize("residual", ["key", "bits", "mask"])
def test_same_output_eager_jit_vmap_and_remat(residual):
    f = partial(jdrop.dropout, rate=0.4, residual=residual)
    eager = f(KEY, X)
    np.testing.assert_array_equal(jax.jit(f)(KEY, X), eager)
    np.testing.assert_array_equal(jax.checkpoint(f)(KEY, X), eager)
    keys = jdrop.example_keys(KEY, 6)
    vmapped = jax.vmap(f)(keys, X)
    looped = jnp.stack([f(k, x) for k, x in zip(keys, X)])
    np.testing.assert_array_equal(vmapped, looped)


@pytest.mark.parametrize("residual", ["key", "bits", "mask"])
def test_remat_gradients_use_the_same_mask(residual):
    cot = jax.random.normal(jax.random.key(2), X.shape)

    def loss(x, wrap):
        return jnp.vdot(wrap(lambda v: jdrop.dropout(KEY, v, 0.4, residual=residual))(x), cot)

    plain = jax.grad(loss)(X, lambda g: g)
    remat = jax.jit(jax.grad(loss), static_argnums=1)(X, jax.checkpoint)
    np.testing.assert_array_equal(remat, plain)
    np.testing.assert_array_equal(plain != 0, jdrop.keep_mask(KEY, X.shape, 0.4))


def test_mlp_under_remat_matches():
    params = mlp.init(jax.random.key(0), [33, 16, 4])

    def loss(p, wrap):
        return jnp.sum(wrap(lambda p: mlp.apply(p, X, key=KEY, rates=(0.2, 0.5), deterministic=False))(p) ** 2)

    plain = jax.jit(jax.grad(loss), static_argnums=1)(params, lambda g: g)
    remat = jax.jit(jax.grad(loss), static_argnums=1)(params, jax.checkpoint)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# One apply_fn and one optimizer (static fields of the state): one compilation serves every seed.
_APPLY, _TX = partial(mlp.apply, rates=(0.1, 0.5, 0.5)), optax.adam(1e-2)


def _state(seed):
    params = mlp.init(jax.random.key(seed), [8, 16, 16, 3], activation="relu")
    return jdrop.TrainState.create(apply_fn=_APPLY, params=params, tx=_TX)


def _batch(step):
    return {"x": jax.random.normal(jax.random.fold_in(jax.random.key(5), step), (12, 8)), "y": jnp.arange(12) % 3}


def test_vmapped_sweep_over_four_seeds_equals_four_runs():
    seeds = jnp.arange(4)
    states = jax.jit(jax.vmap(_state))(seeds)
    run_keys = jax.vmap(jax.random.key)(seeds + 100)
    step = jax.jit(jax.vmap(jdrop.train_step, in_axes=(0, None, 0)))
    for s in range(3):
        states, metrics = step(states, _batch(s), jax.vmap(jax.random.fold_in, in_axes=(0, None))(run_keys, s))
    for seed in range(4):
        state = jax.jit(_state)(seed)
        for s in range(3):
            state, single = jdrop.train_step(state, _batch(s), jax.random.fold_in(jax.random.key(seed + 100), s))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(states.params)):
            np.testing.assert_allclose(b[seed], a, rtol=1e-5, atol=1e-6)  # float tolerance: batched matmuls
        assert abs(float(metrics["loss"][seed]) - float(single["loss"])) < 1e-5


def test_vmapped_rate_sweep_with_traced_rates_compiles_once():
    traces = []

    def counting_apply(params, x, *, key, train, rates):
        traces.append(1)
        return mlp.apply(params, x, key=key, deterministic=not train, rates=rates)

    params = mlp.init(jax.random.key(0), [8, 16, 3])

    base = jdrop.TrainState.create(apply_fn=counting_apply, params=params, tx=optax.sgd(0.1),
                                   hparams={"rates": (0.0, 0.0)})
    states = jax.vmap(lambda r: dataclasses.replace(base, hparams={"rates": (jnp.float32(0.0), r)}))(
        jnp.array([0.0, 0.3, 0.6]))
    step = jax.jit(jax.vmap(jdrop.train_step, in_axes=(0, None, None)))
    for s in range(3):
        states, metrics = step(states, {"x": _batch(s)["x"], "y": _batch(s)["y"]}, jax.random.key(s))
    assert len(traces) <= 2  # traced once for the forward (custom_vmap may trace the batched rule once more)
    losses = np.asarray(metrics["loss"])
    assert np.all(np.isfinite(losses)) and len(set(losses.tolist())) == 3
