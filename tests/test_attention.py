"""Tests for jdrop.dot_product_attention: flax's outputs, gradients and masks, blockwise, in O(T) memory.

The reference is ``flax.linen.dot_product_attention`` with the same ``dropout_rng``: its mask is
``jax.random.bernoulli(dropout_rng, 1 - rate, shape)``, and jdrop draws exactly that mask tile by tile, so
zero patterns must match exactly and values to float rounding. Every computation runs under ``jax.jit``.
"""

from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import normal_input, qkv_input, value_and_grads
from flax import nnx

import jdrop
from jdrop import masks
from jdrop.attention import _kernel as kernel
from jdrop.attention import _layout as attention_layout

RNG = jax.random.key(7)
BLOCKS = {"block_q": 8, "block_k": 16}  # small tiles: every test crosses tile and padding boundaries


def _jdrop(**options):
    return partial(jdrop.dot_product_attention, **{**BLOCKS, **options})


def _assert_close(actual, expected, tol=2e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)  # numpy: eager jnp ops compile per shape
        np.testing.assert_allclose(a, e, rtol=0, atol=tol * max(1.0, np.max(np.abs(e))))


# ------------------------------------------------------------------------------------- the bits


def test_bits_at_gives_jax_random_bits_by_global_index(key):
    shape = (3, 5, 7)
    index = jnp.arange(np.prod(shape), dtype=jnp.uint32)
    bits = jax.jit(masks.bits_at)(jax.random.key_data(key), jnp.zeros_like(index), index)
    np.testing.assert_array_equal(bits.reshape(shape), jax.random.bits(key, shape, jnp.uint32))
    # A shape's tile drawn by global index is the tile of the whole array's bits.
    rows, cols = np.meshgrid(np.arange(2, 4), np.arange(3, 7), indexing="ij")
    tile = masks.bits_at(jax.random.key_data(key), jnp.uint32(0), jnp.asarray(rows * 7 + cols, jnp.uint32))
    np.testing.assert_array_equal(tile, jax.random.bits(key, (5, 7), jnp.uint32)[2:4, 3:7])


def test_mask_index_past_two_to_the_32_matches_uint64_arithmetic():
    # Flax's mask (8, 16, 2**13, 2**12) has 2**32 elements: JAX's counter then has a high word.
    cfg = kernel.Config(block_q=128, block_k=128, k_length=2**12 + 3, group=2, causal=False, skip_causal=False,
                        dropout=kernel.DropoutMode.PER_ELEMENT, dropout_shape=(8, 16, 2**13, 2**12 + 3), bias_full=(),
                        precision=None)
    rows = jnp.asarray([[0], [5], [2**13 - 1]], jnp.uint32)
    cols = jnp.asarray([[0, 1, 2**12 + 2]], jnp.uint32)
    global_rows = jax.jit(kernel._mask_rows, static_argnums=(0, 1))(cfg, (8, 8), rows, kernel.Offsets())
    high, low = masks.index_words(global_rows, cols, 2**12 + 3, n_rows=8 * 16 * 2**13)  # as tile_keep_at does
    head = np.arange(8 * 16, dtype=np.uint64).reshape(8, 8, 2, 1, 1)
    expected = (head * np.uint64(2**13) + np.asarray(rows, np.uint64)) * np.uint64(2**12 + 3) + np.asarray(
        cols, np.uint64
    )
    np.testing.assert_array_equal(np.asarray(high, np.uint64), expected >> np.uint64(32))
    np.testing.assert_array_equal(np.asarray(low, np.uint64), expected & np.uint64(0xFFFFFFFF))
    assert int(np.max(expected >> np.uint64(32))) > 0


# ------------------------------------------------------------------------------------- against flax


def test_outputs_and_gradients_equal_flax():
    q, k, v = qkv_input()
    options = {"dropout_rng": RNG, "dropout_rate": 0.3}  # flax's default: one mask for all rows and heads
    out, grads = value_and_grads(_jdrop(**options), q, k, v)
    ref, ref_grads = value_and_grads(partial(nn.dot_product_attention, **options), q, k, v)
    _assert_close(out, ref)
    _assert_close(grads, ref_grads)


