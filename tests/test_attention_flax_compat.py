"""jdrop.dot_product_attention as flax's attention modules' ``attention_fn``: the cases of flax's own attention tests.

Ported from ``tests/linen/linen_attention_test.py``, ``tests/nnx/nn/attention_test.py`` and the
attention case of ``tests/nnx/spmd_test.py`` of flax (which ``tests/test_flax_suites.py`` runs as they
are, with jdrop as the default): each module-level case here builds the module twice, with flax's
attention and with jdrop's, and compares outputs, gradients and sown weights, instead of only the
shapes flax's tests check. Then the semantics flax defines that a blockwise kernel must reproduce:
the sown weights' dtype and precision, complex inputs, empty inputs, second derivatives of causal
attention, and argument errors. Float32 results agree to float rounding: tolerance ``2e-5`` relative
to ``max(1, max |flax|)`` (a few float32 roundings of sums over at most a few dozen terms); float64
ones to ``1e-10``.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils, nnx
from flax.core import pop
from jax import lax

import jdrop
from jdrop import masks

RNG = jax.random.key(11)
BLOCKS = {"block_q": 4, "block_k": 4}  # small tiles: the short sequences of flax's tests span several


def _jdrop(**options):
    return partial(jdrop.dot_product_attention, **{**BLOCKS, **options})


def _assert_close(actual, expected, tol=2e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
        wide = np.complex128 if np.iscomplexobj(e) else np.float64
        a, e = a.astype(wide), e.astype(wide)
        np.testing.assert_allclose(a, e, rtol=0, atol=tol * max(1.0, float(np.max(np.abs(e), initial=0.0))))


def _linen_pair(x, kv=None, *, method_kwargs=None, **module_kwargs):
    """Outputs and parameter gradients of linen's MultiHeadDotProductAttention with flax's and jdrop's attention."""
    results = []
    for fn in (nn.dot_product_attention, _jdrop()):
        module = nn.MultiHeadDotProductAttention(attention_fn=fn, **module_kwargs)
        args = (x,) if kv is None else (x, kv)
        variables = module.init({"params": jax.random.key(0), "dropout": RNG}, *args, **(method_kwargs or {}))

        def loss(params, module=module, variables=variables, args=args):
            out = module.apply({**variables, "params": params}, *args, rngs={"dropout": RNG}, **(method_kwargs or {}))
            return jnp.sum(jnp.sin(out).real), out  # real part: complex outputs too

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        results.append((out, grads))
    return results


# ------------------------------------------------------------------------------------- linen modules


@pytest.mark.parametrize("broadcast_dropout", [True, False])
def test_linen_self_attention_with_dropout_equals_flax(broadcast_dropout):
    x = jax.random.normal(jax.random.key(1), (4, 6, 5))
    ours, flax = _linen_pair(x, num_heads=8, qkv_features=16, dropout_rate=0.3, deterministic=False,
                             broadcast_dropout=broadcast_dropout)
    _assert_close(ours, flax)


def test_linen_encoder_decoder_attention_with_two_batch_dims_and_kv_args_equals_flax():
    q = jax.random.normal(jax.random.key(1), (4, 2, 3, 5))
    kv = jax.random.normal(jax.random.key(2), (4, 2, 7, 5))
    ours, flax = _linen_pair(q, kv, num_heads=8, qkv_features=16, deterministic=True)
    _assert_close(ours, flax)
    kvv = jax.random.normal(jax.random.key(3), (4, 2, 7, 5))  # separate keys and values (flax's kv args)
    results = []
    for fn in (nn.dot_product_attention, _jdrop()):
        module = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=8, deterministic=True, attention_fn=fn)
        variables = module.init(jax.random.key(0), q, kv, kvv)
        results.append(module.apply(variables, q, kv, kvv))
    _assert_close(*results)


