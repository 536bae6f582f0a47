"""jdrop.dot_product_attention under every mode of autodiff, forward mode included, against autodiff of a reference.

The attention is a ``custom_jvp`` whose tangent is a blockwise forward-mode FlashAttention
(``jdrop.attention._kernel.tangent``) and whose reverse mode is the hand-written FlashAttention-2 backward
(``jdrop._linear.linear_map``). Each mode (jvp, linearize, jacfwd, jacrev, hessian, grad of grad, jacrev and jacfwd
of jacfwd, vmap of grad and of jvp, all under jit) is compared with the same mode of flax's
``nn.dot_product_attention`` for the same ``dropout_rng`` (whose mask jdrop draws exactly) or, for the masks that
are not flax's, of a dense naive attention with jdrop's mask. Float64 (``x64``): both sum a few dozen terms per
entry, so they agree to ``1e-10`` relative to the largest entry (flax's keep probability ``1 - rate`` and jdrop's
realised one differ by under ``2**-52``). Float32: jdrop's error against the float64 reference is within 4x flax's
own float32 error (a different summation order may double the rounding error), floored at 8 float32 ulps.
Reverse mode compiles to the program of a ``custom_vjp`` around the same forward and backward passes (same
temporaries and instruction count), so the training step's memory is what it was.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jdrop
from jdrop.attention import _api, _dropout_mask, _kernel, _pallas

RNG = jax.random.key(5)
BLOCKS = {"block_q": 4, "block_k": 4}  # several tiles, padded ones included, on these short lengths
RATE = 0.3


def _inputs(dtype, *, q_length=5, k_length=5, heads=2, kv_heads=1, depth=2, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_length, heads, depth))
    k, v = rng.standard_normal((2, batch, k_length, kv_heads, depth))
    bias = rng.standard_normal((heads, q_length, k_length))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, bias))


def _padding_mask(q_length=5, k_length=5):
    mask = np.ones((1, 1, q_length, k_length), bool)
    mask[..., :, 3:] = False  # keys past a padding length
    mask[..., 2, :] = False  # a fully masked row: uniform, as in flax
    return jnp.asarray(mask)


CASES = {
    # causal (tiles above the diagonal skipped), grouped queries, one mask per (row, head); no bias
    "causal-gqa-per-element": ({"is_causal": True, "broadcast_dropout": False}, False, False),
    # a differentiated per-head bias, a padding mask with a fully masked row, one mask for all rows and heads
    "bias-mask-broadcast": ({"broadcast_dropout": True}, True, True),
}


def _functions(case):
    """``(jdrop's, flax's)`` attention of ``(q, k, v, bias)`` for a case (flax with the kv heads repeated)."""
    options, with_bias, with_mask = CASES[case]
    mask = _padding_mask() if with_mask else None
    drop = {"dropout_rng": RNG, "dropout_rate": RATE, "broadcast_dropout": options["broadcast_dropout"]}

    def ours(q, k, v, bias):
        return jdrop.dot_product_attention(q, k, v, bias=bias if with_bias else None, mask=mask,
                                           is_causal=options.get("is_causal", False), **drop, **BLOCKS)

    def flax(q, k, v, bias):
        group = q.shape[-2] // k.shape[-2]
        k, v = jnp.repeat(k, group, axis=-2), jnp.repeat(v, group, axis=-2)
        full = mask
        if options.get("is_causal"):
            full = nn.make_causal_mask(jnp.ones(q.shape[:2]))
        return nn.dot_product_attention(q, k, v, bias=bias if with_bias else None, mask=full, deterministic=False,
                                        **drop)

    return ours, flax


def _scalar(f):
    return lambda *args: jnp.sum(jnp.sin(f(*args)))


def _modes(args, tangents):
    """Every mode of autodiff, each a function of the attention ``f(q, k, v, bias)``."""
    q, k, v, bias = args
    every = (0, 1, 2, 3)
    qs = jnp.concatenate([q, 0.5 * q[:, ::-1]], axis=0)

    def in_q(f):  # the attention of q alone, for the nested modes
        return lambda q: _scalar(f)(q, k, v, bias)

    def batched(f):  # a batch of queries, vmapped
        return lambda qs: jax.vmap(lambda q: f(q[None], k, v, bias)[0])(qs)

    return {
        "jvp": lambda f: jax.jvp(f, args, tangents),
        "jvp_one_input": lambda f: jax.jvp(lambda v: f(q, k, v, bias), (v,), (tangents[2],)),
        "linearize": lambda f: jax.linearize(f, *args)[1](*tangents),
        "jacfwd": lambda f: jax.jacfwd(f, argnums=every)(*args),
        "jacrev": lambda f: jax.jacrev(f, argnums=every)(*args),
        "hessian": lambda f: jax.hessian(_scalar(f), argnums=every)(*args),
        "grad_of_grad": lambda f: jax.grad(lambda q: jnp.sum(jax.grad(_scalar(f), argnums=every)(q, k, v, bias)[1]
                                                             ** 2))(q),
        "jacfwd_of_jacfwd": lambda f: jax.jacfwd(jax.jacfwd(in_q(f)))(q),
        "jacrev_of_jacfwd": lambda f: jax.jacrev(jax.jacfwd(in_q(f)))(q),
        "vmap_grad": lambda f: jax.vmap(jax.grad(lambda q: _scalar(f)(q[None], k, v, bias)))(qs),
        "vmap_jvp": lambda f: jax.vmap(lambda q, t: jax.jvp(lambda q: f(q[None], k, v, bias), (q,), (t,))[1])(
            qs, jnp.cos(qs)),
        "jvp_of_vmap": lambda f: jax.jvp(batched(f), (qs,), (jnp.cos(qs),)),
    }


MODE_NAMES = ["grad_of_grad", "hessian", "jacfwd", "jacfwd_of_jacfwd", "jacrev", "jacrev_of_jacfwd", "jvp",
              "jvp_of_vmap", "jvp_one_input", "linearize", "vmap_grad", "vmap_jvp"]


def _assert_close(actual, expected, tol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        np.testing.assert_allclose(a, e, rtol=0, atol=tol * max(1.0, float(np.max(np.abs(e)))))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_every_mode_equals_autodiff_of_flax_in_float64(case, mode, x64):
    args = _inputs(jnp.float64)
    tangents = _inputs(jnp.float64, seed=1)
    ours, flax = _functions(case)
    run = _modes(args, tangents)[mode]
    assert sorted(_modes(args, tangents)) == MODE_NAMES
    _assert_close(jax.jit(lambda: run(ours))(), jax.jit(lambda: run(flax))(), 1e-10)


def _error(actual, reference):
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(r))))
               for a, r in zip(jax.tree.leaves(actual), jax.tree.leaves(reference), strict=True))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["jvp", "jacfwd", "hessian"])
def test_float32_forward_mode_is_as_accurate_as_flax(case, mode):
    args32, tangents32 = _inputs(jnp.float32), _inputs(jnp.float32, seed=1)
    ours, flax = _functions(case)
    got = jax.jit(lambda: _modes(args32, tangents32)[mode](ours))()
    flax32 = jax.jit(lambda: _modes(args32, tangents32)[mode](flax))()
    with jax.enable_x64(True):
        wide = [tuple(jnp.asarray(np.asarray(x), jnp.float64) for x in xs) for xs in (args32, tangents32)]
        reference = jax.tree.map(np.asarray, jax.jit(lambda: _modes(*wide)[mode](flax))())
    scale = max(float(np.max(np.abs(r))) for r in jax.tree.leaves(reference))
    bound = 4 * max(_error(flax32, reference), 8 * np.finfo(np.float32).eps * scale)
    assert _error(got, reference) <= bound, (_error(got, reference), bound)


# ------------------------------------------------------------------------------------- masks that are not flax's


def _drawn_mask(mode, q, k):
    """jdrop's own per-head mask for ``mode``: with ``value`` the identity over the keys, each output row is that row's
    dropped probabilities (all positive before dropout: no bias or mask), so its zeros are the dropped weights."""
    k_length, kv_heads = k.shape[1], k.shape[2]
    eye = jnp.broadcast_to(jnp.eye(k_length, dtype=q.dtype)[None, :, None, :], (q.shape[0], k_length, kv_heads,
                                                                                  k_length))
    rows = jdrop.dot_product_attention(q, k, eye, dropout_rng=RNG, dropout_rate=RATE, broadcast_dropout=False,
                                       dropout_mask=mode, **BLOCKS)
    return np.asarray(rows).transpose(0, 2, 1, 3) != 0  # (B, Hq, Tq, Tk)


def _naive(q, k, v, keep, factor):
    """Attention by its formula, ``(softmax(q k^T / sqrt(D)) * keep * factor) v``, with the kv heads repeated."""
    group = q.shape[-2] // k.shape[-2]
    k, v = jnp.repeat(k, group, axis=-2), jnp.repeat(v, group, axis=-2)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights * keep * factor, v)


@pytest.mark.parametrize("mask_mode", ["fast16", "hash8"])
def test_forward_mode_with_a_cheaper_mask_equals_the_naive_attention_with_that_mask(mask_mode, x64):
    # Tiles of whole groups of rows: the fast masks group 32 rows.
    q, k, v, _ = _inputs(jnp.float64, q_length=40, k_length=9)
    keep = _drawn_mask(mask_mode, q, k)
    assert 0 < keep.mean() < 1
    factor = float(_dropout_mask.operands(RNG, RATE, jnp.float64, mask_mode)[2])

    def ours(q, k, v):
        return jdrop.dot_product_attention(q, k, v, dropout_rng=RNG, dropout_rate=RATE, broadcast_dropout=False,
                                           dropout_mask=mask_mode, **BLOCKS)

    def naive(q, k, v):
        return _naive(q, k, v, keep, factor)

    tangents = _inputs(jnp.float64, q_length=40, k_length=9, seed=1)[:3]
    for run in (lambda f: jax.jvp(f, (q, k, v), tangents),
                lambda f: jax.hessian(lambda v: _scalar(f)(q, k, v))(v),
                lambda f: jax.jacrev(jax.jacfwd(lambda rows: _scalar(f)(q.at[:, :5].set(rows), k, v)))(q[:, :5])):
        _assert_close(jax.jit(lambda run=run: run(ours))(), jax.jit(lambda run=run: run(naive))(), 1e-10)


# ------------------------------------------------------------------------------------- rates, dtypes, shapes


def test_traced_rate_forward_mode_compiles_once_rate_zero_is_no_dropout():
    q, k, v, _ = _inputs(jnp.float32)
    tq, tk, tv, _ = _inputs(jnp.float32, seed=1)

    @jax.jit
    def tangent(rate, q, k, v):
        return jax.jvp(lambda q, k, v: jdrop.dot_product_attention(q, k, v, dropout_rng=RNG, dropout_rate=rate,
                                                                   **BLOCKS), (q, k, v), (tq, tk, tv))[1]

    plain = jax.jvp(lambda q, k, v: jdrop.dot_product_attention(q, k, v, **BLOCKS), (q, k, v), (tq, tk, tv))[1]
    # The same sums, fused differently with and without the factors: a few float32 roundings of the largest value.
    np.testing.assert_allclose(tangent(jnp.float32(0.0), q, k, v), plain, rtol=0,
                               atol=8 * np.finfo(np.float32).eps * float(np.max(np.abs(plain))))
    dropped = tangent(jnp.float32(RATE), q, k, v)
    static = jax.jvp(lambda q, k, v: jdrop.dot_product_attention(q, k, v, dropout_rng=RNG, dropout_rate=RATE,
                                                                 **BLOCKS), (q, k, v), (tq, tk, tv))[1]
    np.testing.assert_allclose(dropped, static, rtol=0, atol=8 * np.finfo(np.float32).eps
                               * float(np.max(np.abs(static))))
    assert tangent._cache_size() == 1
    np.testing.assert_array_equal(tangent(jnp.float32(1.0), q, k, v), np.zeros_like(plain))  # everything dropped


def test_low_precision_tangents_have_the_input_dtype():
    args = _inputs(jnp.bfloat16)[:3]
    out, tangent = jax.jvp(partial(jdrop.dot_product_attention, dropout_rng=RNG, dropout_rate=RATE, **BLOCKS), args,
                           args)
    assert out.dtype == tangent.dtype == jnp.bfloat16
    reference = jax.jvp(partial(jdrop.dot_product_attention, dropout_rng=RNG, dropout_rate=RATE, **BLOCKS),
                        *[tuple(x.astype(jnp.float32) for x in args)] * 2)[1]
    # bfloat16 inputs, float32 accumulation: a few bfloat16 roundings (eps 2**-7) of the largest value.
    np.testing.assert_allclose(tangent.astype(np.float32), reference, atol=4 * 2**-7 * float(np.max(np.abs(reference))))


def test_empty_and_complex_inputs_have_forward_mode_derivatives_equal_flax(x64):
    q, k, v = (jnp.zeros((0, 5, 2, 3)),) * 3
    out, tangent = jax.jvp(jdrop.dot_product_attention, (q, k, v), (q, k, v))
    assert tangent.shape == out.shape == (0, 5, 2, 3)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 4, 2, 3)) + 1j * rng.standard_normal((1, 4, 2, 3))) for _ in "qkv")
    options = {"dropout_rng": RNG, "dropout_rate": RATE, "deterministic": False}
    ours = jax.jvp(partial(jdrop.dot_product_attention, **options), (q, k, v), (v, q, k))
    theirs = jax.jvp(partial(nn.dot_product_attention, **options), (q, k, v), (v, q, k))
    _assert_close(ours, theirs, 1e-10)


# ------------------------------------------------------------------------------------- pallas kernels


@pytest.mark.parametrize("backend", _pallas.BACKENDS)
def test_pallas_forward_mode_equals_the_xla_path_and_draws_the_kernels_mask(backend):
    # Odd lengths (padded tiles), grouped queries, causal, per-head dropout, a differentiated bias: the kernels'
    # forward mode is the xla path's blockwise pass on the kernels' residuals, drawing the kernels' mask.
    q, k, v, bias = _inputs(jnp.float32, q_length=37, k_length=37, depth=8)
    tangents = _inputs(jnp.float32, q_length=37, k_length=37, depth=8, seed=1)
    options = {"dropout_rng": RNG, "dropout_rate": RATE, "broadcast_dropout": False, "is_causal": True}

    def pallas(q, k, v, bias):
        with _pallas.kernels_for(backend):
            return jdrop.dot_product_attention(q, k, v, bias=bias, implementation="pallas", **options)

    def xla(q, k, v, bias):
        return jdrop.dot_product_attention(q, k, v, bias=bias, block_q=8, block_k=16, **options)

    got = jax.jit(lambda: jax.jvp(pallas, (q, k, v, bias), tangents))()
    want = jax.jit(lambda: jax.jvp(xla, (q, k, v, bias), tangents))()
    np.testing.assert_array_equal(np.asarray(got[0]) == 0, np.asarray(want[0]) == 0)  # the same dropped weights
    # Both float32 with float32 accumulation over at most 37 keys: a few float32 roundings of the largest value.
    _assert_close(got, want, 64 * np.finfo(np.float32).eps)
    # Second derivatives: the residuals (output and rows' logsumexp) move with q, k and the bias.
    def second(f):
        inner = jax.grad(lambda q, k, bias: _scalar(f)(q, k, v, bias), argnums=(0, 1, 2))
        return jax.grad(lambda q, k, bias: sum(jnp.sum(g**2) for g in inner(q, k, bias)), argnums=(0, 1, 2))(q, k, bias)

    _assert_close(jax.jit(lambda: second(pallas))(), jax.jit(lambda: second(xla))(), 64 * np.finfo(np.float32).eps)


# ------------------------------------------------------------------------------------- reverse mode unchanged


def _vjp_attention():
    """The xla path's attention as a ``custom_vjp`` around the same forward and backward passes."""

    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attention(cfg, ops):
        return _kernel.forward(cfg, ops)[0]

    def fwd(cfg, ops):
        out, logsumexp = _kernel.forward(cfg, ops)
        return out, (ops, out, logsumexp)

    def bwd(cfg, residuals, d_out):
        ops, out, logsumexp = residuals
        grads = _kernel.backward(cfg, ops, d_out, logsumexp, _kernel.delta(out, d_out))
        return (_kernel.Operands(*grads, None, None),)

    attention.defvjp(fwd, bwd)
    return attention


