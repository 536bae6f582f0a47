"""Fused dot-product attention with dropout: blockwise, O(T) memory, flax's masks.

The forward pass visits the ``(Tq, Tk)`` logits one ``(block_q, block_k)`` tile at a time with an
online softmax (Rabe & Staats 2021; Dao et al. 2022); the backward pass recomputes each tile's
probabilities from the per-row logsumexp and regenerates its dropout mask from the key by global
index (:func:`jdrop.masks.bits_at`), so no array of ``Tq x Tk`` elements is ever stored or built.

References: A. Vaswani et al., Attention is all you need, NeurIPS 2017; M. Rabe, C. Staats,
Self-attention does not need O(n^2) memory, arXiv:2112.05682, 2021; T. Dao, D. Fu, S. Ermon, A. Rudra,
C. Ré, FlashAttention: fast and memory-efficient exact attention with IO-awareness, NeurIPS 2022;
T. Dao, FlashAttention-2, arXiv:2307.08691, 2023.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jdrop import masks
from jdrop._dropout import keep_and_factor
from jdrop._validation import check_float_input, check_rate, keep_probability

__all__ = ["dot_product_attention"]

DEFAULT_BLOCK_Q = 256
"""Default query rows per tile (measured on a 2-core CPU: see BENCHMARKS.md)."""
DEFAULT_BLOCK_K = 128
"""Default key columns per tile."""

_UINT32_LIMIT = 2**32


class _Config(NamedTuple):
    """Static description of one attention call (hashable: a custom_vjp's non-differentiable argument)."""

    q_length: int  # real lengths; the arrays are padded to whole tiles
    k_length: int
    block_q: int
    block_k: int
    q_heads: int  # heads of the query; key/value heads = q_heads // group
    group: int
    causal: bool
    skip_causal: bool  # visit only the tiles on or below the diagonal (no user mask: no fully masked row)
    dropout: str  # "none", "broadcast" (one (Tq, Tk) mask for all batch rows and heads) or "element"
    bias_full: tuple[bool, ...]  # per internal axis (batch, kv head, group, q, k): does the bias vary along it?
    precision: Any


# ----------------------------------------------------------------------------------- the tiles


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], batch: int, cfg: _Config) -> jax.Array:
    """Batched matmul over the leading ``batch`` axes, accumulating in at least float32."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    dims = (((contract[0],), (contract[1],)), (tuple(range(batch)), tuple(range(batch))))
    return lax.dot_general(a, b, dims, precision=cfg.precision, preferred_element_type=acc)


def _scores(cfg: _Config, q: jax.Array, k: jax.Array, bias: jax.Array | None, mask: jax.Array | None,
            i: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Logits of tile (i, j): ``(B, Hk, G, bq, bk)``, masked as flax masks them, and the mask (or None).

    ``q`` is ``(B, Hk, G, bq, D)`` (already scaled by ``1/sqrt(D)``), ``k`` is ``(B, Hk, bk, D)``.
    Masked entries get ``finfo(float32).min`` (flax's big negative, so a fully masked row is uniform,
    as in flax); the padding columns past ``k_length`` get ``-inf`` so that they never count.
    """
    batch, kv_heads, group, bq, depth = q.shape
    s = _dot(q.reshape(batch, kv_heads, group * bq, depth), k, (3, 3), 2, cfg)
    s = s.reshape(batch, kv_heads, group, bq, cfg.block_k)
    if bias is not None:
        s = s + _tile(cfg, bias, i, j).astype(s.dtype)
    rows = i * cfg.block_q + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    cols = j * cfg.block_k + lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
    allowed = None
    if mask is not None:
        allowed = _tile(cfg, mask, i, j)
    if cfg.causal:
        allowed = cols <= rows if allowed is None else allowed & (cols <= rows)
    if allowed is not None:
        s = jnp.where(allowed, s, jnp.finfo(s.dtype).min)
    if cfg.k_length % cfg.block_k:
        s = jnp.where(cols < cfg.k_length, s, -jnp.inf)
    return s, allowed