def test_mask_bias_causal_and_per_element_dropout_equal_flax():
    q, k, v = qkv_input(q_length=45)
    lengths = jnp.asarray([45, 20])
    mask = (jnp.arange(45) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, Tk) padding mask
    mask = mask & jnp.ones((45, 1), bool).at[3].set(False)  # and a fully masked row: uniform, as in flax
    bias = normal_input((4, 45, 45), seed=3)  # (H, Tq, Tk), broadcast over the batch
    options = {"dropout_rng": RNG, "dropout_rate": 0.2, "broadcast_dropout": False}
    out, grads = value_and_grads(lambda q, k, v, b: _jdrop(mask=mask, is_causal=True, **options)(q, k, v, bias=b),
                                  q, k, v, bias)
    causal = mask & jnp.tril(jnp.ones((45, 45), bool))
    ref, ref_grads = value_and_grads(
        lambda q, k, v, b: nn.dot_product_attention(q, k, v, bias=b, mask=causal, **options), q, k, v, bias
    )
    _assert_close(out, ref)
    _assert_close(grads, ref_grads)


def test_odd_lengths_draw_flax_mask_exactly_and_equal_flax():
    # value = identity: the output row of query t is its dropped probabilities, so zeros = dropped entries.
    q_length, k_length, heads = 1000, 999, 1
    q, k, _ = qkv_input(batch=1, q_length=q_length, k_length=k_length, heads=heads, depth=4)
    v = jnp.broadcast_to(jnp.eye(k_length)[None, :, None, :], (1, k_length, heads, k_length))
    options = {"dropout_rng": RNG, "dropout_rate": 0.5, "broadcast_dropout": False}
    out, grads = value_and_grads(partial(jdrop.dot_product_attention, **options), q, k, v)
    keep = jax.random.bernoulli(RNG, 0.5, (1, heads, q_length, k_length))
    np.testing.assert_array_equal(np.asarray(out).transpose(0, 2, 1, 3) != 0, keep)
    ref, ref_grads = value_and_grads(partial(nn.dot_product_attention, **options), q, k, v)
    _assert_close(out, ref)
    _assert_close(grads, ref_grads)


def test_float64_equals_naive_attention_tightly(x64):
    q, k, v = qkv_input(dtype=jnp.float64)
    bias = normal_input((1, 1, 37, 45), seed=3, dtype=jnp.float64)
    rate = 0.3
    # Under x64 flax's Python-float keep probability makes bernoulli draw float64 uniforms: so does jdrop.
    keep_mask = jax.random.bernoulli(RNG, 1 - rate, (1, 1, 37, 45))
    keep = float(masks.realised_keep(masks.keep_threshold(jnp.float64(1 - rate))))

    def naive(q, k, v, b):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(8.0), k) + b
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits) * keep_mask / keep, v)

    out, grads = value_and_grads(lambda q, k, v, b: _jdrop(dropout_rng=RNG, dropout_rate=rate)(q, k, v, bias=b),
                                  q, k, v, bias)
    ref, ref_grads = value_and_grads(naive, q, k, v, bias)
    assert out.dtype == jnp.float64
    _assert_close(out, ref, tol=1e-12)
    _assert_close(grads, ref_grads, tol=1e-12)


# ------------------------------------------------------------------------------------- tiles, heads, rates


def test_block_sizes_do_not_change_results():
    q, k, v = qkv_input()
    options = {"dropout_rng": RNG, "dropout_rate": 0.4, "broadcast_dropout": False}
    results = [
        value_and_grads(partial(jdrop.dot_product_attention, block_q=bq, block_k=bk, **options), q, k, v)
        for bq, bk in [(16, 7), (37, 45)]  # ragged tiles, one whole tile
    ]
    for out, grads in results[1:]:
        np.testing.assert_array_equal(out == 0, results[0][0] == 0)
        _assert_close(out, results[0][0], tol=1e-6)
        _assert_close(grads, results[0][1], tol=1e-6)


