"""TrainState.from_nnx / from_equinox (jdrop.interop.nnx.train_state, jdrop.interop.equinox.train_state): the
per-example dropout masks of flax nnx and equinox models, the frameworks' own Dropout and jdrop's adapters, checked
against an explicit loop over the examples; merging back for evaluation; errors.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import assert_trees_close, normal_input
from flax import nnx

import jdrop
from jdrop.interop import equinox as jdrop_eqx
from jdrop.interop import nnx as jdrop_nnx

B, D_IN, HIDDEN, CLASSES, LR = 4, 5, 16, 3, 0.1


def _batch():
    x = np.array(normal_input((B, D_IN), seed=2))
    x[1] = x[0]  # two identical examples: only their masks tell them apart
    return {"x": jnp.asarray(x), "y": jnp.arange(B, dtype=jnp.int32) % CLASSES}


def _cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# ------------------------------------------------------------------------------------------------ nnx


class NnxMLP(nnx.Module):
    """Two dropout layers of the same width, flax's own and jdrop's adapter (streams 'drop_a' < 'drop_b')."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
        self.drop_a = nnx.Dropout(0.5, rngs=rngs)
        self.middle = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.drop_b = jdrop_nnx.Dropout(0.25, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = self.drop_a(nnx.relu(self.hidden(x)))
        return self.out(self.drop_b(nnx.relu(self.middle(h))))


def _nnx_loop(graphdef, params, model_state, x, key):
    """Example i by itself: a fresh module whose stream j starts at fold_in(example key i, j) (the documented
    rule), in training mode, on x[i] alone."""
    outputs, masks = [], []
    for i, example_key in enumerate(jdrop.example_keys(key, x.shape[0])):
        model = nnx.merge(graphdef, params, model_state)
        model.train()
        for j, layer in enumerate((model.drop_a, model.drop_b)):
            layer.rngs.key[...] = jax.random.fold_in(example_key, j)
            layer.rngs.count[...] = jnp.zeros((), jnp.uint32)
        outputs.append(model(x[i]))
        masks.append(jax.random.fold_in(jax.random.fold_in(example_key, 0), 0))  # drop_a's first draw
    return jnp.stack(outputs), masks


def test_nnx_mlp_per_example_masks_equal_an_explicit_loop():
    model = NnxMLP(nnx.Rngs(0))
    state = jdrop.TrainState.from_nnx(model, optax.sgd(LR))
    assert isinstance(state.apply_fn, jdrop_nnx.NnxApply)
    batch, key = _batch(), jax.random.key(9)
    new, metrics = jdrop.train_step(state, batch, key)
    graphdef = state.apply_fn.graphdef

    @jax.jit
    def reference(params, model_state):  # the state as an argument: nnx lets the loop reseed its own copy
        out, _ = _nnx_loop(graphdef, params, model_state, batch["x"], key)
        return _cross_entropy(out, batch["y"]), out

    (value, out), grads = jax.value_and_grad(reference, has_aux=True)(state.params, state.model_state)
    np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-6)
    assert_trees_close(new.params, jax.tree_util.tree_map(lambda p, g: p - LR * g, state.params, grads))
    # Identical inputs, different masks; and the two layers of one example do not share a mask.
    assert not np.allclose(out[0], out[1], atol=1e-4)
    outputs = jdrop.train.per_example(state.apply_fn, state.params, batch["x"], key, model_state=state.model_state)[0]
    np.testing.assert_allclose(outputs, out, rtol=1e-5, atol=1e-6)
    # The rng streams are not advanced by training (the next step's keys come from its key); the module is intact.
    def raw(state):
        leaves = jax.tree_util.tree_leaves(state.model_state)
        return [jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v for v in leaves]

    for after, before in zip(raw(new), raw(state)):
        np.testing.assert_array_equal(after, before)
    assert np.asarray(model.drop_a.rngs.count[...]) == 0
    # Merged back: the trained module, evaluated in eval mode, is what eval_step evaluates.
    trained = jdrop_nnx.merge(new)
    assert isinstance(trained, NnxMLP)
    assert_trees_close(nnx.state(trained, nnx.Param), new.params)
    trained.eval()
    eval_loss = _cross_entropy(trained(batch["x"]), batch["y"])
    np.testing.assert_allclose(float(jdrop.eval_step(new, batch)["loss"]), float(eval_loss), rtol=1e-5)


def test_nnx_layers_and_examples_draw_independent_masks():
    state = jdrop.TrainState.from_nnx(NnxMLP(nnx.Rngs(0)), optax.sgd(LR))
    key = jax.random.key(3)
    x = jnp.ones((2, D_IN))
    # The first draw of stream j of example i uses fold_in(fold_in(k_i, j), 0): distinct for every (i, j).
    keys = [[jax.random.fold_in(jax.random.fold_in(k, j), 0) for j in range(2)] for k in jdrop.example_keys(key, 2)]
    data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for row in keys for k in row}
    assert len(data) == 4
    out, _ = jax.jit(lambda p: jdrop.train.per_example(state.apply_fn, p, x, key, model_state=state.model_state))(
        state.params)
    assert not np.allclose(out[0], out[1], atol=1e-4)


