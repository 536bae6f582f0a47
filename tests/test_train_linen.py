"""Tests for TrainState.from_linen (against the hand-written one-example apply_fn: same keys, identical params
after steps, batch statistics as model state) and the DropPath modules of linen, nnx and equinox (against
jdrop.drop_path with the key the framework draws, per sample on a batch and per example inside train_step).
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import positive_input
from flax import nnx

import jdrop
from jdrop.interop import equinox as jdrop_eqx
from jdrop.interop import linen as jdrop_linen
from jdrop.interop import nnx as jdrop_nnx

B, T, C, CLASSES = 6, 4, 8, 3


class LinenNet(nn.Module):
    """A (T, C) example: Dense, BatchNorm over the whole batch, Dropout, a DropPath branch, mean-pooled logits."""

    @nn.compact
    def __call__(self, x, deterministic):
        h = nn.Dense(C)(x)
        h = nn.BatchNorm(use_running_average=deterministic, axis_name="batch", momentum=0.5)(h)
        h = nn.Dropout(0.3)(nn.relu(h), deterministic=deterministic)
        h = h + jdrop_linen.DropPath(0.5)(nn.Dense(C)(h), deterministic=deterministic)
        return nn.Dense(CLASSES)(h.mean(axis=0))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, B))}


def _hand_written(module):
    """The one-example apply_fn a linen user writes for train_step."""

    def apply_fn(params, x, *, key, deterministic, model_state):
        variables = {"params": params, **model_state}
        if deterministic:
            return module.apply(variables, x, deterministic=True), model_state
        out, updates = module.apply(variables, x, deterministic=False, rngs={"dropout": key}, mutable=["batch_stats"])
        return out, {**model_state, **updates}

    return apply_fn


def test_from_linen_equals_the_hand_written_apply_fn():
    module = LinenNet()
    variables = module.init(jax.random.key(0), _batch()["x"][0], deterministic=True)
    tx = optax.adam(1e-2)
    state = jdrop.TrainState.from_linen(module, variables, tx)
    assert isinstance(state.apply_fn, jdrop_linen.LinenApply)
    assert set(state.model_state) == {"batch_stats"}
    by_hand = jdrop.TrainState.create(apply_fn=_hand_written(module), params=variables["params"], tx=tx,
                                      model_state={"batch_stats": variables["batch_stats"]})
    for step in range(3):
        batch, key = _batch(step), jax.random.fold_in(jax.random.key(1), step)
        state, metrics = jdrop.train_step(state, batch, key)
        by_hand, hand_metrics = jdrop.train_step(by_hand, batch, key)
        assert float(metrics["loss"]) == float(hand_metrics["loss"])
    for a, b in zip(jax.tree.leaves((state.params, state.model_state)), jax.tree.leaves((by_hand.params,
                                                                                          by_hand.model_state))):
        np.testing.assert_array_equal(a, b)  # identical, not close
    # The batch statistics moved (the whole batch's, through axis_name="batch"), and evaluation uses them.
    assert not np.allclose(state.model_state["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    batch = _batch(9)
    assert jdrop.eval_step(state, batch)["loss"] == jdrop.eval_step(by_hand, batch)["loss"]
    trained = jdrop_linen.variables(state)
    logits = jax.vmap(lambda x: module.apply(trained, x, deterministic=True))(batch["x"])
    np.testing.assert_allclose(jdrop.eval_step(state, batch)["loss"],
                               optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), rtol=1e-6)


class TrainFlag(nn.Module):
    """A stateless module whose flag is `train` and which draws from two streams."""

    @nn.compact
    def __call__(self, x, train):
        h = nn.Dropout(0.5, deterministic=not train)(nn.Dense(C)(x))
        return nn.Dense(CLASSES)(h + 0.1 * jax.random.normal(self.make_rng("noise"), h.shape) * train)


def test_from_linen_streams_flags_and_errors():
    module = TrainFlag()
    x = _batch()["x"][:, 0]
    variables = module.init(jax.random.key(0), x[0], train=False)
    state = jdrop.TrainState.from_linen(module, variables, optax.sgd(0.1), rng_streams=("dropout", "noise"))
    assert state.model_state is None and state.apply_fn.flag == "train"
    new, _ = jdrop.train_step(state, {"x": x, "y": jnp.zeros(B, jnp.int32)}, jax.random.key(3))

    def by_hand(params, xi, *, key, deterministic):
        rngs = {"dropout": key, "noise": jax.random.fold_in(key, 1)}
        return module.apply({"params": params}, xi, train=not deterministic, rngs=None if deterministic else rngs)

    hand = jdrop.TrainState.create(apply_fn=by_hand, params=variables["params"], tx=optax.sgd(0.1))
    hand, _ = jdrop.train_step(hand, {"x": x, "y": jnp.zeros(B, jnp.int32)}, jax.random.key(3))
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(hand.params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="flax.linen.Module"):
        jdrop.TrainState.from_linen(lambda v: v, variables, optax.sgd(0.1))
    with pytest.raises(TypeError, match="'params'"):
        jdrop.TrainState.from_linen(module, {"batch_stats": {}}, optax.sgd(0.1))
    with pytest.raises(ValueError, match="`mutable`"):
        jdrop.TrainState.from_linen(module, variables, optax.sgd(0.1), mutable=["batch_stats"])
    with pytest.raises(TypeError, match="rng_streams"):
        jdrop.TrainState.from_linen(module, variables, optax.sgd(0.1), rng_streams="dropout")


# ------------------------------------------------------------------------------------------- DropPath


def _per_sample(key, x, rate):
    """timm's drop_path of a batch with jdrop's draws: x[b] / keep where keep_mask(key, (B,))[b], else 0."""
    keep = np.asarray(jdrop.keep_mask(key, (x.shape[0],), rate))
    return np.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), np.asarray(x, np.float64) / (1 - rate), 0.0)


def test_linen_drop_path_is_drop_path_with_flax_key_handling():
    x = positive_input((B, T, C))
    layer = jdrop_linen.DropPath(0.5)
    y = layer.apply({}, x, deterministic=False, rng=jax.random.key(4))
    np.testing.assert_allclose(y, _per_sample(jax.random.key(4), x, 0.5), rtol=2.0**-22)

    class ByHand(nn.Module):
        @nn.compact
        def __call__(self, v):
            return jdrop.drop_path(self.make_rng("dropout"), v, 0.5)

    rngs = {"dropout": jax.random.key(5)}
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=False, rngs=rngs), ByHand().apply({}, x, rngs=rngs))
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    np.testing.assert_allclose(jdrop_linen.DropPath(0.5, scale="classic").apply({}, x, deterministic=True), x * 0.5)
    np.testing.assert_array_equal(jdrop_linen.DropPath(1.0).apply({}, x, deterministic=False), jnp.zeros_like(x))
    with pytest.raises(ValueError, match="scale"):
        jdrop_linen.DropPath(0.5, scale="half")


def test_nnx_drop_path_is_drop_path_with_nnx_streams():
    x = positive_input((B, T, C))
    layer = jdrop_nnx.DropPath(0.5, rngs=nnx.Rngs(dropout=7))
    stream = nnx.Rngs(dropout=7)["dropout"].fork()
    np.testing.assert_allclose(layer(x), _per_sample(stream(), x, 0.5), rtol=2.0**-22)
    np.testing.assert_allclose(layer(x), _per_sample(stream(), x, 0.5), rtol=2.0**-22)  # the stream advances
    layer.eval()
    np.testing.assert_array_equal(layer(x), x)
    with pytest.raises(ValueError, match="no `rngs` argument was provided to DropPath"):
        jdrop_nnx.DropPath(0.5)(x)
    with pytest.raises(ValueError, match="`rate`"):
        jdrop_nnx.DropPath(1.5)


def test_equinox_drop_path_is_one_example_and_names_p():
    x = positive_input((T, C))
    layer = jdrop_eqx.DropPath(0.5)
    key = jax.random.key(8)
    np.testing.assert_allclose(layer(x, key=key), jdrop.drop_path(key, x, 0.5, batch_axis=None), rtol=0)
    keys = jdrop.example_keys(key, B)
    batch = positive_input((B, T, C))
    np.testing.assert_allclose(jax.vmap(lambda xi, ki: layer(xi, key=ki))(batch, keys),
                               jax.vmap(lambda xi, ki: jdrop.drop_path(ki, xi, 0.5, batch_axis=None))(batch, keys))
    np.testing.assert_allclose(jdrop_eqx.DropPath(0.5, batch_axis=0)(batch, key=key), _per_sample(key, batch, 0.5),
                               rtol=2.0**-22)
    np.testing.assert_array_equal(eqx.nn.inference_mode(layer)(x), x)
    with pytest.raises(ValueError, match="`p` must be in"):
        jdrop_eqx.DropPath(1.5)
    with pytest.raises(ValueError, match="`p` must be in"):
        jdrop_eqx.Dropout(1.5)
    with pytest.raises(ValueError, match="`p` must be in"):
        eqx.tree_at(lambda m: m.p, jdrop_eqx.Dropout(0.5), 1.5)(x, key=key)
    with pytest.raises(ValueError, match="key"):
        layer(x)


class NnxBlock(nnx.Module):
    def __init__(self, rngs, **drop_path):
        self.linear = nnx.Linear(C, C, rngs=rngs)
        self.drop_path = jdrop_nnx.DropPath(0.5, rngs=rngs, **drop_path)
        self.out = nnx.Linear(C, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.out((x + self.drop_path(self.linear(x))).mean(axis=0))


class EqxBlock(eqx.Module):
    linear: eqx.nn.Linear
    drop_path: jdrop_eqx.DropPath
    out: eqx.nn.Linear

    def __init__(self, key, **drop_path):
        a, b = jax.random.split(key)
        self.linear, self.out = eqx.nn.Linear(C, C, key=a), eqx.nn.Linear(C, CLASSES, key=b)
        self.drop_path = jdrop_eqx.DropPath(0.5, **drop_path)

    def __call__(self, x, *, key):
        return self.out((x + self.drop_path(jax.vmap(self.linear)(x), key=key)).mean(axis=0))


class LinenBlock(nn.Module):
    batch_axis: object = "auto"

    @nn.compact
    def __call__(self, x, deterministic):
        branch = jdrop_linen.DropPath(0.5, batch_axis=self.batch_axis)(nn.Dense(C)(x), deterministic)
        return nn.Dense(CLASSES)((x + branch).mean(axis=0))


def _block_state(framework, **drop_path):
    if framework == "linen":
        module = LinenBlock(**drop_path)
        variables = module.init(jax.random.key(0), _batch()["x"][0], deterministic=True)
        return jdrop.TrainState.from_linen(module, variables, optax.sgd(1.0))
    if framework == "nnx":
        return jdrop.TrainState.from_nnx(NnxBlock(nnx.Rngs(0), **drop_path), optax.sgd(1.0))
    return jdrop.TrainState.from_equinox(EqxBlock(jax.random.key(0), **drop_path), optax.sgd(1.0))


@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox"])
def test_drop_path_modules_drop_whole_examples_inside_train_step(framework):
    """Inside train_step the default DropPath treats each (T, C) example as one sample: the same step as the
    module written with batch_axis=None, not the per-token drop of batch_axis=0."""
    batch, key = _batch(), jax.random.key(11)
    default = _block_state(framework)
    explicit = _block_state(framework, batch_axis=None)
    per_token = _block_state(framework, batch_axis=0)
    (new, metrics), (hand, hand_metrics), (token, token_metrics) = (
        jdrop.train_step(s, batch, key) for s in (default, explicit, per_token))
    assert float(metrics["loss"]) == float(hand_metrics["loss"])
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(hand.params)):
        np.testing.assert_array_equal(a, b)
    assert float(metrics["loss"]) != float(token_metrics["loss"])  # the test can tell the two apart