def test_grouped_query_causal_attention_equals_flax_with_repeated_kv_heads():
    # Causal without a mask: the tiles above the diagonal are skipped.
    options = {"dropout_rng": RNG, "dropout_rate": 0.3, "broadcast_dropout": False, "is_causal": True}

    def repeated(q, k, v):
        group = q.shape[2] // k.shape[2]
        return nnx.dot_product_attention(q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2), **options)

    q, k, v = qkv_input(q_length=45, kv_heads=2)
    out, grads = value_and_grads(_jdrop(**options), q, k, v)
    ref, ref_grads = value_and_grads(repeated, q, k, v)
    _assert_close(out, ref)
    _assert_close(grads, ref_grads)
    q, k, v = qkv_input(kv_heads=1)  # multi-query
    _assert_close(jax.jit(_jdrop(**options))(q, k, v), jax.jit(repeated)(q, k, v))


def test_traced_rate_compiles_once_rate_zero_is_no_dropout_rate_one_gives_zeros():
    q, k, v = qkv_input()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def attend(rate):
        return value_and_grads(_jdrop(dropout_rng=RNG, dropout_rate=rate), q, k, v)

    plain = jax.jit(_jdrop())(q, k, v)
    _assert_close(attend(0.0)[0], plain, tol=1e-6)
    _assert_close(attend(0.3)[0], jax.jit(_jdrop(dropout_rng=RNG, dropout_rate=0.3))(q, k, v), tol=1e-6)
    out, grads = attend(1.0)
    np.testing.assert_array_equal(out, 0.0)
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)
    assert np.all(np.isnan(attend(1.5)[0]))


def test_deterministic_ignores_rng_and_equals_flax():
    q, k, v = qkv_input()
    evaluation = jax.jit(_jdrop(dropout_rate=0.5, deterministic=True))(q, k, v)
    with_rng = jax.jit(_jdrop(dropout_rng=RNG, dropout_rate=0.5, deterministic=True))(q, k, v)
    np.testing.assert_array_equal(evaluation, with_rng)
    _assert_close(evaluation, nn.dot_product_attention(q, k, v, dropout_rate=0.5, deterministic=True))


def test_vmap_over_keys_equals_one_call_per_example():
    q, k, v = qkv_input()
    keys = jax.random.split(RNG, 2)
    attend = _jdrop(dropout_rate=0.3, broadcast_dropout=False)
    batched = jax.jit(jax.vmap(lambda q, k, v, r: attend(q, k, v, dropout_rng=r)))(q, k, v, keys)
    for i in range(2):
        _assert_close(batched[i], jax.jit(attend)(q[i], k[i], v[i], dropout_rng=keys[i]), tol=1e-6)


def test_low_precision_returns_input_dtype():
    q, k, v = qkv_input()
    options = {"dropout_rng": RNG, "dropout_rate": 0.2}
    ref = jax.jit(_jdrop(**options))(q, k, v)
    out, grads = value_and_grads(_jdrop(**options), q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                  v.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    _assert_close(out, ref, tol=3e-2)
    half = jax.jit(_jdrop(**options))(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16))
    assert half.dtype == jnp.float16
    _assert_close(half, ref, tol=3e-3)


def test_bad_arguments_raise_clear_errors():
    q, k, v = qkv_input(batch=1, q_length=4, k_length=4)
    with pytest.raises(ValueError, match="dropout_rate"):
        jdrop.dot_product_attention(q, k, v, dropout_rng=RNG, dropout_rate=1.5)
    with pytest.raises(ValueError, match="dropout_rng"):
        jdrop.dot_product_attention(q, k, v, dropout_rate=0.1)
    with pytest.warns(UserWarning, match="drawn whole"):  # flax's mask, O(T^2): tests/test_keys.py
        jdrop.dot_product_attention(q, k, v, dropout_rng=jax.random.key(0, impl="rbg"), dropout_rate=0.1)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        jdrop.dot_product_attention(q, k[..., :3, :], v[..., :3, :])
    with pytest.raises(ValueError, match="custom einsums"):
        jdrop.dot_product_attention(q, k, v, qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum)
    with pytest.raises(ValueError, match="block_q"):
        jdrop.dot_product_attention(q, k, v, block_q=0)
    with pytest.raises(ValueError, match="mask"):
        jdrop.dot_product_attention(q, k, v, mask=jnp.ones((3, 4), bool))
    # Evaluation needs no key, whatever its implementation.
    jdrop.dot_product_attention(q, k, v, dropout_rate=0.1, deterministic=True)