def test_linen_causal_and_padding_masks_equal_flax():
    x = jax.random.normal(jax.random.key(1), (2, 9, 6))
    mask = nn.combine_masks(nn.make_causal_mask(jnp.ones((2, 9))),
                            nn.make_attention_mask(jnp.arange(9)[None] < jnp.array([[9], [5]]), jnp.ones((2, 9))))
    ours, flax = _linen_pair(x, num_heads=2, qkv_features=8, dropout_rate=0.2, deterministic=False,
                             method_kwargs={"mask": mask})
    _assert_close(ours, flax)


def test_linen_autoregressive_receptive_field_is_causal():
    x = jax.random.normal(jax.random.key(2), (1, 10, 1))
    mask = nn.make_causal_mask(jnp.ones((1, 10)))
    module = nn.MultiHeadDotProductAttention(num_heads=1, kernel_init=nn.initializers.ones, deterministic=False,
                                             attention_fn=_jdrop())
    variables = module.init(jax.random.key(1), x)
    grad = jax.jit(jax.grad(lambda x, pos: module.apply(variables, x, mask=mask)[0, pos].sum()), static_argnums=1)
    for pos in range(10):
        reachable = np.abs(np.asarray(grad(x, pos))[0, :, 0]) > 1e-5
        np.testing.assert_array_equal(reachable, np.arange(10) <= pos)


@pytest.mark.parametrize("spatial_shape, attn_dims", [((5,), (1,)), ((6, 5), (2,))])
def test_linen_decoding_token_by_token_equals_the_causal_pass(spatial_shape, attn_dims):
    x = jax.random.normal(jax.random.key(1), (2, *spatial_shape, 12))
    module = nn.MultiHeadDotProductAttention(num_heads=3, qkv_features=12, precision=lax.Precision.HIGHEST,
                                             deterministic=False, decode=False, attention_fn=_jdrop())
    decoder = module.clone(decode=True)
    variables = decoder.init(jax.random.key(2), x)
    cache, params = pop(variables, "params")
    mask = nn.make_causal_mask(jnp.ones((2, *spatial_shape)))
    full = jax.jit(lambda x, m: module.apply(variables, x, mask=m))(x, mask)

    def step(cache, token):
        out, cache = decoder.apply({"params": params, **cache}, token, mutable=["cache"])
        return cache, out

    _, decoded = jax_utils.scan_in_dim(step, cache, x, axis=attn_dims, keepdims=True)
    _assert_close(decoded, full)


@pytest.mark.parametrize("force_fp32, sown_dtype", [(True, jnp.float32), (False, jnp.bfloat16)])
def test_linen_sown_weights_dtype_and_values_equal_flax(force_fp32, sown_dtype):
    x = jax.random.uniform(jax.random.key(1), (2, 4))
    sown = []
    for fn in (nn.dot_product_attention, _jdrop()):
        module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, force_fp32_for_softmax=force_fp32,
                                                 deterministic=False, dtype=jnp.bfloat16, attention_fn=fn,
                                                 bias_init=nn.initializers.uniform())
        variables = module.init({"params": jax.random.key(0), "dropout": RNG}, x)
        _, state = module.apply(variables, x, mutable=["intermediates"], sow_weights=True)
        sown.append(state["intermediates"]["attention_weights"][0])
    assert sown[0].dtype == sown[1].dtype == sown_dtype
    _assert_close(sown[1].astype(jnp.float32), sown[0].astype(jnp.float32), tol=1e-2)  # bfloat16 logits in flax