class NnxNoAxisName(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.BatchNorm(D_IN, rngs=rngs)  # no axis_name: statistics of one example

    def __call__(self, x):
        return self.norm(x)[:CLASSES]


def test_model_state_must_be_reduced_over_the_batch():
    state = jdrop.TrainState.from_nnx(NnxNoAxisName(nnx.Rngs(0)), optax.sgd(LR))
    with pytest.raises(ValueError, match="axis_name='batch'"):
        jdrop.train_step(state, _batch(), jax.random.key(0))


def test_from_nnx_errors():
    with pytest.raises(TypeError, match="nnx.Module"):
        jdrop.TrainState.from_nnx({"w": jnp.ones(2)}, optax.sgd(LR))
    plain = jdrop.TrainState.create(apply_fn=lambda *a, **k: None, params={}, tx=optax.sgd(LR))
    with pytest.raises(TypeError, match="from_nnx"):
        jdrop_nnx.merge(plain)
    with pytest.raises(TypeError, match="from_equinox"):
        jdrop_eqx.combine(plain)


# -------------------------------------------------------------------------------------------- equinox


class EqxMLP(eqx.Module):
    hidden: eqx.nn.Linear
    drop_a: eqx.nn.Dropout
    middle: eqx.nn.Linear
    drop_b: jdrop_eqx.Dropout
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.hidden = eqx.nn.Linear(D_IN, HIDDEN, key=k1)
        self.drop_a = eqx.nn.Dropout(0.5)
        self.middle = eqx.nn.Linear(HIDDEN, HIDDEN, key=k2)
        self.drop_b = jdrop_eqx.Dropout(0.25)
        self.out = eqx.nn.Linear(HIDDEN, CLASSES, key=k3)

    def __call__(self, x, *, key):
        key_a, key_b = jax.random.split(key)
        h = self.drop_a(jax.nn.relu(self.hidden(x)), key=key_a)
        return self.out(self.drop_b(jax.nn.relu(self.middle(h)), key=key_b))


def test_equinox_mlp_per_example_masks_equal_an_explicit_loop():
    model = EqxMLP(jax.random.key(0))
    state = jdrop.TrainState.from_equinox(model, optax.sgd(LR))
    assert isinstance(state.apply_fn, jdrop_eqx.EquinoxApply) and state.model_state is None
    batch, key = _batch(), jax.random.key(9)
    new, metrics = jdrop.train_step(state, batch, key)

    @jax.jit
    def reference(params):
        m = eqx.combine(params, state.apply_fn.static)
        keys = jdrop.example_keys(key, B)
        out = jnp.stack([m(batch["x"][i], key=keys[i]) for i in range(B)])  # example i with its own key
        return _cross_entropy(out, batch["y"]), out

    (value, out), grads = jax.value_and_grad(reference, has_aux=True)(state.params)
    np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-6)
    assert_trees_close(new.params, jax.tree_util.tree_map(lambda p, g: p - LR * g, state.params, grads))
    assert not np.allclose(out[0], out[1], atol=1e-4)
    trained = jdrop_eqx.combine(new)
    assert isinstance(trained, EqxMLP)
    evaluated = jax.vmap(eqx.nn.inference_mode(trained))(batch["x"], key=jnp.stack([jax.random.key(0)] * B))
    np.testing.assert_allclose(float(jdrop.eval_step(new, batch)["loss"]),
                               float(_cross_entropy(evaluated, batch["y"])), rtol=1e-5)


class EqxNorm(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    dropout: eqx.nn.Dropout

    def __init__(self, key):
        self.linear = eqx.nn.Linear(D_IN, CLASSES, use_bias=False, key=key)
        self.norm = eqx.nn.BatchNorm(CLASSES, axis_name=jdrop.train.BATCH_AXIS, momentum=0.5, mode="ema")
        self.dropout = eqx.nn.Dropout(0.5)

    def __call__(self, x, state, *, key):
        h, state = self.norm(self.linear(x), state)
        return self.dropout(h, key=key), state


def test_equinox_batchnorm_state_is_the_whole_batch_statistics():
    model, norm_state = eqx.nn.make_with_state(EqxNorm)(jax.random.key(0))
    state = jdrop.TrainState.from_equinox(model, optax.sgd(LR), state=norm_state)
    batch = _batch()
    new, _ = jdrop.train_step(state, batch, jax.random.key(1))
    trained, new_norm_state = jdrop_eqx.combine(new)
    assert isinstance(trained, EqxNorm)
    # Reference: the whole batch's mean and variance of the pre-norm features (equinox's "ema" mode starts its
    # running statistics at the first batch's).
    h = np.asarray(batch["x"] @ model.linear.weight.T, np.float64)
    mean, var = new_norm_state.get(model.norm.ema_state_index)
    np.testing.assert_allclose(mean, h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, h.var(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="equinox.nn.State"):
        jdrop.TrainState.from_equinox(model, optax.sgd(LR), state={"mean": 0})
    with pytest.raises(TypeError, match="equinox.Module"):
        jdrop.TrainState.from_equinox(lambda x: x, optax.sgd(LR))