def _tile(cfg: _Config, array: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """Tile (i, j) of a mask or bias of internal rank 5, whose q and k axes are full (padded) or 1."""
    start = (0, 0, 0, i * cfg.block_q if array.shape[3] > 1 else 0, j * cfg.block_k if array.shape[4] > 1 else 0)
    sizes = (*array.shape[:3], min(array.shape[3], cfg.block_q), min(array.shape[4], cfg.block_k))
    return lax.dynamic_slice(array, start, sizes)


def _wide_product(a: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """``a * c`` as (high, low) ``uint32`` words, for ``uint32`` ``a`` and a static ``c < 2**32``."""
    a0, a1 = a & np.uint32(0xFFFF), a >> np.uint32(16)
    c0, c1 = np.uint32(c & 0xFFFF), np.uint32(c >> 16)
    p00, p01, p10, p11 = a0 * c0, a0 * c1, a1 * c0, a1 * c1
    middle = (p00 >> np.uint32(16)) + (p01 & np.uint32(0xFFFF)) + (p10 & np.uint32(0xFFFF))
    low = (p00 & np.uint32(0xFFFF)) | (middle << np.uint32(16))
    high = p11 + (p01 >> np.uint32(16)) + (p10 >> np.uint32(16)) + (middle >> np.uint32(16))
    return high, low


def _mask_index(cfg: _Config, batch: int, rows: jax.Array, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flat (high, low) indices of query rows ``rows`` x key columns ``cols`` in flax's dropout-mask array.

    That array is ``(1, 1, Tq, Tk)`` for broadcast dropout, ``(B, Hq, Tq, Tk)`` otherwise, row-major with
    the real (unpadded) lengths, so a tile draws exactly that array's bits. ``rows`` is ``(n, 1)``,
    ``cols`` ``(1, m)`` (global ``uint32`` positions). Padding rows and columns get indices too (they
    alias other elements) but their values are never used. The column index varies along the minor
    axis, so the threefry chain is never loop-invariant in the innermost loop of a fusion (the compile
    hazard of AVX-512's vectorizer, see jdrop.masks).
    """
    if cfg.dropout == "broadcast":
        n_rows = cfg.q_length
    else:
        kv_heads = cfg.q_heads // cfg.group
        shape = (batch, kv_heads, cfg.group, 1, 1)
        head = (lax.broadcasted_iota(jnp.uint32, shape, 0) * np.uint32(cfg.q_heads)
                + lax.broadcasted_iota(jnp.uint32, shape, 1) * np.uint32(cfg.group)
                + lax.broadcasted_iota(jnp.uint32, shape, 2))
        rows, n_rows = head * np.uint32(cfg.q_length) + rows, batch * cfg.q_heads * cfg.q_length
    if n_rows * cfg.k_length < _UINT32_LIMIT:
        return jnp.zeros((), jnp.uint32), rows * np.uint32(cfg.k_length) + cols
    high, low = _wide_product(rows, cfg.k_length)
    low = low + cols
    return high + (low < cols).astype(jnp.uint32), low


def _dropout_factors(cfg: _Config, drop: tuple[jax.Array, jax.Array, jax.Array], batch: int,
                     row0: jax.Array, n_rows: int, col0: jax.Array, n_cols: int) -> jax.Array:
    """Factors of the probabilities in rows ``row0 + [0, n_rows)`` x columns ``col0 + [0, n_cols)``.

    ``1/keep`` where the mask keeps, 0 where it drops (NaN everywhere for an invalid traced rate);
    ``(n_rows, n_cols)`` for broadcast dropout, ``(B, Hk, G, n_rows, n_cols)`` otherwise.
    """
    key_data, threshold, factor = drop
    rows = (row0 + lax.broadcasted_iota(jnp.int32, (n_rows, 1), 0)).astype(jnp.uint32)
    cols = (col0 + lax.broadcasted_iota(jnp.int32, (1, n_cols), 1)).astype(jnp.uint32)
    high, low = _mask_index(cfg, batch, rows, cols)
    keep = masks.keep_from_bits(masks.bits_at(key_data, high, low), threshold)
    fill = jnp.where(jnp.isnan(factor), factor, jnp.zeros_like(factor))
    return jnp.where(keep, factor, fill)


def _shared_factors(cfg: _Config, drop, batch: int, row0: Any, n_rows: int, col0: Any, n_cols: int) -> jax.Array | None:
    """Broadcast dropout's factors for a whole row (or column) of tiles, drawn outside the inner loop.

    Computed before the loop over tiles, they cross its boundary and so are stored (``n_rows x n_cols``
    floats, O(T x block)): XLA would otherwise fuse the threefry into each tile's consumer, whose
    elements are the tile broadcast over all batch rows and heads, and draw it once per (batch, head).
    """
    if drop is None or cfg.dropout != "broadcast":
        return None
    return _dropout_factors(cfg, drop, batch, row0, n_rows, col0, n_cols)


def _visible_k_blocks(cfg: _Config, i: jax.Array, n_k: int) -> jax.Array | int:
    """Number of key tiles query tile ``i`` sees: all, or those on or below the causal diagonal."""
    if not cfg.skip_causal:
        return n_k
    return jnp.minimum(n_k, ((i + 1) * cfg.block_q - 1) // cfg.block_k + 1)


def _first_q_block(cfg: _Config, j: jax.Array) -> jax.Array | int:
    """First query tile that sees key tile ``j``."""
    if not cfg.skip_causal:
        return 0
    return (j * cfg.block_k) // cfg.block_q


# ----------------------------------------------------------------------------------- forward


def _forward(cfg: _Config, q, k, v, bias, mask, drop):
    """Blockwise forward: ``(out, (row_max, log_row_sum))``, tile-major.

    ``q``: ``(nq, B, Hk, G, bq, D)``, ``k``: ``(nk, B, Hk, bk, D)``, ``v``: ``(nk, B, Hk, bk, Dv)``.
    Returns ``out`` ``(nq, B, Hk, G, bq, Dv)`` in ``q``'s dtype and each row's logsumexp as the pair
    (max, log of the sum of ``exp(s - max)``): their sum would round ``log(Tk)`` away for a fully masked
    row (logits ``finfo.min``), whose probabilities the backward pass must still find uniform.
    """
    n_k = k.shape[0]
    batch, kv_heads, group, bq, _ = q.shape[1:]
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)

    def row_block(args):
        i, q_i = args
        shared = _shared_factors(cfg, drop, batch, i * cfg.block_q, cfg.block_q, 0, n_k * cfg.block_k)

        def step(j, carry):
            row_max, row_sum, acc = carry
            k_j, v_j = k[j], v[j]
            s, _ = _scores(cfg, q_i, k_j, bias, mask, i, j)
            new_max = jnp.maximum(row_max, s.max(axis=-1))
            # A row whose logits so far are all -inf (a -inf bias) keeps a finite reference point.
            safe_max = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
            p = jnp.exp(s - safe_max[..., None])
            correction = jnp.exp(row_max - safe_max)
            row_sum = row_sum * correction + p.sum(axis=-1)
            if shared is not None:
                p = p * lax.dynamic_slice_in_dim(shared, j * cfg.block_k, cfg.block_k, axis=1)
            elif drop is not None:
                p = p * _dropout_factors(cfg, drop, batch, i * cfg.block_q, cfg.block_q, j * cfg.block_k, cfg.block_k)
            pv = _dot(p.astype(v_j.dtype).reshape(batch, kv_heads, group * bq, -1), v_j, (3, 2), 2, cfg)
            acc = acc * correction[..., None] + pv.reshape(acc.shape)
            return new_max, row_sum, acc

        init = (
            jnp.full((batch, kv_heads, group, bq), -jnp.inf, acc_dtype),
            jnp.zeros((batch, kv_heads, group, bq), acc_dtype),
            jnp.zeros((batch, kv_heads, group, bq, v.shape[-1]), acc_dtype),
        )
        row_max, row_sum, acc = lax.fori_loop(0, _visible_k_blocks(cfg, i, n_k), step, init)
        out = (acc / row_sum[..., None]).astype(q.dtype)
        return out, (row_max, jnp.log(row_sum))

    return lax.map(row_block, (jnp.arange(q.shape[0]), q))


# ----------------------------------------------------------------------------------- backward


def _backward(cfg: _Config, residuals, d_out):
    """FlashAttention-2 backward: one pass over key tiles, each visiting its query tiles.

    Each tile's probabilities are recomputed from the logsumexp and its dropout factors are drawn
    again from the key, so nothing of size ``Tq x Tk`` exists. ``dK``, ``dV`` of a key tile accumulate
    in the inner loop; ``dQ`` (and ``dbias``) accumulate in place across the outer loop.
    """
    q, k, v, bias, mask, drop, out, (row_max, log_row_sum) = residuals
    n_q = q.shape[0]
    batch, kv_heads, group, bq, depth = q.shape[1:]
    bk = cfg.block_k
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    # rowsum(dP~ * P~) = dO . O: the softmax backward's per-row term, dropout included.
    delta = jnp.sum(d_out.astype(acc_dtype) * out.astype(acc_dtype), axis=-1)
    d_out = d_out.astype(q.dtype)

    def column_block(carry, args):
        d_q, d_bias = carry
        j, k_j, v_j = args
        shared = _shared_factors(cfg, drop, batch, 0, n_q * bq, j * bk, bk)

        def step(i, inner):
            d_k, d_v, d_q, d_bias = inner
            q_i, do_i = q[i], d_out[i]
            s, allowed = _scores(cfg, q_i, k_j, bias, mask, i, j)
            shifted = s - row_max[i][..., None]
            p = jnp.exp(shifted - log_row_sum[i][..., None])
            dp = _dot(do_i.reshape(batch, kv_heads, group * bq, -1), v_j, (3, 3), 2, cfg)
            dp = dp.reshape(p.shape)
            # dS = P * (dP~ * factors - delta) = P~ * dP~ - P * delta with P~ = P * factors: the factors are
            # used once. Broadcast dropout's factors are stored (drawn once per column of tiles): a multiply
            # reads them. Per-element factors are drawn here: P~ = exp(S - L + log(factors)) ends in an exp, an
            # op XLA will not duplicate, so the dV product and dS share one P~ and the tile's mask is drawn once.
            if shared is not None:
                p_dropped = p * lax.dynamic_slice_in_dim(shared, i * bq, bq, axis=0)
            elif drop is not None:
                log_factors = jnp.log(_dropout_factors(cfg, drop, batch, i * bq, bq, j * bk, bk))
                p_dropped = jnp.exp(shifted - log_row_sum[i][..., None] + log_factors)
            else:
                p_dropped = p
            ds = p_dropped * dp - p * delta[i][..., None]
            if mask is not None:
                # Masked logits are a constant: no gradient, even in a fully masked row (whose P is uniform).
                ds = jnp.where(allowed, ds, 0.0)
            rows = (batch, kv_heads, group * bq, bk)
            d_v = d_v + _dot(p_dropped.astype(q.dtype).reshape(rows),
                             do_i.reshape(batch, kv_heads, group * bq, -1), (2, 2), 2, cfg)
            d_k = d_k + _dot(ds.astype(q.dtype).reshape(rows), q_i.reshape(batch, kv_heads, group * bq, depth),
                             (2, 2), 2, cfg)
            dq_i = _dot(ds.astype(q.dtype).reshape(rows), k_j, (3, 2), 2, cfg)
            d_q = d_q.at[i].add(dq_i.reshape(q_i.shape))
            if d_bias is not None:
                d_bias = _add_bias_tile(cfg, d_bias, ds, i, j)
            return d_k, d_v, d_q, d_bias

        init = (jnp.zeros(k_j.shape, acc_dtype), jnp.zeros(v_j.shape, acc_dtype), d_q, d_bias)
        d_k, d_v, d_q, d_bias = lax.fori_loop(_first_q_block(cfg, j), n_q, step, init)
        return (d_q, d_bias), (d_k.astype(k.dtype), d_v.astype(v.dtype))

    d_bias = None if bias is None else jnp.zeros(bias.shape, acc_dtype)
    d_q = jnp.zeros(q.shape, acc_dtype)
    (d_q, d_bias), (d_k, d_v) = lax.scan(column_block, (d_q, d_bias), (jnp.arange(k.shape[0]), k, v))
    if d_bias is not None:
        d_bias = d_bias.astype(bias.dtype)
    return d_q.astype(q.dtype), d_k, d_v, d_bias


def _add_bias_tile(cfg: _Config, d_bias: jax.Array, ds: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """Adds tile (i, j)'s logit gradient into ``d_bias``, summed over the axes the bias broadcasts along."""
    axes = tuple(axis for axis, full in enumerate(cfg.bias_full) if not full)
    contribution = ds.sum(axis=axes, keepdims=True) if axes else ds
    start = (0, 0, 0, i * cfg.block_q if cfg.bias_full[3] else 0, j * cfg.block_k if cfg.bias_full[4] else 0)
    current = lax.dynamic_slice(d_bias, start, contribution.shape)
    return lax.dynamic_update_slice(d_bias, current + contribution, start)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, bias, mask, drop):
    return _forward(cfg, q, k, v, bias, mask, drop)[0]


def _attention_fwd(cfg, q, k, v, bias, mask, drop):
    out, logsumexp = _forward(cfg, q, k, v, bias, mask, drop)
    return out, (q, k, v, bias, mask, drop, out, logsumexp)


def _attention_bwd(cfg, residuals, d_out):
    d_q, d_k, d_v, d_bias = _backward(cfg, residuals, d_out)
    return d_q, d_k, d_v, d_bias, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------- public


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Any = None,
    dropout_rate: Any = 0.0,
    deterministic: bool = False,
    dtype: DTypeLike | None = None,
    precision: Any = None,
    module: Any = None,
    *,
    is_causal: bool = False,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Any = None,
    qk_attn_weights_einsum: Any = None,
    attn_weights_value_einsum: Any = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> jax.Array:
    """Dot-product attention (Vaswani et al. 2017) with dropout, blockwise, in O(T) memory.

    With ``S = q k^T / sqrt(D) + bias`` (masked entries set to ``finfo(float32).min``, as flax
    does), ``P = softmax(S)`` over the keys and ``m ~ Bernoulli(keep)`` per attention weight::

        train  out = (m * P / keep) v      eval (deterministic or rate 0)  out = P v

    ``m`` is ``jax.random.bernoulli(dropout_rng, 1 - dropout_rate, shape)``, exactly the mask
    ``flax.linen.dot_product_attention`` draws for the same ``dropout_rng``: ``shape`` is
    ``(batch..., heads, Tq, Tk)``, or ``(1, ..., 1, Tq, Tk)`` (one mask for every batch row and head)
    with ``broadcast_dropout=True``. ``keep`` is the realised keep probability
    ``ceil((1 - rate) * 2**23) / 2**23`` (within ``2**-23`` of flax's ``1 - rate``), so the output
    is unbiased exactly. Same arguments as flax's function: it is a drop-in ``attention_fn`` for
    ``flax.linen.MultiHeadDotProductAttention`` and ``flax.nnx.MultiHeadAttention``, and gives
    their outputs for the same rngs, to float rounding.

    How it differs from flax's: the ``(Tq, Tk)`` logits are visited one ``(block_q, block_k)``
    tile at a time with an online softmax (Rabe & Staats 2021; Dao et al. 2022, FlashAttention),
    each tile drawing its part of the mask by global element index (:func:`jdrop.masks.bits_at`);
    the backward pass (a ``jax.custom_vjp`` whose residuals are q, k, v, the output, the per-row
    logsumexp, kept as its max and log-sum, and the key) recomputes each tile's probabilities and
    mask. No ``Tq x Tk`` array is stored or built, so a training step's temporary memory grows
    linearly in the length, and results do not depend on the tile sizes (up to float rounding). It
    is plain JAX (``lax`` loops), so XLA compiles it for CPU, GPU and TPU.

    Grouped-query and multi-query attention: ``key`` and ``value`` may have fewer heads than
    ``query`` (a divisor of its heads); query head ``h`` attends with key/value head
    ``h // (q_heads // kv_heads)``, as ``flax.nnx`` and repeating the key/value heads do.

    Args:
      query: ``(batch..., Tq, heads, D)``, floating (float16, bfloat16, float32, float64).
      key: ``(batch..., Tk, kv_heads, D)``.
      value: ``(batch..., Tk, kv_heads, Dv)``.
      bias: added to the logits, broadcastable to ``(batch..., heads, Tq, Tk)``; differentiable.
      mask: bool, broadcastable to ``(batch..., heads, Tq, Tk)``; False entries are masked out. A row
        masked entirely gets a uniform softmax over its keys, as in flax.
      broadcast_dropout: one dropout mask for all batch rows and heads (flax's default).
      dropout_rng: a threefry PRNG key (``jax.random.key`` or ``PRNGKey``; other implementations
        have no counter-based bits and raise ``ValueError``). Needed in training when the rate is
        not statically 0.
      dropout_rate: drop probability in [0, 1], a Python float or a traced scalar (one compilation
        serves all rates; a traced rate outside [0, 1] makes the output NaN). 1 gives zeros.
      deterministic: evaluation mode (no dropout; the rng is ignored). A Python bool.
      dtype: the dtype of the inputs and output (default: their promoted dtype). Products
        accumulate, and the softmax runs, in at least float32 whatever the dtype.
      precision: ``lax.Precision`` of the products.
      module: a flax module to sow the attention weights into (flax's ``sow_weights=True``): the
        softmax probabilities (before dropout) are then computed apart, as a full
        ``(batch..., heads, Tq, Tk)`` array, and sown as ``"attention_weights"`` (``"intermediates"``
        in linen, ``nnx.Intermediate`` in nnx); the output still comes from the blockwise kernel.
      is_causal: attend only to keys ``k <= q`` (flax.nnx's ``is_causal``), without building a mask;
        without a ``mask``, the tiles above the diagonal are skipped.
      force_fp32_for_softmax: accepted for flax compatibility; the softmax always runs in float32.
      einsum_dot_general: must be None (custom products, e.g. AQT, need flax's own attention).
      qk_attn_weights_einsum: must be None.
      attn_weights_value_einsum: must be None.
      block_q: query rows per tile (tuning only: results do not depend on it).
      block_k: key columns per tile.

    Returns:
      ``(batch..., Tq, heads, Dv)`` in ``dtype``.

    Raises:
      ValueError: for a bad ``dropout_rate``, a missing or non-threefry ``dropout_rng`` in training,
        mismatched shapes, custom einsums, or non-positive block sizes.

    Example::

      >>> q = k = v = jnp.ones((2, 1024, 8, 64))
      >>> out = jdrop.dot_product_attention(q, k, v, dropout_rng=jax.random.key(0), dropout_rate=0.1)
      >>> layer = flax.linen.MultiHeadDotProductAttention(8, dropout_rate=0.1,
      ...                                                 attention_fn=jdrop.dot_product_attention)
    """
    del force_fp32_for_softmax  # the softmax always runs in (at least) float32 here
    if einsum_dot_general is not None or qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
        raise ValueError(
            "jdrop.dot_product_attention computes its own blockwise products: custom einsums or dot_generals "
            "(einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum, e.g. for AQT) are not "
            "supported; use flax.linen.dot_product_attention for them."
        )
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
            raise ValueError(f"`{name}` must be a positive int, got {block!r}.")
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(
            f"`deterministic` must be a Python bool (static), got {type(deterministic).__name__}."
        )
    query = check_float_input(query, name="query")
    key = check_float_input(key, name="key")
    value = check_float_input(value, name="value")
    dtype = jnp.result_type(query, key, value) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    _check_shapes(query, key, value)
    rate = check_rate(dropout_rate, name="dropout_rate")
    train = not deterministic and not (isinstance(rate, float) and rate == 0.0)
    drop = None
    if train:
        drop = _dropout_arguments(dropout_rng, rate, dtype)

    batch_shape, (q_length, q_heads, depth) = tuple(query.shape[:-3]), query.shape[-3:]
    k_length, kv_heads = key.shape[-3], key.shape[-2]
    batch = math.prod(batch_shape)
    group = q_heads // kv_heads
    block_q, block_k = min(int(block_q), q_length), min(int(block_k), k_length)
    n_q, n_k = -(-q_length // block_q), -(-k_length // block_k)
    if drop is not None and (batch * q_heads * q_length if not broadcast_dropout else q_length) >= _UINT32_LIMIT:
        raise ValueError("the dropout mask has 2**32 rows or more; split the batch.")

    if module is not None:
        _sow_weights(module, query, key, bias, mask, is_causal)

    # Scale q once (as flax does) so that the kernel works on plain products.
    query = query / jnp.sqrt(depth).astype(dtype)
    q = query.reshape(batch, q_length, kv_heads, group, depth).transpose(0, 2, 3, 1, 4)
    q = _pad_axis(q, 3, n_q * block_q).reshape(batch, kv_heads, group, n_q, block_q, depth).transpose(3, 0, 1, 2, 4, 5)
    k = _to_tiles(key.reshape(batch, k_length, kv_heads, depth), n_k, block_k)
    v = _to_tiles(value.reshape(batch, k_length, kv_heads, value.shape[-1]), n_k, block_k)
    layout = (kv_heads, group, q_length, k_length, n_q * block_q, n_k * block_k)
    internal_bias = None if bias is None else _internal(jnp.asarray(bias), batch_shape, layout, "bias")
    internal_mask = None if mask is None else _internal(jnp.asarray(mask).astype(bool), batch_shape, layout, "mask")
    cfg = _Config(
        q_length=q_length,
        k_length=k_length,
        block_q=block_q,
        block_k=block_k,
        q_heads=q_heads,
        group=group,
        causal=bool(is_causal),
        skip_causal=bool(is_causal) and mask is None,
        dropout="none" if drop is None else ("broadcast" if broadcast_dropout else "element"),
        bias_full=() if internal_bias is None else tuple(d > 1 for d in internal_bias.shape),
        precision=precision,
    )
    out = _attention(cfg, q, k, v, internal_bias, internal_mask, drop)
    # (nq, B, Hk, G, bq, Dv) -> (batch..., Tq, Hq, Dv)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, n_q * block_q, q_heads, -1)[:, :q_length]
    return out.reshape(*batch_shape, q_length, q_heads, out.shape[-1])


def _check_shapes(query: jax.Array, key: jax.Array, value: jax.Array) -> None:
    if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
        raise ValueError(
            "query, key and value must have the same rank, at least 3 ((batch..., length, heads, depth)); got "
            f"shapes {query.shape}, {key.shape}, {value.shape}."
        )
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        raise ValueError(f"query, key and value batch dims must match, got {query.shape}, {key.shape}, {value.shape}.")
    if key.shape[-3] != value.shape[-3] or key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value lengths and heads must match, got {key.shape} and {value.shape}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key depths must match, got {query.shape[-1]} and {key.shape[-1]}.")
    if key.shape[-2] == 0 or query.shape[-2] % key.shape[-2]:
        raise ValueError(
            f"query heads ({query.shape[-2]}) must be a multiple of key/value heads ({key.shape[-2]}) "
            "for grouped-query attention."
        )
    if query.shape[-3] == 0 or key.shape[-3] == 0:
        raise ValueError(f"query and key lengths must be positive, got {query.shape[-3]} and {key.shape[-3]}.")


def _dropout_arguments(dropout_rng: Any, rate: float | jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(key_data, threshold, factor)`` for a training pass; ``factor`` is ``1/keep`` (0 at rate 1, NaN if invalid)."""
    if dropout_rng is None:
        raise ValueError(
            "jdrop.dot_product_attention needs `dropout_rng` in training mode (dropout_rate > 0): pass "
            "dropout_rng=jax.random.key(seed), or deterministic=True for evaluation."
        )
    rng = masks.canonical_key(dropout_rng, name="dropout_rng")
    if rng.shape != ():
        raise ValueError(f"`dropout_rng` must be a single key (shape ()), got a key array of shape {rng.shape}.")
    impl = str(jax.random.key_impl(rng))
    if impl != "threefry2x32":
        raise ValueError(
            f"`dropout_rng` must be a threefry key (jax.random.key(seed), the default), got a {impl} key: the "
            "dropout mask is drawn tile by tile from counter-based bits, which only threefry has. For other "
            "generators use jdrop.attention_dropout on probabilities you compute yourself."
        )
    threshold = masks.keep_threshold(keep_probability(rate))
    _, factor = keep_and_factor(rate, dtype=jnp.promote_types(dtype, jnp.float32))
    return jax.random.key_data(rng), threshold, factor


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _to_tiles(x: jax.Array, n: int, block: int) -> jax.Array:
    """``(B, T, H, D)`` -> ``(n, B, H, block, D)``, padded with zeros to ``n * block`` rows."""
    batch, _, heads, depth = x.shape
    x = _pad_axis(x, 1, n * block)
    return x.reshape(batch, n, block, heads, depth).transpose(1, 0, 3, 2, 4)


def _internal(array: jax.Array, batch_shape: tuple[int, ...], layout: tuple[int, ...], name: str) -> jax.Array:
    """A mask or bias broadcastable to ``(batch..., Hq, Tq, Tk)`` as ``(B|1, Hk|1, G|1, Tq_pad|1, Tk_pad|1)``.

    Axes of size 1 stay 1 (broadcast inside the kernel); the length axes are padded to whole tiles.
    """
    kv_heads, group, q_length, k_length, q_padded, k_padded = layout
    rank = len(batch_shape) + 3
    if array.ndim > rank:
        raise ValueError(f"`{name}` of shape {array.shape} has more dims than (batch..., heads, Tq, Tk).")
    array = array.reshape((1,) * (rank - array.ndim) + array.shape)
    heads, rows, cols = array.shape[-3:]
    for size, full, axis in zip((heads, rows, cols), (kv_heads * group, q_length, k_length), ("heads", "Tq", "Tk")):
        if size not in (1, full):
            raise ValueError(f"`{name}` of shape {array.shape} does not broadcast to {axis}={full}.")
    if all(d == 1 for d in array.shape[:-3]):
        array = array.reshape(1, heads, rows, cols)
    else:
        array = jnp.broadcast_to(array, (*batch_shape, heads, rows, cols)).reshape(-1, heads, rows, cols)
    split = (kv_heads, group) if heads > 1 else (1, 1)
    array = array.reshape(array.shape[0], *split, rows, cols)
    if rows > 1:
        array = _pad_axis(array, 3, q_padded)
    if cols > 1:
        array = _pad_axis(array, 4, k_padded)
    return array


def _sow_weights(module: Any, query: jax.Array, key: jax.Array, bias: Any, mask: Any, is_causal: bool) -> None:
    """Sows flax's attention weights (softmax before dropout) into ``module``, built in full as flax does."""
    group = query.shape[-2] // key.shape[-2]
    key = jnp.repeat(key, group, axis=-2)
    logits = jnp.einsum("...qhd,...khd->...hqk", query / jnp.sqrt(query.shape[-1]).astype(query.dtype), key,
                        preferred_element_type=jnp.promote_types(query.dtype, jnp.float32))
    if bias is not None:
        logits = logits + bias
    allowed = None if mask is None else jnp.asarray(mask).astype(bool)
    if is_causal:
        causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits).astype(query.dtype)
    from flax import nnx  # only a flax module asks to sow

    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:
        module.sow("intermediates", "attention_weights", weights)
