"""Keys of every PRNG implementation, every global config, and the errors and defaults that depend on the key.

The global configs (``jax_default_prng_impl``, ``jax_threefry_partitionable``, ``jax_enable_x64``) are each set
in an interpreter of their own: ``tests/key_config_checks.py`` runs every check for one config (keys of each
implementation, typed and raw, against ``jax.random.bernoulli``, flax and equinox). The rest runs here under the
defaults, with explicitly typed keys of each implementation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdrop

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "key_config_checks.py"
CONFIGS = [(impl, partitionable, x64) for impl in ("threefry2x32", "rbg", "unsafe_rbg")
           for partitionable in (True, False) for x64 in (False, True)]


@pytest.mark.parametrize(("impl", "partitionable", "x64"), CONFIGS)
def test_every_key_under_every_config(impl, partitionable, x64):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, str(CHECKS), impl, str(int(partitionable)), str(int(x64))]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith(f"OK impl={impl} partitionable={partitionable} x64={x64}"), proc.stdout


KEYS = {impl: jax.random.key(4, impl=impl) for impl in ("threefry2x32", "rbg", "unsafe_rbg", "philox4x32")}


# ------------------------------------------------------------------------------------------ the key comes first


@pytest.mark.parametrize("swapped_key", [jax.random.key(0), jax.random.PRNGKey(0)], ids=["typed", "raw"])
@pytest.mark.parametrize("op", [
    lambda a, b: jdrop.dropout(a, b, 0.5),
    lambda a, b: jdrop.dropout_fwd(a, b, 0.5),
    lambda a, b: jdrop.drop_path(a, b, 0.5),
    lambda a, b: jdrop.feature_dropout(a, b, 0.5),
    lambda a, b: jdrop.gaussian_dropout(a, b, 0.5),
    lambda a, b: jdrop.alpha_dropout(a, b, 0.5),
    lambda a, b: jdrop.dropconnect(a, b, 0.5),
], ids=["dropout", "dropout_fwd", "drop_path", "feature_dropout", "gaussian_dropout", "alpha_dropout", "dropconnect"])
def test_swapped_arguments_say_the_key_comes_first(op, swapped_key):
    x = jnp.ones((3, 2))
    with pytest.raises(TypeError, match="the key comes first"):
        op(x, swapped_key)


def test_a_raw_key_of_another_implementation_names_the_default_shape():
    with pytest.raises(TypeError, match=r"trailing shape is \(2,\) under jax_default_prng_impl='threefry2x32'"):
        jdrop.dropout(jnp.zeros(4, jnp.uint32), jnp.ones(3), 0.5)


def test_a_custom_prng_implementation_is_accepted_and_rebuilt():
    import importlib.util

    spec = importlib.util.spec_from_file_location("key_config_checks", CHECKS)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    key = jax.random.key(3, impl=checks.custom_impl())
    x = jnp.arange(1.0, 9.0)
    np.testing.assert_array_equal(jdrop.keep_mask(key, (8,), 0.5), jax.random.bernoulli(key, 0.5, (8,)))
    grad = jax.grad(lambda x: jdrop.dropout(key, x, 0.5, residual="key").sum())(x)  # rebuilds the key from data
    np.testing.assert_allclose(grad, 2.0 * jax.random.bernoulli(key, 0.5, (8,)))


# ------------------------------------------------------------------------------------------ residual per key


@pytest.mark.parametrize(("impl", "policy"), [("threefry2x32", "key"), ("rbg", "bits"), ("unsafe_rbg", "bits"),
                                              ("philox4x32", "bits")])
def test_default_residual_depends_on_the_key(impl, policy):
    _, res = jdrop.dropout_fwd(KEYS[impl], jnp.ones((4, 8)), 0.3)
    assert res.policy == policy


@pytest.mark.parametrize("impl", sorted(KEYS))
def test_default_residual_gradient_is_the_forward_mask(impl):
    key, x = KEYS[impl], jnp.arange(1.0, 33.0).reshape(4, 8)
    grad = jax.jit(jax.grad(lambda x: jdrop.dropout(key, x, 0.3).sum()))(x)
    keep = jax.random.bernoulli(key, 0.7, x.shape)
    np.testing.assert_allclose(grad, keep / np.float32(np.ceil(0.7 * 2**23) / 2**23), rtol=1e-6)


# ------------------------------------------------------------------------------------------ attention


def test_attention_with_an_rbg_key_draws_flaxs_mask_whole_and_warns():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 9, 2, 4)) for i in range(3))
    rng = KEYS["rbg"]
    with pytest.warns(UserWarning, match=r"drawn whole \(324 bytes, O\(T\^2\) memory"):
        ours = jdrop.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=0.3, broadcast_dropout=False,
                                           block_q=4, block_k=4)
    theirs = nn.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=0.3, broadcast_dropout=False)
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=2e-6)  # float32 rounding of a sum of 9 terms


def test_attention_with_a_threefry_key_does_not_warn():
    q = jnp.ones((1, 8, 1, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jdrop.dot_product_attention(q, q, q, dropout_rng=jax.random.key(0), dropout_rate=0.3)


@pytest.mark.parametrize("impl", ["rbg", "philox4x32"])
def test_fast_attention_masks_take_any_key(impl):
    q = jax.random.normal(jax.random.key(1), (1, 64, 1, 8))
    out = jdrop.dot_product_attention(q, q, q, dropout_rng=KEYS[impl], dropout_rate=0.3, dropout_mask="fast16")
    again = jdrop.dot_product_attention(q, q, q, dropout_rng=KEYS[impl], dropout_rate=0.3, dropout_mask="fast16")
    np.testing.assert_array_equal(out, again)
    assert jnp.isfinite(out).all()


# ------------------------------------------------------------------------------------------ forward-mode AD


def _equinox_dropout(key, x, rate):
    return eqx.nn.Dropout(rate)(x, key=key)


@pytest.mark.parametrize("policy", [None, "key", "bits", "mask"])
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_forward_mode_equals_autodiff_of_equinox_dropout(impl, policy):
    key = KEYS[impl]
    x = jax.random.normal(jax.random.key(7), (5, 6))
    t = jax.random.normal(jax.random.key(8), (5, 6))
    ours = partial(lambda x: jdrop.dropout(key, x, 0.4, residual=policy))
    theirs = partial(_equinox_dropout, key, rate=0.4)
    tol = dict(rtol=1e-6, atol=1e-6)  # 1/keep: jdrop's realised keep vs equinox's 0.6, within 2**-23
    np.testing.assert_allclose(jax.jvp(ours, (x,), (t,))[1], jax.jvp(theirs, (x,), (t,))[1], **tol)
    np.testing.assert_allclose(jax.linearize(ours, x)[1](t), jax.linearize(theirs, x)[1](t), **tol)
    np.testing.assert_allclose(jax.jacfwd(ours)(x[0]), jax.jacfwd(theirs)(x[0]), **tol)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(ours))(x[0]), jax.jacfwd(theirs)(x[0]), **tol)
    # jacrev vmaps the backward pass over cotangents: a regenerated rbg mask must not be drawn batched.
    np.testing.assert_allclose(jax.jit(jax.jacrev(ours))(x[0]), jax.jacfwd(theirs)(x[0]), **tol)
    cube = lambda f: lambda v: (f(v) ** 3).sum()  # noqa: E731
    np.testing.assert_allclose(jax.hessian(cube(ours))(x[0]), jax.hessian(cube(theirs))(x[0]), rtol=1e-5)


@pytest.mark.parametrize("variant", [
    lambda k, x: jdrop.drop_path(k, x, 0.5),
    lambda k, x: jdrop.feature_dropout(k, x, 0.5),
    lambda k, x: jdrop.alpha_dropout(k, x, 0.3),
    lambda k, x: jdrop.gaussian_dropout(k, x, 0.3),
    lambda k, x: jdrop.concrete_dropout(k, x, jnp.float32(-1.0)),
    lambda k, x: jdrop.dropblock(k, x[..., None], 0.2, block_size=2)[..., 0],
    lambda k, x: jdrop.locked_dropout(k, x, 0.3, time_axis=1),
    lambda k, x: jdrop.attention_dropout(k, jax.nn.softmax(x), 0.3),
    lambda k, x: jdrop.dropconnect(k, x, 0.3),
], ids=["drop_path", "feature_dropout", "alpha_dropout", "gaussian_dropout", "concrete_dropout", "dropblock",
        "locked_dropout", "attention_dropout", "dropconnect"])
def test_forward_mode_through_every_variant_equals_reverse_mode(variant):
    key, x = jax.random.key(2), jax.random.normal(jax.random.key(3), (4, 5, 6))
    f = partial(variant, key)
    jac_fwd, jac_rev = jax.jacfwd(f)(x), jax.jacrev(f)(x)
    np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-5, atol=1e-6)
    y, lin = jax.linearize(f, x)
    np.testing.assert_allclose(lin(x), jax.jvp(f, (x,), (x,))[1], rtol=1e-5, atol=1e-6)


def _custom_vjp_dropout(key, x, rate, policy):
    """The reverse-mode core as a plain custom_vjp of dropout_fwd / dropout_bwd: the memory reference."""

    @jax.custom_vjp
    def f(x):
        return jdrop.dropout_fwd(key, x, rate, residual=policy)[0]

    f.defvjp(lambda x: jdrop.dropout_fwd(key, x, rate, residual=policy), lambda res, dy: (jdrop.dropout_bwd(res, dy),))
    return f(x)


@pytest.mark.parametrize("policy", ["key", "bits", "mask"])
def test_reverse_mode_keeps_the_residual_policies_memory(policy):
    # Measured when forward mode was added (1024 x 1024 float32, value_and_grad, XLA:CPU): key 1048720
    # bytes (the backward pass's staged byte mask, a temporary), bits 131072, mask 0, both before and after.
    x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)

    def temp(dropout):
        step = jax.jit(jax.value_and_grad(lambda x, k: (dropout(k, x, 0.5, policy) ** 2).sum()))
        return step.lower(x, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes

    ours = temp(lambda k, x, rate, policy: jdrop.dropout(k, x, rate, residual=policy))
    assert ours == temp(_custom_vjp_dropout)
    assert ours <= {"key": 1024 * 1024 + 4096, "bits": 1024 * 1024 // 8 + 4096, "mask": 4096}[policy]


def test_keys_are_rebuilt_with_their_own_implementation():
    """Key data is re-wrapped with the key's own implementation, never the global default.

    The one exception is the raw legacy key (``jax.random.PRNGKey``), which IS a key of the default implementation.
    Behaviour under each default is checked in its own interpreter (above) for the raw key; this covers typed keys
    of every implementation under every default, where a missing ``impl=`` would silently draw another mask.
    """
    import ast

    offenders = []
    for path in sorted((ROOT / "jdrop").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr == "wrap_key_data" and not any(k.arg == "impl" for k in node.keywords):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == ["jdrop/_validation.py:" + str(_raw_key_wrap_line())], offenders


def _raw_key_wrap_line() -> int:
    lines = (ROOT / "jdrop" / "_validation.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if "return jax.random.wrap_key_data(key)" in line)
