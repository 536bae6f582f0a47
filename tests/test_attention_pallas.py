"""Tests of the Pallas kernels of jdrop.dot_product_attention, on CPU.

Both backends' kernels (the Mosaic shell for TPU, the Triton shell for GPU) run under Pallas's ``interpret=True``
and are compared with the xla path: the dropout masks exactly (value = identity makes each output row the dropped
probabilities, so its zeros are the dropped entries), outputs and gradients to a tolerance derived from a float64
reference. Then the non-interpreted kernels are lowered for ``tpu`` and ``cuda`` over a matrix of shapes and dtypes,
so that a block shape, dtype or op that Pallas's Mosaic or Triton lowering refuses fails here.
"""

import re
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdrop
from jdrop import _pallas_attention as pallas_attention
from jdrop import attention as attention_module
from jdrop import masks
from jdrop._validation import check_rate

RNG = jax.random.key(7)
BACKENDS = pallas_attention.BACKENDS
XLA_BLOCKS = {"block_q": 8, "block_k": 16}


def _qkv(batch=2, q_length=37, k_length=45, heads=4, depth=8, kv_heads=None, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = rng.standard_normal((batch, q_length, heads, depth))
    k, v = rng.standard_normal((2, batch, k_length, kv_heads, depth))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _pallas(query, key, value, bias=None, mask=None, *, backend, dropout_rng=None, dropout_rate=0.0,
            broadcast_dropout=True, is_causal=False, dropout_mask="exact", interpret=True, block_q=None, block_k=None):
    """The Pallas path with the public function's argument handling (``(B, T, H, D)`` inputs)."""
    rate = check_rate(dropout_rate, name="dropout_rate")
    drop = None
    if not (isinstance(rate, float) and rate == 0.0):
        if dropout_mask == "exact":
            drop = attention_module._dropout_arguments(dropout_rng, rate, query.dtype)
        else:
            drop = (jax.random.key_data(dropout_rng), *pallas_attention.dropout_scalars(rate, dropout_mask))
    scaled = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    return pallas_attention.attention(scaled, key, value, bias, mask, drop, broadcast_dropout=broadcast_dropout,
                                      precision=None, is_causal=is_causal, block_q=block_q, block_k=block_k,
                                      dropout_mask=dropout_mask, backend=backend, interpret=interpret)


def _value_and_grads(fn, *args):
    """Output and gradients of a loss that weights every output element differently."""

    def loss(*args):
        out = fn(*args)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, grads


def _errors(actual, reference):
    """Per leaf, ``max |actual - reference| / max(1, max |reference|)`` in float64."""
    errors = []
    for a, r in zip(jax.tree.leaves(actual), jax.tree.leaves(reference)):
        a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
        errors.append(float(np.max(np.abs(a - r)) / max(1.0, float(np.max(np.abs(r))))))
    return np.asarray(errors)


# ------------------------------------------------------------------------------------- the mask, exactly


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_draw_flax_mask_exactly(backend):
    # value = identity: query t's output row is its dropped probabilities, so zeros = dropped entries.
    q_length, k_length, heads, kv_heads = 45, 33, 4, 2  # odd lengths, grouped queries
    q, k, _ = _qkv(batch=2, q_length=q_length, k_length=k_length, heads=heads, kv_heads=kv_heads)
    v = jnp.broadcast_to(jnp.eye(k_length)[None, :, None, :], (2, k_length, kv_heads, k_length))
    for broadcast in (False, True):
        options = {"dropout_rng": RNG, "dropout_rate": 0.5, "broadcast_dropout": broadcast}
        out = jax.jit(partial(_pallas, backend=backend, **options))(q, k, v)
        shape = (1, 1, q_length, k_length) if broadcast else (2, heads, q_length, k_length)
        keep = np.broadcast_to(jax.random.bernoulli(RNG, 0.5, shape), (2, heads, q_length, k_length))
        np.testing.assert_array_equal(np.asarray(out).transpose(0, 2, 1, 3) != 0, keep)


def test_wide_index_past_two_to_the_32_matches_uint64_arithmetic():
    rows = jnp.asarray([[0], [5], [2**20 + 7], [2**32 - 1]], jnp.uint32)
    cols = jnp.asarray([[0, 1, 2**12 + 2]], jnp.uint32)
    k_length = 2**12 + 3
    high, low = jax.jit(pallas_attention._wide_index, static_argnums=(2, 3))(rows, cols, k_length, True)
    expected = np.asarray(rows, np.uint64) * np.uint64(k_length) + np.asarray(cols, np.uint64)
    np.testing.assert_array_equal(np.asarray(high, np.uint64), expected >> np.uint64(32))
    np.testing.assert_array_equal(np.asarray(low, np.uint64), expected & np.uint64(0xFFFFFFFF))
    assert int(np.max(expected >> np.uint64(32))) > 0


def test_exact_keep_factors_are_jax_random_bernoulli_at_a_tile_of_the_whole_array():
    # Tile (rows 16..47, cols 128..255) of head 5 of a (B * H, 100, 300) mask, drawn by global index.
    key_data = jax.random.key_data(RNG)
    threshold = masks.keep_threshold(jnp.float32(0.7))
    factors = pallas_attention.keep_factors((key_data[0], key_data[1]), threshold, jnp.float32(2.0),
                                            jnp.uint32(5 * 100), 16, 32, 128, 128, k_length=300, wide=False,
                                            mode="exact")
    keep = jax.random.bernoulli(RNG, np.float32(0.7), (8, 100, 300))[5, 16:48, 128:256]
    np.testing.assert_array_equal(np.asarray(factors), np.where(keep, 2.0, 0.0))


def _fast_keep(mode, rate, heads, n_rows, n_cols, k_length=None):
    """The fast mask of ``(heads, n_rows, n_cols)`` drawn as one tile per head (bool), and its keep probability."""
    threshold, factor = pallas_attention.dropout_scalars(rate, mode)
    key_data = jax.random.key_data(RNG)
    k_length = n_cols if k_length is None else k_length
    head_row = (jnp.arange(heads, dtype=jnp.uint32) * np.uint32(n_rows))[:, None, None]

    @jax.jit
    def draw(threshold, factor):
        return pallas_attention.keep_factors((key_data[0], key_data[1]), threshold, factor, head_row, 0, n_rows, 0,
                                             n_cols, k_length=k_length, wide=False, mode=mode)

    factors = np.asarray(draw(threshold, factor))
    keep = float(pallas_attention.realised_keep(threshold, mode))
    np.testing.assert_array_equal(np.unique(factors), [0.0, np.float32(1 / keep)])  # scaled by the realised keep
    return factors != 0, keep


@pytest.mark.parametrize("mode", ["fast16", "fast8"])
def test_fast_mask_realised_rate_and_independence_within_groups(mode):
    bits, n = pallas_attention.mask_bits(mode), pallas_attention.group_size(mode)
    span = pallas_attention.group_rows(mode)
    rate = 0.3
    keep_mask, keep = _fast_keep(mode, rate, heads=4, n_rows=8 * span, n_cols=2048)
    assert keep == np.ceil((1 - rate) * 2**bits) / 2**bits  # the documented realised keep probability
    total = keep_mask.size
    # Rate: 5 binomial standard errors, 5 sqrt(p (1 - p) / N) (N = 2**20 elements: 2.2e-3, below fast8's
    # 3.1e-3 distance from 1 - rate, so the test tells the realised probability from the nominal one).
    assert abs(keep_mask.mean() - keep) <= 5 * np.sqrt(keep * (1 - keep) / total)
    # Group members (rows 8 apart in a block of `span` rows, one threefry call): every pair kept together with
    # probability p**2, within 5 sqrt(p**2 (1 - p**2) / groups).
    members = keep_mask.reshape(4, -1, n, pallas_attention.GROUP_SUBLANES, 2048)
    groups = total // n
    for a in range(n):
        for b in range(a + 1, n):
            both = (members[:, :, a] & members[:, :, b]).mean()
            assert abs(both - keep**2) <= 5 * np.sqrt(keep**2 * (1 - keep**2) / groups), (a, b)
    # Neighbours in a row belong to different groups (different counters).
    both = (keep_mask[..., :-1] & keep_mask[..., 1:]).mean()
    assert abs(both - keep**2) <= 5 * np.sqrt(keep**2 * (1 - keep**2) / keep_mask[..., 1:].size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_mask_kernels_draw_the_tile_free_mask(backend):
    # The kernels' fast mask (value = identity, per-head dropout, odd lengths) is keep_factors over each head's
    # whole (Tq, Tk) array in one tile: tiles of any size draw the same mask.
    q_length, k_length, heads = 70, 33, 2
    q, k, _ = _qkv(batch=1, q_length=q_length, k_length=k_length, heads=heads)
    v = jnp.broadcast_to(jnp.eye(k_length)[None, :, None, :], (1, k_length, heads, k_length))
    options = {"dropout_rng": RNG, "dropout_rate": 0.5, "broadcast_dropout": False, "dropout_mask": "fast8"}
    out = jax.jit(partial(_pallas, backend=backend, **options))(q, k, v)
    span = pallas_attention.group_rows("fast8")
    rows = -(-q_length // span) * span
    threshold, factor = pallas_attention.dropout_scalars(0.5, "fast8")
    key_data = jax.random.key_data(RNG)
    head_row = (jnp.arange(heads, dtype=jnp.uint32) * np.uint32(q_length))[:, None, None]
    factors = pallas_attention.keep_factors((key_data[0], key_data[1]), threshold, factor, head_row, 0, rows, 0,
                                            k_length, k_length=k_length, wide=False, mode="fast8")
    np.testing.assert_array_equal(np.asarray(out)[0].transpose(1, 0, 2) != 0, np.asarray(factors)[:, :q_length] != 0)


# ------------------------------------------------------------------------------------- against float64


def _naive(q, k, v, bias, allowed, keep, keep_probability):
    """Attention by its formula: softmax(q k^T / sqrt(D) + bias, masked) * keep / keep_probability, then v."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
    if bias is not None:
        logits = logits + bias
    if allowed is not None:
        logits = jnp.where(allowed, logits, np.finfo(np.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        weights = weights * keep / keep_probability
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


CASES = {
    # per-head dropout, causal (tiles above the diagonal skipped), grouped queries, odd lengths
    "causal-gqa-per-head": ({"q_length": 45, "k_length": 45, "kv_heads": 2},
                            {"is_causal": True, "broadcast_dropout": False}, False, False),
    # broadcast dropout, a per-head bias (differentiated), a padding mask with a fully masked row
    "bias-mask-broadcast": ({"q_length": 37, "k_length": 45}, {"broadcast_dropout": True}, True, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_float64_reference(backend, case):
    shapes, options, with_bias, with_mask = CASES[case]
    q, k, v = _qkv(**shapes)
    batch, q_length, heads = q.shape[:3]
    k_length = k.shape[1]
    rng = np.random.default_rng(3)
    bias = jnp.asarray(rng.standard_normal((heads, q_length, k_length)), jnp.float32) if with_bias else None
    mask = None
    if with_mask:
        lengths = np.asarray([k_length, 20])
        mask = (np.arange(k_length) < lengths[:, None])[:, None, None, :] & np.ones((q_length, 1), bool)
        mask[:, :, 3] = False  # a fully masked row: uniform, as in flax
        mask = jnp.asarray(mask)
    rate = 0.3
    options = {**options, "dropout_rng": RNG, "dropout_rate": rate}
    args = (q, k, v) if bias is None else (q, k, v, bias)

    def call(fn):
        def attend(q, k, v, bias=None):
            return fn(q, k, v, bias=bias, mask=mask, **options)
        return _value_and_grads(attend, *args)

    pallas = call(partial(_pallas, backend=backend))
    xla = call(partial(jdrop.dot_product_attention, **XLA_BLOCKS))
    shape = (1, 1, q_length, k_length) if options["broadcast_dropout"] else (batch, heads, q_length, k_length)
    keep = np.asarray(jax.random.bernoulli(RNG, np.float32(1 - rate), shape))
    keep_probability = float(masks.realised_keep(masks.keep_threshold(jnp.float32(1 - rate))))
    allowed = None if mask is None else np.asarray(mask)
    if options.get("is_causal"):
        allowed = np.tril(np.ones((q_length, k_length), bool))
    with jax.enable_x64(True):
        wide = [jnp.asarray(np.asarray(x), jnp.float64) for x in args]

        def naive(q, k, v, bias=None):
            return _naive(q, k, v, bias, allowed, keep, keep_probability)

        reference = _value_and_grads(naive, *wide)
        reference = jax.tree.map(np.asarray, reference)
    xla_error, pallas_error = _errors(xla, reference), _errors(pallas, reference)
    # The kernels round differently from the xla path (e.g. P * factors vs exp(S - L + log factors)), not worse:
    # within 4x the xla path's float32 error, floored at 1e-6 (a few ulps of the products' scale).
    np.testing.assert_array_less(pallas_error, 4 * np.maximum(xla_error, 1e-6))
    np.testing.assert_array_equal(np.asarray(pallas[0]) == 0, np.asarray(xla[0]) == 0)


# ------------------------------------------------------------------------------------- rates


@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_rate_compiles_once_rate_zero_is_no_dropout_rate_one_gives_zeros(backend):
    q, k, v = _qkv(q_length=21, k_length=19, heads=2)
    chex.clear_trace_counter()  # parametrized: the same function once per backend

    @jax.jit
    @chex.assert_max_traces(n=1)
    def attend(rate):
        return _value_and_grads(partial(_pallas, backend=backend, dropout_rng=RNG, dropout_rate=rate), q, k, v)

    plain = jax.jit(partial(_pallas, backend=backend))(q, k, v)
    np.testing.assert_allclose(attend(0.0)[0], plain, rtol=0, atol=1e-6)
    exact = jax.jit(partial(jdrop.dot_product_attention, dropout_rng=RNG, dropout_rate=0.3, **XLA_BLOCKS))(q, k, v)
    np.testing.assert_allclose(attend(0.3)[0], exact, rtol=0, atol=2e-6)
    out, grads = attend(1.0)
    np.testing.assert_array_equal(out, 0.0)
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)
    assert np.all(np.isnan(attend(1.5)[0]))


# ------------------------------------------------------------------------------------- lowering for the devices


LOWERING_CASES = {
    # name: (q_length, k_length, heads, kv_heads, options)
    "odd-lengths": (300, 257, 4, 4, {"dropout_rate": 0.1}),
    "causal-gqa-per-head": (256, 256, 4, 2, {"dropout_rate": 0.1, "is_causal": True, "broadcast_dropout": False}),
    "bias-mask": (200, 130, 2, 1, {"dropout_rate": 0.1, "bias": True, "mask": True}),
    "no-dropout": (128, 384, 2, 2, {}),
}


def _lowered(platform, dtype, depth, case, argnums=None):
    q_length, k_length, heads, kv_heads, options = LOWERING_CASES[case]
    options = dict(options)
    with_bias, with_mask = options.pop("bias", False), options.pop("mask", False)
    backend = "tpu" if platform == "tpu" else "gpu"
    args = [jax.ShapeDtypeStruct((2, q_length, heads, depth), dtype),
            jax.ShapeDtypeStruct((2, k_length, kv_heads, depth), dtype),
            jax.ShapeDtypeStruct((2, k_length, kv_heads, depth), dtype)]
    if with_bias:
        args.append(jax.ShapeDtypeStruct((1, heads, q_length, k_length), jnp.float32))
    mask = jnp.ones((2, 1, 1, k_length), bool) if with_mask else None

    def loss(q, k, v, bias=None):
        out = _pallas(q, k, v, bias, mask, backend=backend, dropout_rng=RNG, interpret=False, **options)
        return jnp.sum(out.astype(jnp.float32))

    argnums = tuple(range(len(args))) if argnums is None else argnums
    return jax.jit(jax.grad(loss, argnums=argnums)).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _kernel_calls(text):
    return sum(text.count(f"stablehlo.custom_call @{target}") for target in ("tpu_custom_call", "__gpu$xla.gpu.triton"))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("depth", [64, 128])
def test_kernels_lower_for_tpu_and_cuda(platform, dtype, depth):
    for case in LOWERING_CASES:
        text = _lowered(platform, dtype, depth, case)
        # forward, dK/dV, dQ (and dbias with a bias): every kernel became a Mosaic or Triton call.
        assert _kernel_calls(text) == 3 + LOWERING_CASES[case][4].get("bias", False), case


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_bias_gradient_kernel_is_dead_code_when_unused(platform):
    # The dbias kernel is a separate custom call without side effects: when only dq, dk, dv are used its result
    # has no users, and XLA's dead-code elimination drops it (no (B, H, Tq, Tk) buffer for a constant bias).
    text = _lowered(platform, jnp.bfloat16, 64, "bias-mask", argnums=(0, 1, 2))
    [line] = [line for line in text.splitlines() if "jdrop_attention_dbias" in line]
    assert "has_side_effect" not in line
    result = line.split("=")[0].strip()
    assert re.search(re.escape(result) + r"\b", text.replace(line, "")) is None
