"""Tests for jdrop.interop: the flax.linen, flax.nnx and equinox Dropout adapters.

Each adapter is checked against its framework's own Dropout: same rng state, same mask (identical zero
patterns), same outputs and gradients up to float rounding, and bit-identical to ``jdrop.dropout`` with the
key the framework derives. Then a small MLP per framework is trained with the adapter.

Eager jdrop compiles its small ops one by one for each new shape, so every computation here runs under ``jax.jit``.
"""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import signed_input
from flax import nnx

import jdrop
import jdrop.interop
from jdrop._validation import RESIDUALS
from jdrop.interop import equinox as jdrop_eqx
from jdrop.interop import linen as jdrop_linen
from jdrop.interop import nnx as jdrop_nnx

FRAMEWORKS = ["linen", "nnx", "equinox"]
SHAPE = (8, 16)
ROOT = Path(__file__).resolve().parents[1]


def _assert_same_mask(y, y_ref):
    np.testing.assert_array_equal(np.asarray(y) == 0, np.asarray(y_ref) == 0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------- one layer, each framework


class _KeyProbe(nn.Module):
    """Returns the key a top-level linen module's first ``make_rng("dropout")`` gives."""

    @nn.compact
    def __call__(self, x):
        return self.make_rng("dropout")


def _layer(framework, cls, rate, key, x, *, train=True, broadcast_dims=(), **fields):
    """Applies one Dropout of ``cls`` to ``x`` the framework's way, its rng state seeded by ``key``."""
    if framework == "linen":
        module = cls(rate, broadcast_dims=broadcast_dims, **fields)
        return module.apply({}, x, deterministic=not train, rngs={"dropout": key})
    if framework == "nnx":
        module = cls(rate, broadcast_dims=broadcast_dims, rngs=nnx.Rngs(dropout=key), **fields)
        return module(x, deterministic=not train)
    assert broadcast_dims == ()  # equinox's Dropout has no broadcast_dims
    return cls(rate, **fields)(x, key=key, inference=not train)


def _derived_key(framework, key):
    """The key the framework's Dropout hands to its mask in :func:`_layer`."""
    if framework == "linen":
        return _KeyProbe().apply({}, jnp.zeros(()), rngs={"dropout": key})
    if framework == "nnx":
        return nnx.Rngs(dropout=key)["dropout"].fork()()
    return key


CLASSES = {
    "linen": (nn.Dropout, jdrop_linen.Dropout),
    "nnx": (nnx.Dropout, jdrop_nnx.Dropout),
    "equinox": (eqx.nn.Dropout, jdrop_eqx.Dropout),
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_layer_is_the_framework_mask_and_jdrop_dropout(framework, key):
    reference, adapter = CLASSES[framework]
    x = signed_input(SHAPE)
    # (rate, broadcast_dims); equinox's Dropout has no broadcast_dims.
    cases = [(0.1, ()), (0.5, () if framework == "equinox" else (0,)), (0.9, ())]

    @jax.jit
    def run(key, x):
        derived = _derived_key(framework, key)
        outputs = []
        for rate, broadcast_dims in cases:
            options = {"broadcast_dims": broadcast_dims} if broadcast_dims else {}
            outputs.append(
                {
                    "reference": _layer(framework, reference, rate, key, x, **options),
                    "adapter": _layer(framework, adapter, rate, key, x, **options),
                    "classic": _layer(framework, adapter, rate, key, x, scale="classic", **options),
                    "jdrop": jdrop.dropout(derived, x, rate, **options),
                    "jdrop_classic": jdrop.dropout(derived, x, rate, scale="classic", **options),
                }
            )
        return outputs

    for (rate, broadcast_dims), out in zip(cases, run(key, x), strict=True):
        _assert_same_mask(out["adapter"], out["reference"])
        np.testing.assert_array_equal(out["adapter"], out["jdrop"])
        np.testing.assert_array_equal(out["classic"], out["jdrop_classic"])
        zeros = np.asarray(out["adapter"]) == 0
        assert 0 < np.mean(zeros) < 1, rate
        if broadcast_dims:  # one mask value per column
            np.testing.assert_array_equal(zeros, np.broadcast_to(zeros[:1], zeros.shape))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_residual_policy_sets_what_the_backward_pass_keeps(framework, key):
    _, adapter = CLASSES[framework]
    x = signed_input(SHAPE)
    kept = {"key": ("uint32", (2,)), "bits": ("uint8", (x.size // 8,)), "mask": ("bool", x.shape)}
    for residual, expected in kept.items():

        def residuals(x, residual=residual):
            return jax.tree.leaves(jax.vjp(lambda x: _layer(framework, adapter, 0.5, key, x, residual=residual), x)[1])

        arrays = [(str(r.dtype), r.shape) for r in jax.eval_shape(residuals, x) if r.shape != ()]
        assert arrays == [expected], (residual, arrays)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_eval_is_identity_and_needs_no_rng(framework):
    _, adapter = CLASSES[framework]
    x = signed_input(SHAPE)

    @jax.jit
    def run(x):
        if framework == "linen":
            return [
                adapter(0.5, deterministic=True).apply({}, x),
                adapter(0.5).apply({}, x, deterministic=True),
                adapter(0.5, scale="classic").apply({}, x, deterministic=True),
                adapter(0.0).apply({}, x, deterministic=False),
            ]
        if framework == "nnx":
            return [
                adapter(0.5, deterministic=True)(x),
                adapter(0.5, deterministic=False)(x, deterministic=True),
                adapter(0.5, scale="classic")(x, deterministic=True),
                adapter(0.0)(x),
            ]
        return [
            adapter(0.5, inference=True)(x),
            adapter(0.5)(x, inference=True),
            adapter(0.5, scale="classic")(x, inference=True),
            adapter(0.0)(x),
        ]

    identity, call_time, classic, rate_zero = run(x)
    np.testing.assert_array_equal(identity, x)
    np.testing.assert_array_equal(call_time, x)
    np.testing.assert_array_equal(classic, 0.5 * x)  # eval y = keep * x
    np.testing.assert_array_equal(rate_zero, x)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_rate_one_gives_zeros_and_zero_gradients(framework, key):
    _, adapter = CLASSES[framework]
    x = signed_input(SHAPE)

    @jax.jit
    def grad(x):
        return jax.value_and_grad(lambda x: jnp.sum(_layer(framework, adapter, 1.0, key, x)))(x)

    value, dx = grad(x)
    assert value == 0
    np.testing.assert_array_equal(dx, jnp.zeros_like(x))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_rate_may_be_traced(framework, key):
    """A jdrop extension: a rate schedule needs one compilation (the frameworks' Dropout needs a static rate)."""
    _, adapter = CLASSES[framework]
    x = signed_input(SHAPE)
    traces = []

    @jax.jit
    def run(rate):
        traces.append(rate)
        return _layer(framework, adapter, rate, key, x), jdrop.dropout(_derived_key(framework, key), x, rate)

    for rate in (0.25, 0.5):
        y, expected = run(jnp.float32(rate))
        np.testing.assert_array_equal(y, expected)
    assert len(traces) == 1


def test_rng_streams_advance_as_the_frameworks_do(key):
    """Rate 0, rate 1 and eval calls draw no key, so later masks still match the framework's."""
    x = signed_input(SHAPE)

    class Stack(nn.Module):
        cls: type

        @nn.compact
        def __call__(self, x):
            last = self.cls(0.5)
            outputs = [self.cls(0.0)(x, deterministic=False), self.cls(1.0)(x, deterministic=False)]
            outputs += [last(x, deterministic=True), last(x, deterministic=False), last(x, deterministic=False)]
            return outputs, jax.random.key_data(self.make_rng("dropout"))

    def nnx_stack(cls, key):
        rngs = nnx.Rngs(dropout=key)
        layers = [cls(0.0), cls(1.0), cls(0.5)]
        outputs = [layers[0](x, rngs=rngs, deterministic=False), layers[1](x, rngs=rngs, deterministic=False)]
        outputs += [layers[2](x, rngs=rngs, deterministic=True), layers[2](x, rngs=rngs, deterministic=False)]
        outputs += [layers[2](x, rngs=rngs["dropout"], deterministic=False)]
        return outputs, jax.random.key_data(rngs.dropout())

    @jax.jit
    def run(key):
        return {
            "linen": [Stack(cls).apply({}, x, rngs={"dropout": key}) for cls in CLASSES["linen"]],
            "nnx": [nnx_stack(cls, key) for cls in CLASSES["nnx"]],
        }

    for (ref_outputs, ref_key), (outputs, next_key) in run(key).values():
        for y, y_ref in zip(outputs, ref_outputs, strict=True):
            _assert_same_mask(y, y_ref)
        np.testing.assert_array_equal(next_key, ref_key)


# ------------------------------------------------------------------------------------- errors follow the frameworks


def _raises_like(reference_call, adapter_call):
    """``adapter_call`` raises the exception type that ``reference_call`` raises."""
    with pytest.raises(Exception) as expected:
        reference_call()
    with pytest.raises(expected.type):
        adapter_call()


@pytest.mark.parametrize("field", [{"scale": "bogus"}, {"residual": "bogus"}])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_unknown_option_is_rejected_at_construction(framework, field):
    _, adapter = CLASSES[framework]
    with pytest.raises(ValueError, match=next(iter(field))):
        adapter(0.5, **field)


def test_linen_errors_follow_flax():
    x = signed_input(SHAPE)
    for cls_call in [
        lambda cls: cls(0.5).apply({}, x, deterministic=False),  # no 'dropout' rng
        lambda cls: cls(0.5).apply({}, x),  # deterministic neither in constructor nor call
        lambda cls: cls(0.5, deterministic=True).apply({}, x, deterministic=True),  # both
    ]:
        _raises_like(lambda call=cls_call: call(nn.Dropout), lambda call=cls_call: call(jdrop_linen.Dropout))


def test_nnx_errors_follow_flax(key):
    x = signed_input(SHAPE)
    for cls_call in [
        lambda cls: cls(0.5)(x),  # no rngs
        lambda cls: cls(0.5, deterministic=None)(x, rngs=key),  # no deterministic
        lambda cls: cls(0.5)(x, rngs=0),  # rngs of the wrong type
        lambda cls: cls(0.5, rngs=key),  # a key is not an Rngs or RngStream
    ]:
        _raises_like(lambda call=cls_call: call(nnx.Dropout), lambda call=cls_call: call(jdrop_nnx.Dropout))
    with pytest.raises(ValueError, match="rngs"):
        jdrop_nnx.Dropout(0.5)(x)


def test_equinox_errors_and_deprecations_follow_equinox():
    x = signed_input(SHAPE)
    _raises_like(lambda: eqx.nn.Dropout(0.5)(x), lambda: jdrop_eqx.Dropout(0.5)(x))  # no key in training
    with pytest.warns(UserWarning, match="deprecated"):
        layer = jdrop_eqx.Dropout(0.5, deterministic=True)
    assert layer.inference and layer.deterministic
    with pytest.warns(UserWarning, match="deprecated"):
        np.testing.assert_array_equal(jdrop_eqx.Dropout(0.5)(x, deterministic=True), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jdrop_eqx.Dropout(0.5, inference=True)


def test_equinox_missing_key_is_jdrops_missing_key_error_and_equinoxs_runtime_error():
    # One rule, one wording: the ValueError every jdrop op raises, which is also the RuntimeError equinox raises.
    x = signed_input(SHAPE)
    mha = eqx.nn.MultiheadAttention(2, 8, dropout_p=0.1, key=jax.random.key(0))
    tokens = jnp.ones((3, 8))
    for call in (lambda: jdrop_eqx.Dropout(0.5)(x), lambda: jdrop_eqx.multihead_attention(mha, tokens, tokens, tokens)):
        with pytest.raises(ValueError, match=r"needs a PRNG `key` in training mode.*or inference=True") as error:
            call()
        assert isinstance(error.value, RuntimeError)


# ------------------------------------------------------------------------------------- imports


def test_importing_jdrop_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys
        import jdrop
        import jdrop.interop
        assert "flax" not in sys.modules and "equinox" not in sys.modules, sorted(sys.modules)
        assert sorted(dir(jdrop.interop)) == ["equinox", "linen", "nnx"]
        from jdrop.interop import equinox
        assert "equinox" in sys.modules and "flax" not in sys.modules
        jdrop.interop.linen.Dropout
        assert "flax" in sys.modules
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_unknown_interop_attribute_raises():
    with pytest.raises(AttributeError, match="haiku"):
        jdrop.interop.haiku  # noqa: B018


# ------------------------------------------------------------------------------------- models, each framework

IN, HIDDEN, BATCH, STEPS, RATE = 8, 32, 32, 20, 0.3
NAMES = ["reference", *RESIDUALS]  # the framework's Dropout, then the adapter with each residual policy


@jax.jit
def _regression_data():
    x = jax.random.normal(jax.random.key(1), (BATCH, IN))
    y = jnp.sin(x @ jnp.linspace(-1.0, 1.0, IN))[:, None]
    return x, y


def _stack(trees):
    # numpy, not jnp: an eager jnp op compiles once per leaf shape.
    return jax.tree.map(lambda *leaves: np.stack(leaves), *jax.device_get(trees))


def _check_training(losses, grads, before, after):
    """Checks ``STEPS`` training steps of the reference model and of the adapter with each residual policy.

    Args:
      losses: {name: training loss per step}.
      grads: {name: gradients per step, stacked along a leading axis}.
      before, after: {name: deterministic (eval-mode) loss before and after training}.
    """
    losses, grads, before, after = jax.device_get((losses, grads, before, after))
    for name in NAMES:
        assert before[name] == before["reference"], name  # eval mode is the identity in both
        np.testing.assert_allclose(losses[name], losses["reference"], rtol=1e-4, err_msg=name)
        assert after[name] < 0.7 * before[name], (name, before[name], after[name])
    for name in RESIDUALS:
        leaves = jax.tree.leaves(grads[name])
        assert len(leaves) == 4, name  # two weight matrices, two biases
        # Same rngs, same masks: the framework's gradients. Checked at the first step, since later steps start
        # from parameters that differ by float rounding.
        for leaf, reference_leaf in zip(leaves, jax.tree.leaves(grads["reference"]), strict=True):
            np.testing.assert_allclose(leaf[0], reference_leaf[0], rtol=1e-5, atol=1e-6, err_msg=name)
        # The residual policies differ only in where the backward pass finds the mask: identical gradients.
        for leaf, key_leaf in zip(leaves, jax.tree.leaves(grads["key"]), strict=True):
            np.testing.assert_array_equal(leaf, key_leaf, err_msg=name)


class LinenMLP(nn.Module):
    dropout: type = nn.Dropout
    fields: tuple = ()

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.Dense(HIDDEN)(x))
        x = self.dropout(RATE, deterministic=not train, **dict(self.fields))(x)
        return nn.Dense(1)(x)


def test_linen_mlp_trains_like_flax_dropout(key):
    """A linen MLP with the adapter, trained with optax, against the same MLP with flax.linen.Dropout."""
    x, y = _regression_data()
    models = {"reference": LinenMLP()}
    models.update({residual: LinenMLP(jdrop_linen.Dropout, (("residual", residual),)) for residual in RESIDUALS})
    params = jax.jit(lambda key: models["reference"].init(key, x, train=False))(jax.random.key(0))
    tx = optax.adam(1e-2)

    @jax.jit
    def train(params, key):
        def run(model):
            def loss(params, train, key=None):
                out = model.apply(params, x, train=train, rngs={"dropout": key} if train else None)
                return jnp.mean((out - y) ** 2)

            def step(carry, step_key):
                params, opt_state = carry
                value, grads = jax.value_and_grad(loss)(params, True, step_key)
                updates, opt_state = tx.update(grads, opt_state)
                return (optax.apply_updates(params, updates), opt_state), (value, grads)

            (trained, _), (losses, grads) = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, STEPS))
            return losses, grads, loss(params, False), loss(trained, False)

        return {name: run(model) for name, model in models.items()}

    out = train(params, key)
    losses, grads, before, after = ({name: result[i] for name, result in out.items()} for i in range(4))
    _check_training(losses, grads, before, after)


class NnxMLP(nnx.Module):
    def __init__(self, dropout, rngs, **fields):
        self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.dropout = dropout(RATE, rngs=rngs, **fields)
        self.out = nnx.Linear(HIDDEN, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.hidden(x))))


def _nnx_loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def test_nnx_mlp_trains_like_flax_dropout():
    """An nnx MLP with the adapter, trained with nnx.Optimizer, against the same MLP with flax.nnx.Dropout."""
    x, y = _regression_data()

    def make(dropout, **fields):
        return NnxMLP(dropout, nnx.Rngs(params=0, dropout=1), **fields)

    models = {"reference": make(nnx.Dropout)}
    models.update({residual: make(jdrop_nnx.Dropout, residual=residual) for residual in RESIDUALS})
    optimizers = {name: nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param) for name, model in models.items()}

    @nnx.jit
    def step(models, optimizers):
        out = {}
        for name, model in models.items():
            value, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
            optimizers[name].update(model, grads)
            out[name] = value, grads
        return out

    @nnx.jit
    def eval_losses(models):
        return {name: _nnx_loss(nnx.view(model, deterministic=True), x, y) for name, model in models.items()}

    before = eval_losses(models)
    steps = [step(models, optimizers) for _ in range(STEPS)]  # each step draws the next keys from the streams
    after = eval_losses(models)
    losses = {name: np.array([s[name][0] for s in steps]) for name in NAMES}
    grads = {name: _stack([s[name][1] for s in steps]) for name in NAMES}
    _check_training(losses, grads, before, after)

    for name, model in models.items():
        model.eval()
        assert model.dropout.deterministic
        np.testing.assert_array_equal(model.dropout(x), x)
        model.train()
        model.set_attributes(nnx.Dropout, deterministic=True)  # a filter on flax's class finds the adapter too
        assert model.dropout.deterministic, name