def _compiled_step(length, options, argnums):
    q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    bias = jax.ShapeDtypeStruct((2, length, length), jnp.float32)

    def loss(q, k, v, bias):
        return jnp.sum(jdrop.dot_product_attention(q, k, v, bias=bias, dropout_rng=RNG, dropout_rate=0.1, **options))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(q, q, q, bias).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("options, argnums", [({}, (0, 1, 2, 3)),
                                              ({"is_causal": True, "broadcast_dropout": False}, (0, 1, 2, 3)),
                                              ({"is_causal": True}, (0, 1, 2))])  # a bias held constant
def test_training_step_compiles_to_the_custom_vjp_program(options, argnums, monkeypatch):
    # At T=2048 (a 16 MiB bias): the same temporaries (bytes) as a custom_vjp whose backward is the FlashAttention-2
    # backward, so reverse mode keeps the same residuals (and a bias held constant gets no bias-sized gradient
    # accumulator).
    new = _compiled_step(2048, options, argnums)
    monkeypatch.setattr(_api, "attention", _vjp_attention())
    assert new == _compiled_step(2048, options, argnums)


def test_reverse_mode_runs_the_hand_written_backward(monkeypatch):
    calls = {"backward": 0, "tangent": 0}

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(_kernel, "backward", counting("backward", _kernel.backward))
    monkeypatch.setattr(_kernel, "tangent", counting("tangent", _kernel.tangent))
    q, k, v, _ = _inputs(jnp.float32)

    def attend(q):
        return jdrop.dot_product_attention(q, k, v, **BLOCKS)

    jax.make_jaxpr(jax.grad(lambda q: jnp.sum(attend(q))))(q)
    assert calls["backward"] >= 1
    calls.update(backward=0, tangent=0)
    jax.make_jaxpr(lambda q: jax.jvp(attend, (q,), (q,)))(q)
    assert calls["tangent"] >= 1


# ------------------------------------------------------------------------------------- shard_map: reverse mode only


def test_inside_shard_map_forward_mode_raises_and_reverse_mode_works():
    # A one-device mesh: the operands still vary along its axis, which is what decides (a type, not a size).
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    q, k, v, _ = _inputs(jnp.float32, q_length=8, k_length=8)
    options = {"dropout_rng": RNG, "dropout_rate": RATE, **BLOCKS}
    ring = partial(jdrop.sequence_parallel_attention, mesh=mesh, **options)
    sharded = jax.shard_map(partial(jdrop.dot_product_attention, **options), mesh=mesh, in_specs=P("seq"),
                            out_specs=P("seq"))
    single = partial(jdrop.dot_product_attention, **options)
    for fn, where in ((ring, "axis_name='seq'"), (sharded, "inside jax.shard_map")):
        with pytest.raises(TypeError, match=f"{where}.*reverse mode only"):
            jax.jvp(fn, (q, k, v), (q, k, v))
        grads = jax.grad(lambda q, k, v, fn=fn: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(single(q, k, v))), argnums=(0, 1, 2))(q, k, v)
        _assert_close(grads, want, 64 * np.finfo(np.float32).eps)
