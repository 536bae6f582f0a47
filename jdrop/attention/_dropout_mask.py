"""The dropout masks a tile of :func:`jdrop.dot_product_attention` can draw: flax's exact mask and cheaper ones.

Both the xla path (:mod:`jdrop.attention._kernel`) and the Pallas kernels (:mod:`jdrop.attention._pallas`) draw a
tile's mask with :func:`first_rows` (which rows need a threefry counter) and :func:`tile_keep` (counters' words to
keep decisions), by global element index (:func:`jdrop.masks.index_words`), so every tiling of either path draws
the same mask.

``"exact"`` (the default) is ``jax.random.bernoulli(key, 1 - rate, shape)``, flax's mask: one threefry-2x32 call
(20 rounds, about 120 integer ops) per attention element, whose 32-bit word (``t0 ^ t1``) is tested on its top 23
bits. Where the products run on tensor cores or an MXU (``4 D`` flops per element, at many times the integer
rate) that call can cost more than the attention itself.

``"fast16"`` / ``"fast8"`` (opt-in; *not* flax's mask) make one call per group of ``n = 4`` / ``8`` elements and
split its two 32-bit output words into ``n`` uniforms of ``b = 16`` / ``8`` bits, FlashAttention-2's trick (Dao
2023, with Philox there): about 4x / 8x fewer threefry rounds per element. Element keeps iff its uniform is below
``ceil(keep * 2**b)``, so the realised keep probability is ``ceil((1 - rate) * 2**b) / 2**b`` exactly (the rate
rounded down to a multiple of ``2**-b``: within ``2**-16`` of ``1 - rate`` for fast16, ``2**-8`` for fast8), and
kept elements are scaled by its inverse, so the output stays unbiased. A group is ``n`` elements of one column,
``SUBLANES`` rows apart: in each block of ``R = n * SUBLANES`` rows starting at a multiple of ``R``, rows
``8 s + r`` (``s < n``, ``r < 8``) share the call whose counter is the flat index of row ``r``'s element (the
group's first), and member ``s`` takes bits ``[b (s mod n/2), b (s mod n/2) + b)`` of word ``s // (n/2)``. Tiles
are multiples of ``R`` rows, so groups never straddle tiles. The ``n`` uniforms of a group are disjoint bits of one
threefry output, a pseudo-random function of the counter: as independent as threefry's bits are (the tests check
each pair's joint keep rate to 5 sigma).

``"hash8"`` (opt-in; *not* flax's mask) groups rows as the fast masks do, 4 rows per group (``R = 32``), and
draws one threefry call per group and tile, then one multiply-xorshift word per group and column and a multiply
and a compare per element (:mod:`jdrop.attention._hash_mask`): about 3.3 integer ops per element. It needs the
global row and column apart, so callers use :func:`tile_keep_at`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdrop import masks
from jdrop._dropout import _keep_and_factor
from jdrop._validation import check_rate, keep_probability, rate_is_valid
from jdrop.attention import _hash_mask

__all__ = ["EXACT_DRAWS", "MODES", "SUBLANES", "THREEFRY_OPS", "bits", "exact_draw", "first_rows", "group_rows",
           "group_size", "integer_ops", "operands", "tile_keep", "tile_keep_at"]

MODES = ("exact", "fast16", "fast8", "hash8")
"""The values of ``dropout_mask``."""
EXACT_DRAWS = ("exact", "exact64", "original", "original64", "drawn")
"""How a tile draws flax's mask (``"exact"``'s draw for the key and configs at hand, :func:`exact_draw`):
``"exact"``: partitionable threefry, 32-bit words (JAX's defaults); ``"exact64"``: the same with 64-bit words
(``jax_enable_x64``: flax's Python-float keep probability makes bernoulli draw float64 uniforms);
``"original"`` / ``"original64"``: threefry with ``jax_threefry_partitionable=False``, whose counters depend on
the mask's size (carried as a third key word); ``"drawn"``: every other key (rbg, unsafe_rbg, philox, a user's
implementation, or a threefry mask past the fused layouts): the whole mask drawn by ``jax.random`` up front,
1 byte per element, and each tile reads its part."""
SUBLANES = 8
"""Rows between the members of a fast group: one (8, 128) vector tile of 32-bit values (TPU), so in-kernel
reshapes only move whole tiles."""

THREEFRY_OPS = 117
"""uint32 ops of one threefry-2x32 call (:func:`jdrop.masks.threefry2x32`): 2 key additions, then 5 blocks of 4 rounds
(add, rotate = 2 shifts and an or, xor: 5 ops) and a key injection (3 additions): ``2 + 5 (4 * 5 + 3)``."""


def integer_ops(mode: str, elements: int, block_k: int = 128) -> int:
    """Integer ops a tile spends drawing ``elements`` dropout factors (the cost estimate of the kernels).

    Per threefry call: :data:`THREEFRY_OPS` plus 2 for its counter (the flat index's multiply-add). Per element:
    exact, 4 (the two words' xor, the shift to 23 bits, the compare, the select of the factor); fast, 5 (the
    word select, shift, and-mask, compare and factor select). ``elements`` is a multiple of :func:`group_size`.
    hash8: one threefry call (plus 3 for its counter and the odd multiplier) per group of 4 rows and a
    ``block_k``-wide tile, then per element about 1 for its share of the column word's mix and 3 for the member's
    multiply, the compare and the factor select.
    """
    if mode == "hash8":
        return elements // (_hash_mask.MEMBERS * block_k) * (THREEFRY_OPS + 3) + 4 * elements
    per_element = 4 if mode == "exact" else 5
    return elements // group_size(mode) * (THREEFRY_OPS + 2) + per_element * elements


def bits(mode: str) -> int:
    """Bits of the uniform each keep test compares: 23 (exact: ``jax.random.bernoulli``'s; 52 in x64), 16 or 8."""
    if mode in EXACT_DRAWS:
        return masks.WIDE_THRESHOLD_BITS if mode.endswith("64") else masks.THRESHOLD_BITS
    return {"fast16": 16, "fast8": 8, "hash8": 8}[mode]


def group_size(mode: str) -> int:
    """Rows per counter: 1 (exact), the 64 bits of one call's two words in ``bits``-bit uniforms (fast), 4 (hash8)."""
    if mode == "hash8":
        return _hash_mask.MEMBERS
    return 1 if mode in EXACT_DRAWS else 64 // bits(mode)


def group_rows(mode: str) -> int:
    """Rows a block of groups spans, ``group_size * SUBLANES`` (1 for exact): tiles are multiples of it."""
    return 1 if mode in EXACT_DRAWS else group_size(mode) * SUBLANES


def exact_draw(key: jax.Array, threshold: jax.Array, shape: tuple[int, ...]) -> tuple[str, jax.Array]:
    """``(draw, key operand)`` of flax's mask ``bernoulli(key, keep, shape)`` under the key's implementation and
    the current configs (see :data:`EXACT_DRAWS`).

    The operand is the threefry key's data (``uint32[2]``, or ``uint32[3]`` with the mask's size for the
    original layout), or, for a ``"drawn"`` mask, the flat bool mask itself: ``keep_from_bits(random_bits)``,
    exactly :func:`jdrop.keep_mask`'s, materialised (O(size) memory).
    """
    dtype = masks.bits_dtype(threshold)
    layout = masks.threefry_layout(key, shape, dtype)
    wide = "64" if layout is not None and layout.wide else ""
    if layout is None:
        return "drawn", masks.keep_from_bits(masks.random_bits(key, shape, dtype=dtype), threshold).reshape(-1)
    data = jax.random.key_data(key)
    if layout.partitionable:
        return "exact" + wide, data
    return "original" + wide, jnp.concatenate([data, jnp.asarray([layout.size], jnp.uint32)])


def operands(key: jax.Array, rate: float | jax.Array, dtype: Any, mode: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(key_data, threshold, factor)`` of a training pass with a fast mask.

    ``threshold = ceil(keep * 2**b) * 2**(23 - b)``: the b-bit threshold on the exact mask's 23-bit scale, so
    that ``masks.realised_keep(threshold)`` is the realised keep probability and the factor is the dropout
    core's, ``1 / keep`` (0 at keep 0, NaN for an invalid traced rate). ``"hash8"`` has fast8's realised keep
    and factor, and returns its own bound (:func:`jdrop.attention._hash_mask.threshold`) as the threshold.
    """
    width = bits(mode)
    keep = keep_probability(rate)
    threshold = jnp.ceil(keep * np.float32(2**width)).astype(jnp.uint32) << np.uint32(masks.THRESHOLD_BITS - width)
    _, factor = _keep_and_factor(threshold, rate_is_valid(check_rate(rate)), scale="inverted", train=True,
                                 dtype=jnp.promote_types(dtype, jnp.float32))
    if mode == "hash8":  # the same realised keep and factor as fast8; the test's bound is hash8's own
        threshold = _hash_mask.threshold(keep)
    return _threefry_words(key), threshold, factor


def _threefry_words(key: jax.Array) -> jax.Array:
    """A threefry key's data, or for another implementation two words it draws (``jax.random.bits``): the fast
    masks' counters are threefry's, keyed by the call's key either way."""
    if str(jax.random.key_impl(key)) == "threefry2x32":
        return jax.random.key_data(key)
    return jax.random.bits(key, (2,), jnp.uint32)


def first_rows(n_rows: int, mode: str) -> jax.Array:
    """``(n_rows / group_size, 1)`` int32 offsets, within a tile of ``n_rows`` rows, of the rows that draw counters.

    Exact: every row. Fast: the first row of each group, block-major (block ``g``'s rows ``R g + [0, 8)``).
    """
    if mode in EXACT_DRAWS:
        return lax.broadcasted_iota(jnp.int32, (n_rows, 1), 0)
    index = lax.broadcasted_iota(jnp.int32, (n_rows // group_size(mode), 1), 0)
    return (index >> 3) * group_rows(mode) + (index & (SUBLANES - 1))


def tile_keep(key_data: Any, high: jax.Array, low: jax.Array, threshold: jax.Array, mode: str) -> jax.Array:
    """Keep decisions of a tile from its counters' index words (of :func:`first_rows`' rows, broadcast to columns).

    ``high``/``low``: ``(..., n_rows / group_size, n_cols)`` (``high`` may be a 0-d zero). Returns a bool
    ``(..., n_rows, n_cols)`` array: exact, ``keep_from_bits(bits_at(...))``; fast, each counter's two words split
    into its group's uniforms (see the module docstring).
    """
    if mode in EXACT_DRAWS:
        return _exact_keep(key_data, high, low, threshold, mode)
    n, width = group_size(mode), bits(mode)
    t0, t1 = jnp.broadcast_arrays(*masks.threefry2x32(key_data[0], key_data[1], high, low))
    *lead, rows, cols = t0.shape
    split = (*lead, rows // SUBLANES, 1, SUBLANES, cols)
    member = lax.broadcasted_iota(jnp.int32, (n, 1, 1), 0)
    word = jnp.where(member < n // 2, t0.reshape(split), t1.reshape(split))
    shift = ((member & (n // 2 - 1)) * width).astype(jnp.uint32)
    # The reshape back to the tile's rows moves 32-bit values (whole (8, 128) tiles on TPU), not booleans.
    uniform = ((word >> shift) & np.uint32(2**width - 1)).reshape(*lead, rows * n, cols)
    return uniform < (threshold >> np.uint32(masks.THRESHOLD_BITS - width))


def tile_keep_at(key_data: Any, rows: jax.Array, cols: jax.Array, n_cols: int, n_rows: int | None,
                 threshold: jax.Array, mode: str) -> jax.Array:
    """Keep decisions of a tile from the global rows of :func:`first_rows` and the global columns.

    ``rows``: uint32 ``(..., n_rows_tile / group_size, 1)`` rows of the ``(n_rows, n_cols)`` mask (``n_rows`` as in
    :func:`jdrop.masks.index_words`); ``cols``: uint32 ``(1, m)``. Exact and fast masks draw by the flat index
    (:func:`tile_keep`); ``"hash8"`` by row and column (:mod:`jdrop.attention._hash_mask`).
    """
    if mode == "hash8":
        return _hash_mask.tile_keep(key_data, rows, cols, threshold)
    high, low = masks.index_words(rows, cols, n_cols, n_rows=n_rows)
    return tile_keep(key_data, high, low, threshold, mode)


def _exact_keep(key_data: Any, high: jax.Array, low: jax.Array, threshold: jax.Array, mode: str) -> jax.Array:
    """Flax's keep decisions at flat indices ``(high, low)``, drawn as :func:`exact_draw`'s ``mode`` says."""
    if mode == "drawn":  # the whole mask, at most 2**32 elements: ``high`` is 0
        return jnp.take(key_data, jnp.broadcast_to(low, jnp.broadcast_shapes(jnp.shape(high), low.shape)))
    wide = mode.endswith("64")
    original = mode.startswith("original")
    layout = masks.Layout(not original, key_data[2] if original else 0, wide)
    return masks.keep_from_bits(masks.bits_at(key_data, high, low, layout), threshold)
