"""Keys: the per-example keys of the global-index convention, and a batched ``fold_in``.

:func:`canonical_key` and :func:`require_key` (the key checks every op uses) live in
:mod:`jdrop._validation`; the face :mod:`jdrop.masks` re-exports them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jdrop._typing import KeyLike
from jdrop._validation import canonical_key, check_index_offset, check_single_key, int_at_least

__all__ = ["example_keys", "fold_in"]


def example_keys(key: KeyLike, n: int, *, offset: Any = 0) -> jax.Array:
    """Keys for the examples with global indices ``offset, ..., offset + n - 1``.

    ``keys[j] = jax.random.fold_in(key, offset + j)``: example ``i``'s key depends only on the
    step key and ``i``, so a batch split into microbatches (each with its own ``offset``) or
    sharded over devices gets the very same keys, hence the same masks, as the whole batch.

    Args:
      key: the step's PRNG key (typed or legacy raw).
      n: number of examples (static, non-negative).
      offset: global index of the first example; an int or a traced integer scalar.

    Returns:
      A typed key array of shape ``(n,)``.
    """
    key = check_single_key(key)
    n = int_at_least(n, 0, name="n")
    check_index_offset(offset, name="offset")
    index = jnp.asarray(offset, jnp.uint32) + jnp.arange(n, dtype=jnp.uint32)
    return fold_in(key, index)


def fold_in(key: KeyLike, data: Any) -> jax.Array:
    """``jax.random.fold_in`` of a key array and ``uint32`` data, broadcast against each other.

    ``out[i] = jax.random.fold_in(key[i], data[i])`` over the broadcast shape of ``key`` and
    ``data``, bit for bit: it is ``jax.random.fold_in`` itself, vmapped, in a nested ``jit`` so that
    it is traced and lowered once per shape (JAX lowers its own ``fold_in`` again at every call).

    Args:
      key: a PRNG key array (typed or legacy raw).
      data: integer data, e.g. an example or layer index (taken modulo 2**32, as JAX does).

    Returns:
      A typed key array of the broadcast shape.
    """
    key = canonical_key(key)
    data = jnp.asarray(data).astype(jnp.uint32)
    shape = jnp.broadcast_shapes(key.shape, data.shape)
    key, data = jnp.broadcast_to(key, shape), jnp.broadcast_to(data, shape)
    if str(jax.random.key_impl(key)) in _NOT_BATCHABLE:
        return _fold_in_each(key, data)
    return _fold_in(key, data)


_NOT_BATCHABLE = ("unsafe_rbg",)
"""Implementations whose ``fold_in`` under ``jax.vmap`` is not the per-key ``fold_in`` (unsafe_rbg's batched
draw depends on the whole batch): :func:`fold_in` folds their keys one at a time instead."""


@jax.jit
def _fold_in_each(key: jax.Array, data: jax.Array) -> jax.Array:
    """``jax.random.fold_in`` of each key and datum in a loop (``lax.map``): exactly the per-key results."""
    flat = lax.map(lambda pair: jax.random.fold_in(*pair), (key.reshape(-1), data.reshape(-1)))
    return flat.reshape(key.shape)


@jax.jit
def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
    # Compile hazard: never derive keys with the unrolled threefry of random_bits. A key shared by a
    # batch makes that 20-round chain loop-invariant, and LLVM's vectorizer then runs for hours when it
    # interleaves (AVX-512's choice). JAX's own lowering is a rolled loop on CPU: tiny data, no chain.
    fold = jax.random.fold_in
    for _ in range(key.ndim):
        fold = jax.vmap(fold)
    return fold(key, data)