def test_sown_weights_product_uses_precision():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 4)) for i in range(3))

    class Sow(nn.Module):
        @nn.compact
        def __call__(self, q, k, v):
            return _jdrop(precision=lax.Precision.HIGHEST)(q, k, v, module=self)

    jaxpr = jax.make_jaxpr(lambda q, k, v: Sow().apply({}, q, k, v, mutable=["intermediates"]))(q, k, v)
    precisions = [eqn.params["precision"] for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"]
    assert len(precisions) >= 3  # the sown weights' product and the kernel's two
    assert all(p == (lax.Precision.HIGHEST, lax.Precision.HIGHEST) for p in precisions), precisions


def test_linen_complex_inputs_infer_complex_dtype_and_equal_flax(x64):
    x = jax.random.normal(jax.random.key(1), (4, 6, 5)) + 1j * jax.random.normal(jax.random.key(2), (4, 6, 5))
    ours, flax = _linen_pair(x.astype(jnp.complex64), num_heads=8, qkv_features=16, deterministic=True)
    assert ours[0].dtype == flax[0].dtype == jnp.complex64
    _assert_close(ours[0], flax[0], tol=1e-4)  # complex sums can cancel: a larger multiple of the roundings
    # Gradients in complex128 (in complex64 a small leaf's cancellations hide the comparison in rounding).
    ours, flax = _linen_pair(x, num_heads=8, qkv_features=16, deterministic=True, param_dtype=jnp.float64)
    assert ours[0].dtype == jnp.complex128
    _assert_close(ours, flax, tol=1e-10)


def test_linen_attention_aliases_take_jdrop():
    x = jax.random.normal(jax.random.key(1), (2, 4, 6))
    outs = []
    for cls in (nn.SelfAttention, nn.MultiHeadAttention):
        module = cls(num_heads=2, qkv_features=4, deterministic=True, attention_fn=_jdrop())
        reference = cls(num_heads=2, qkv_features=4, deterministic=True)
        variables = reference.init(jax.random.key(0), x)
        outs.append((module.apply(variables, x), reference.apply(variables, x)))
    for ours, flax in outs:
        _assert_close(ours, flax)


def test_autoregressive_decode_with_x64(x64):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4)))
    for cls in ("linen", "nnx"):
        if cls == "linen":
            module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, decode=True, attention_fn=_jdrop())
            variables = module.init(jax.random.key(0), x, x, x)
            outs = []
            for t in range(4):
                out, mutated = module.apply(variables, x[:, t:t + 1], mutable=["cache"])
                variables = {**variables, **mutated}
                outs.append(out)
        else:
            module = nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=4, decode=True,
                                            attention_fn=_jdrop(), rngs=nnx.Rngs(0))
            module.init_cache((1, 4, 4), dtype=jnp.float64)
            outs = [module(x[:, t:t + 1], deterministic=True) for t in range(4)]
        assert all(o.dtype == jnp.float64 and o.shape == (1, 1, 4) for o in outs)


# ------------------------------------------------------------------------------------- nnx modules


def _nnx_pair(x, call_kwargs=None, **module_kwargs):
    results = []
    for fn in (nnx.dot_product_attention, _jdrop()):
        module = nnx.MultiHeadAttention(attention_fn=fn, rngs=nnx.Rngs(0), **module_kwargs)
        results.append(module(x, rngs=nnx.Rngs(dropout=1), **(call_kwargs or {})))
    return results


@pytest.mark.parametrize("is_causal", [False, True])
def test_nnx_grouped_query_attention_with_dropout_equals_flax(is_causal):
    x = jax.random.normal(jax.random.key(1), (2, 10, 16))
    ours, flax = _nnx_pair(x, call_kwargs={"is_causal": is_causal}, num_heads=4, in_features=16, qkv_features=16,
                           num_kv_heads=2, dropout_rate=0.25, decode=False, deterministic=False)
    _assert_close(ours, flax)


