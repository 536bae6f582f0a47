"""Tests for jdrop.variants.attention (attention_dropout): the formula against ``jdrop.keep_mask`` (itself
``jax.random.bernoulli``, tests/test_masks.py) and its temporary memory against flax's ``nn.Dropout``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import keep_mask, normal_input, realised_keep

from jdrop import variants


def test_attention_dropout_formula(variant):
    """The formula, with and without jit."""
    key = jax.random.key(0)
    rate = 0.1
    probs = jax.nn.softmax(normal_input((2, 3, 8, 8)), axis=-1)
    y = variant(lambda k, p: variants.attention_dropout(k, p, rate))(key, probs)
    mask = keep_mask(key, probs.shape, rate)  # = jax.random.bernoulli(key, 1 - rate, shape) (tests/test_masks.py)
    np.testing.assert_allclose(y, jnp.where(mask, probs / realised_keep(rate), 0.0), rtol=1e-6)
    broadcast = variant(lambda k, p: variants.attention_dropout(k, p, rate, broadcast_dims=(0, 1)))(key, probs)
    kept = np.asarray(broadcast != 0)
    assert np.all(kept == kept[:1, :1])


def test_attention_dropout_temp_memory_below_flax(key):
    flax_linen = pytest.importorskip("flax.linen")
    batch, heads, length, depth, rate = 2, 4, 128, 16, 0.1

    def block(drop):
        def loss(q, k, v, key):
            probs = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(depth), axis=-1)
            return jnp.sum(jnp.einsum("bhqk,bhkd->bhqd", drop(key, probs), v) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def flax_dropout(k, p):
        return flax_linen.Dropout(rate, deterministic=False).apply({}, p, rngs={"dropout": k})

    qkv = [jnp.ones((batch, heads, length, depth))] * 3

    def temp_bytes(drop):
        return block(drop).lower(*qkv, key).compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes(lambda k, p: variants.attention_dropout(k, p, rate))
    mask_bytes = batch * heads * length * length  # one byte per attention weight
    assert ours + mask_bytes <= temp_bytes(flax_dropout)
    # No more than attention without dropout (plus a few bytes of key).
    assert ours <= temp_bytes(lambda k, p: p) + 1024