class EqxMLP(eqx.Module):
    hidden: eqx.nn.Linear
    dropout: eqx.Module
    out: eqx.nn.Linear

    def __init__(self, dropout, key, **fields):
        hidden_key, out_key = jax.random.split(key)
        self.hidden = eqx.nn.Linear(IN, HIDDEN, key=hidden_key)
        self.dropout = dropout(RATE, **fields)
        self.out = eqx.nn.Linear(HIDDEN, 1, key=out_key)

    def __call__(self, x, *, key=None):
        return self.out(self.dropout(jax.nn.relu(self.hidden(x)), key=key))


def _eqx_loss(model, x, y, key):
    """One key per example: equinox models are written for one example and vmapped."""
    keys = None if key is None else jax.random.split(key, x.shape[0])
    out = jax.vmap(lambda x, key: model(x, key=key))(x, keys)
    return jnp.mean((out - y) ** 2)


def test_equinox_mlp_trains_like_equinox_dropout(key):
    """An equinox MLP with the adapter, trained with eqx.filter_grad and optax, against eqx.nn.Dropout."""
    x, y = _regression_data()
    tx = optax.adam(1e-2)

    @eqx.filter_jit  # eager initialisation would compile each initialiser op on its own
    def setup():
        models = {"reference": EqxMLP(eqx.nn.Dropout, jax.random.key(0))}
        models.update({r: EqxMLP(jdrop_eqx.Dropout, jax.random.key(0), residual=r) for r in RESIDUALS})
        return models, {name: tx.init(eqx.filter(model, eqx.is_inexact_array)) for name, model in models.items()}

    models, opt_states = setup()

    @eqx.filter_jit
    def step(models, opt_states, key):
        out = {}
        for name, model in models.items():
            value, grads = eqx.filter_value_and_grad(_eqx_loss)(model, x, y, key)
            updates, opt_states[name] = tx.update(grads, opt_states[name])
            models[name] = eqx.apply_updates(model, updates)
            out[name] = value, grads
        return models, opt_states, out

    @eqx.filter_jit
    def eval_losses(models):
        return {name: _eqx_loss(eqx.nn.inference_mode(model), x, y, None) for name, model in models.items()}

    before = eval_losses(models)
    steps = []
    for step_key in jax.random.split(key, STEPS):
        models, opt_states, out = step(models, opt_states, step_key)
        steps.append(out)
    after = eval_losses(models)
    losses = {name: np.array([s[name][0] for s in steps]) for name in NAMES}
    grads = {name: _stack([s[name][1] for s in steps]) for name in NAMES}
    _check_training(losses, grads, before, after)