def test_nnx_sown_weights_equal_flax():
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    sown = []
    for fn in (nnx.dot_product_attention, _jdrop()):
        module = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, attention_fn=fn, decode=False,
                                        deterministic=True, rngs=nnx.Rngs(0))
        _, state = nnx.capture(lambda m: m(x, sow_weights=True), nnx.Intermediate)(module)
        sown.append(jax.tree.leaves(state))
    _assert_close(sown[1], sown[0])


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("kv_length", [2, 4])
def test_nnx_is_causal_with_padding_mask_equals_the_combined_mask(padding, kv_length):
    q = jax.random.normal(jax.random.key(0), (1, 1, 2, 2, 4))
    k, v = (jax.random.normal(jax.random.key(i), (1, 1, kv_length, 2, 4)) for i in (1, 2))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((2, kv_length), bool)), (1, 1, 2, 2, kv_length))
    pad = jnp.ones((1, 1, 1, 2, kv_length), bool).at[..., -2:].set(False) if padding else None
    combined = nnx.combine_masks(pad, causal)
    _assert_close(_jdrop(is_causal=True)(q, k, v, mask=pad), nnx.dot_product_attention(q, k, v, mask=combined))


def test_nnx_decoding_with_grouped_kv_cache_equals_the_causal_pass():
    x = jax.random.normal(jax.random.key(1), (1, 6, 16))
    module = nnx.MultiHeadAttention(num_heads=4, in_features=16, qkv_features=16, num_kv_heads=2, decode=False,
                                    deterministic=True, attention_fn=_jdrop(), rngs=nnx.Rngs(0))
    full = module(x, mask=nnx.make_causal_mask(jnp.ones((1, 6))))
    module.init_cache((1, 6, 16))
    decoded = jnp.concatenate([module(x[:, t:t + 1], decode=True) for t in range(6)], axis=1)
    _assert_close(decoded, full)


# ------------------------------------------------------------------------------------- flax's semantics


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
def test_complex_inputs_follow_flax_formula_with_gradients(dtype, x64):
    def complex_input(seed, shape):
        a, b = jax.random.normal(jax.random.key(seed), (2, *shape), jnp.float64)
        return (a + 1j * b).astype(dtype)

    q, k, v = complex_input(0, (2, 5, 4, 3)), complex_input(1, (2, 7, 2, 3)), complex_input(2, (2, 7, 2, 3))
    mask = jnp.arange(7)[None, None, None, :] < jnp.array([7, 4])[:, None, None, None]

    def flax_fn(q, k, v, mask):  # flax.linen's function takes equal heads: the repeated key/value heads
        return nn.dot_product_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask=mask)

    def value_and_grads(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask=mask), q, k, v)
        return out, vjp(jnp.conj(out))

    ours, flax = value_and_grads(_jdrop()), value_and_grads(flax_fn)
    assert ours[0].dtype == dtype
    _assert_close(ours, flax, tol=1e-4 if dtype == jnp.complex64 else 1e-10)


def test_complex_dropout_draws_flax_mask():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 2, 4)).astype(jnp.complex64) * (1 + 0.5j)
               for i in range(3))
    for broadcast in (True, False):
        options = {"dropout_rng": RNG, "dropout_rate": 0.4, "broadcast_dropout": broadcast}
        ours, flax = _jdrop(**options)(q, k, v), nn.dot_product_attention(q, k, v, **options)
        _assert_close(ours, flax, tol=1e-4)


def test_complex_inputs_are_refused_by_pallas_and_the_ring_with_the_reason():
    q = jnp.ones((1, 4, 1, 8), jnp.complex64)
    with pytest.raises(ValueError, match="implementation='pallas' takes float16, bfloat16 and float32"):
        jdrop.dot_product_attention(q, q, q, implementation="pallas")


@pytest.mark.parametrize("q_shape, kv_shape", [((0, 5, 2, 4), (0, 5, 2, 4)), ((2, 0, 2, 4), (2, 5, 2, 4)),
                                               ((2, 5, 2, 4), (2, 0, 2, 4)), ((2, 5, 0, 4), (2, 5, 0, 4))])