# ------------------------------------------------------------------------------------- inside flax's modules


def test_attention_fn_of_linen_multi_head_attention():
    x = normal_input((2, 19, 16), seed=3)

    def layer(attention_fn):
        return nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.3, deterministic=False,
                                               attention_fn=attention_fn)

    params = layer(nn.dot_product_attention).init(jax.random.key(0), x)

    @partial(jax.jit, static_argnums=0)
    def apply(attention_fn, params):
        return layer(attention_fn).apply(params, x, rngs={"dropout": RNG}, sow_weights=True,
                                         mutable=["intermediates"])

    out, sown = apply(jdrop.dot_product_attention, params)
    ref, ref_sown = apply(nn.dot_product_attention, params)
    _assert_close(out, ref)
    _assert_close(sown, ref_sown)


def test_attention_fn_of_nnx_multi_head_attention():
    x = normal_input((2, 19, 16), seed=3)

    def run(attention_fn):
        layer = nnx.MultiHeadAttention(num_heads=4, in_features=16, dropout_rate=0.3, decode=False,
                                       attention_fn=attention_fn, rngs=nnx.Rngs(0, dropout=5))

        @nnx.jit
        def apply(layer, x):
            return layer(x, deterministic=False, sow_weights=True), layer(x, deterministic=False)

        outs = apply(layer, x)
        return outs, nnx.state(layer, nnx.Intermediate)

    (out, ref) = run(jdrop.dot_product_attention), run(nnx.dot_product_attention)
    _assert_close(out[0], ref[0])
    _assert_close(jax.tree.leaves(out[1]), jax.tree.leaves(ref[1]))


# ------------------------------------------------------------------------------------- memory and compile time


