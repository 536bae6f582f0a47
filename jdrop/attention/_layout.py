"""The kernel layout: ``(batch..., T, H, D)`` arrays padded and tiled for :mod:`jdrop.attention._kernel`, and back.

Queries become ``(nq, B, Hk, G, bq, D)`` (query head ``h = hk * G + g`` attends with key/value head
``hk``), keys and values ``(nk, B, Hk, bk, D)``, zero-padded to whole tiles; a mask or bias
broadcastable to ``(batch..., Hq, Tq, Tk)`` becomes ``(B|1, Hk|1, G|1, Tq_pad|1, Tk_pad|1)``, its
axes of size 1 left to broadcast inside the kernel. Shapes are checked before (jdrop._validation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Layout"]


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


class Layout(NamedTuple):
    """The static sizes of one call: lengths, heads and tiles (tiles no longer than the sequences)."""

    batch_shape: tuple[int, ...]
    q_length: int
    k_length: int
    q_heads: int
    kv_heads: int
    block_q: int
    block_k: int

    @classmethod
    def of(cls, query: jax.Array, key: jax.Array, block_q: int, block_k: int) -> Layout:
        """The layout of ``query`` ``(batch..., Tq, Hq, D)`` and ``key`` ``(batch..., Tk, Hk, D)``."""
        (q_length, q_heads), (k_length, kv_heads) = query.shape[-3:-1], key.shape[-3:-1]
        return cls(tuple(query.shape[:-3]), q_length, k_length, q_heads, kv_heads,
                   min(block_q, q_length), min(block_k, k_length))

    @property
    def batch(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def n_q(self) -> int:
        return -(-self.q_length // self.block_q)

    @property
    def n_k(self) -> int:
        return -(-self.k_length // self.block_k)

    def query_tiles(self, query: jax.Array) -> jax.Array:
        """``(batch..., Tq, Hq, D)`` -> ``(nq, B, Hk, G, bq, D)``."""
        depth = query.shape[-1]
        q = query.reshape(self.batch, self.q_length, self.kv_heads, self.group, depth).transpose(0, 2, 3, 1, 4)
        q = _pad_axis(q, 3, self.n_q * self.block_q)
        return q.reshape(self.batch, self.kv_heads, self.group, self.n_q, self.block_q, depth).transpose(
            3, 0, 1, 2, 4, 5)

    def key_tiles(self, x: jax.Array) -> jax.Array:
        """Keys or values ``(batch..., Tk, Hk, D)`` -> ``(nk, B, Hk, bk, D)``."""
        x = _pad_axis(x.reshape(self.batch, self.k_length, self.kv_heads, x.shape[-1]), 1, self.n_k * self.block_k)
        return x.reshape(self.batch, self.n_k, self.block_k, self.kv_heads, -1).transpose(1, 0, 3, 2, 4)

    def from_query_tiles(self, out: jax.Array) -> jax.Array:
        """Inverse of :meth:`query_tiles`: ``(nq, B, Hk, G, bq, Dv)`` -> ``(batch..., Tq, Hq, Dv)``, padding dropped."""
        out = out.transpose(1, 0, 4, 2, 3, 5).reshape(self.batch, self.n_q * self.block_q, self.q_heads, -1)
        return out[:, : self.q_length].reshape(*self.batch_shape, self.q_length, self.q_heads, out.shape[-1])

    def from_key_tiles(self, x: jax.Array) -> jax.Array:
        """Inverse of :meth:`key_tiles`: ``(nk, B, Hk, bk, D)`` -> ``(batch..., Tk, Hk, D)``, padding dropped."""
        x = x.transpose(1, 0, 3, 2, 4).reshape(self.batch, self.n_k * self.block_k, self.kv_heads, -1)
        return x[:, : self.k_length].reshape(*self.batch_shape, self.k_length, self.kv_heads, x.shape[-1])

    def internal(self, array: jax.Array) -> jax.Array:
        """A mask or bias broadcastable to ``(batch..., Hq, Tq, Tk)`` as ``(B|1, Hk|1, G|1, Tq_pad|1, Tk_pad|1)``."""
        rank = len(self.batch_shape) + 3
        array = array.reshape((1,) * (rank - array.ndim) + array.shape)
        heads, rows, cols = array.shape[-3:]
        if all(d == 1 for d in array.shape[:-3]):
            array = array.reshape(1, heads, rows, cols)
        else:
            array = jnp.broadcast_to(array, (*self.batch_shape, heads, rows, cols)).reshape(-1, heads, rows, cols)
        split = (self.kv_heads, self.group) if heads > 1 else (1, 1)
        array = array.reshape(array.shape[0], *split, rows, cols)
        if rows > 1:
            array = _pad_axis(array, 3, self.n_q * self.block_q)
        if cols > 1:
            array = _pad_axis(array, 4, self.n_k * self.block_k)
        return array