def test_empty_inputs_give_flax_output_and_gradients(q_shape, kv_shape):
    q, k, v = jnp.ones(q_shape), jnp.ones(kv_shape), jnp.ones(kv_shape)
    options = {"dropout_rng": RNG, "dropout_rate": 0.5}
    ours = jax.jit(_jdrop(**options))(q, k, v)
    _assert_close(ours, nn.dot_product_attention(q, k, v, **options))
    grads = jax.grad(lambda q, k, v: jnp.sum(_jdrop(**options)(q, k, v)), argnums=(0, 1, 2))(q, k, v)
    _assert_close(grads, jax.tree.map(jnp.zeros_like, (q, k, v)))


@pytest.mark.parametrize("dropout", [False, True])
def test_second_derivatives_of_causal_attention_equal_flax(dropout, x64):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 11, 2, 4), jnp.float64) for i in range(3))
    rate = 0.3 if dropout else 0.0
    options = {"dropout_rng": RNG, "dropout_rate": rate} if dropout else {}
    causal = nn.make_causal_mask(jnp.ones((2, 11)))
    # flax's float64 formula with flax's own mask (under x64 a Python-float keep probability makes bernoulli draw
    # float64 uniforms, and jdrop draws the same) and jdrop's realised keep probability (2**-52 steps).
    keep_mask = jax.random.bernoulli(RNG, 1 - rate, (1, 1, 11, 11))
    keep = float(masks.realised_keep(masks.keep_threshold(jnp.float64(1 - rate))))

    def reference(q, k, v):
        weights = nn.dot_product_attention_weights(q, k, mask=causal)
        return jnp.einsum("...hqk,...khd->...qhd", weights * keep_mask / keep if dropout else weights, v)

    def second(fn):
        inner = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))
        return jax.grad(lambda q, k, v: sum(jnp.sum(g ** 2) for g in inner(q, k, v)), argnums=(0, 1, 2))(q, k, v)

    ours = jax.jit(lambda: second(_jdrop(is_causal=True, **options)))()
    _assert_close(ours, second(reference), tol=1e-10)


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (loops, conditionals, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_causal_first_order_step_still_skips_the_tiles_above_the_diagonal():
    q = jax.random.normal(jax.random.key(0), (1, 16, 1, 4))
    step = jax.make_jaxpr(jax.grad(lambda q: jnp.sum(_jdrop(is_causal=True)(q, q, q))))(q)
    conds = [eqn for eqn in _equations(step.jaxpr) if eqn.primitive.name == "cond"]
    assert len(conds) >= 2  # the forward's and the backward's tile steps
    for eqn in conds:  # one branch computes the tile; the other passes the carry through, computing nothing
        branches = eqn.params["branches"]
        assert any(not any(e.primitive.name == "dot_general" for e in _equations(b.jaxpr)) for b in branches)
        assert any(any(e.primitive.name == "dot_general" for e in _equations(b.jaxpr)) for b in branches)
    dense = jax.make_jaxpr(jax.grad(lambda q: jnp.sum(_jdrop()(q, q, q))))(q)
    assert not [eqn for eqn in _equations(dense.jaxpr) if eqn.primitive.name == "cond"]


@pytest.mark.parametrize("q_shape, k_shape, v_shape, match", [
    ((2, 16, 4, 8), (16, 4, 8), (16, 4, 8), "same rank"),
    ((2, 16, 4, 8), (3, 16, 4, 8), (3, 16, 4, 8), "batch dims"),
    ((2, 16, 4, 8), (2, 16, 4, 8), (2, 15, 4, 8), "lengths and heads must match"),
    ((2, 16, 4, 8), (2, 16, 4, 7), (2, 16, 4, 8), "depths must match"),
    ((1, 4, 5, 8), (1, 4, 2, 8), (1, 4, 2, 8), "must be a multiple"),
])
def test_invalid_shapes_raise_as_flax(q_shape, k_shape, v_shape, match):
    with pytest.raises(ValueError, match=match):
        jdrop.dot_product_attention(jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape), dropout_rate=0.1,
                                    dropout_rng=RNG)