def _step_temp_bytes(length, batch=1, heads=2, depth=16):
    q = jax.ShapeDtypeStruct((batch, length, heads, depth), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(jdrop.dot_product_attention(q, k, v, dropout_rng=RNG, dropout_rate=0.1))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_training_step_temporary_memory_grows_linearly():
    small, large = _step_temp_bytes(1024), _step_temp_bytes(2048)
    assert large <= 2.3 * small, (small, large)
    # Far below a single (heads, T, T) float32 array, which flax keeps several of.
    assert large < 2 * 2048 * 2048 * 4 / 4, large


# ------------------------------------------------------------------------------------- block pairs at offsets


def _block_pair(q, k, v, rate, dropout_shape, causal):
    """The kernel's config and operands of one (query block, key block) pair, tiled by its local layout."""
    layout = attention_layout.Layout.of(q, k, BLOCKS["block_q"], BLOCKS["block_k"])
    cfg = kernel.Config(block_q=layout.block_q, block_k=layout.block_k, k_length=layout.k_length, group=layout.group,
                        causal=causal, skip_causal=causal, dropout=kernel.DropoutMode.PER_ELEMENT,
                        dropout_shape=dropout_shape, bias_full=(), precision=None)
    tiles = layout.query_tiles(q / np.sqrt(q.shape[-1]).astype(np.float32)), layout.key_tiles(k), layout.key_tiles(v)
    return layout, cfg, kernel.Operands(*tiles, None, None, kernel.dropout_operands(RNG, rate, q.dtype))


def _combine(partials):
    """Online softmax across key blocks: outputs normalised per block and their logsumexp parts, combined."""
    row_max = jnp.max(jnp.stack([lse.row_max for _, lse in partials]), axis=0)
    weights = [jnp.exp(lse.row_max - row_max + lse.log_row_sum) for _, lse in partials]  # each block's row sum
    total = sum(weights)
    # A row that sees no key of a block (causal) has weight 0 there and a NaN (0/0) block output.
    out = sum(jnp.where(w[..., None] > 0, o.astype(jnp.float32), 0.0) * (w / total)[..., None]
              for (o, _), w in zip(partials, weights))
    return out, kernel.LogSumExp(row_max, jnp.log(total))


def test_block_pairs_at_global_offsets_compose_into_the_whole_attention():
    # Queries in 2 shards, keys in 2 blocks (odd lengths, causal, per-element dropout): each pair draws its part of
    # flax's (B, H, Tq, Tk) mask and masks causally by global position; dQ sums over key blocks, dK/dV over shards.
    q, k, v = qkv_input(q_length=42, k_length=38)
    rate, q_split, k_split = 0.3, 19, 21
    shape = (2, 4, 42, 38)
    d_out = normal_input((2, 42, 4, 8), seed=3)

    @jax.jit
    def sharded(q, k, v, d_out):
        q_shards, k_blocks = (q[:, :q_split], q[:, q_split:]), ((0, k[:, :k_split], v[:, :k_split]),
                                                                 (k_split, k[:, k_split:], v[:, k_split:]))
        outs, grads_q, grads_kv = [], [], [jnp.zeros_like(k), jnp.zeros_like(v)]
        for q_offset, q_shard in zip((0, q_split), q_shards):
            pairs = [(k_offset, *_block_pair(q_shard, k_b, v_b, rate, shape, True)) for k_offset, k_b, v_b in k_blocks]
            offsets = [kernel.Offsets(q=jnp.int32(q_offset), k=jnp.int32(k_offset)) for k_offset, *_ in pairs]
            out, lse = _combine([kernel.forward(cfg, ops, o) for (_, _, cfg, ops), o in zip(pairs, offsets)])
            layout = pairs[0][1]
            d_out_tiles = layout.query_tiles(d_out[:, q_offset:q_offset + q_shard.shape[1]])
            delta = kernel.delta(out, d_out_tiles)
            d_q = 0.0
            for (k_offset, k_layout, cfg, ops), o in zip(pairs, offsets):
                dq, dk, dv, _ = kernel.backward(cfg, ops, d_out_tiles, lse, delta, o)
                d_q = d_q + dq
                for i, d in enumerate((dk, dv)):
                    rows = slice(k_offset, k_offset + k_layout.k_length)
                    grads_kv[i] = grads_kv[i].at[:, rows].add(k_layout.from_key_tiles(d))
            outs.append(layout.from_query_tiles(out))
            grads_q.append(layout.from_query_tiles(d_q) / np.sqrt(8.0))
        return jnp.concatenate(outs, axis=1), (jnp.concatenate(grads_q, axis=1), *grads_kv)

    out, grads = sharded(q, k, v, d_out)
    whole = _jdrop(dropout_rng=RNG, dropout_rate=rate, broadcast_dropout=False, is_causal=True)
    ref, vjp = jax.vjp(jax.jit(whole), q, k, v)
    _assert_close(out, ref)
    _assert_close(grads, vjp(d_out))


def test_batch_and_head_offsets_draw_their_part_of_the_per_element_mask():
    # Batch rows and heads in 2 shards each (as on a 2-D mesh): the shards' outputs are the whole call's.
    q, k, v = qkv_input(q_length=21, k_length=19)
    shape = (2, 4, 21, 19)

    @jax.jit
    def sharded(q, k, v):
        rows = []
        for b in range(2):
            heads = []
            for h in (0, 2):
                layout, cfg, ops = _block_pair(q[b:b + 1, :, h:h + 2], k[b:b + 1, :, h:h + 2], v[b:b + 1, :, h:h + 2],
                                               0.5, shape, False)
                out, _ = kernel.forward(cfg, ops, kernel.Offsets(batch=jnp.int32(b), head=jnp.int32(h)))
                heads.append(layout.from_query_tiles(out))
            rows.append(jnp.concatenate(heads, axis=2))
        return jnp.concatenate(rows, axis=0)

    ref = jax.jit(_jdrop(dropout_rng=RNG, dropout_rate=0.5, broadcast_dropout=False))(q, k, v)
    _assert_close(sharded(q, k, v), ref)
