"""The blockwise kernel: tiles, online-softmax forward, forward-mode pass, FlashAttention-2 backward, their custom rule.

Everything here works in the kernel layout of :mod:`jdrop.attention._layout`: queries
``(nq, B, Hk, G, bq, D)`` and keys/values ``(nk, B, Hk, bk, D)`` in whole tiles, a mask or bias as
``(B|1, Hk|1, G|1, Tq|1, Tk|1)`` padded to whole tiles. :func:`forward` and :func:`backward` each
handle one (query block, key block) pair whose global position in the attention matrix is given
by :class:`Offsets` (traced scalars allowed), and :class:`Config` holds the global shape of the
dropout mask apart from the local lengths: a shard of queries meeting a block of keys that lives
elsewhere draws exactly its part of flax's mask and applies causal masking by global position.
Sequence-parallel (ring) attention can compose these functions across devices as
:func:`attention` composes them for one device.
"""

from __future__ import annotations

import enum
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jdrop import masks
from jdrop._dropout import keep_and_factor
from jdrop._linear import linear_map
from jdrop._shard_map import cotangent_like, vary_like, varying_axes
from jdrop._validation import keep_probability
from jdrop.attention import _dropout_mask

__all__ = [
    "Config",
    "Drop",
    "DropoutMode",
    "LogSumExp",
    "Offsets",
    "ORIGIN",
    "Operands",
    "Tangent",
    "attention",
    "backward",
    "delta",
    "dropout_operands",
    "forward",
    "output_tangent",
    "reverse_only",
    "tangent",
    "whole_call",
]

Drop = tuple[jax.Array, jax.Array, jax.Array]
"""A training pass's dropout operands: ``(key_data, threshold, factor)``."""


class DropoutMode(enum.Enum):
    """Which dropout mask the kernel draws."""

    NONE = "none"
    BROADCAST = "broadcast"  # one (Tq, Tk) mask for every batch row and head: flax's broadcast_dropout=True
    PER_ELEMENT = "per_element"  # one (B, Hq, Tq, Tk) mask: broadcast_dropout=False


class Config(NamedTuple):
    """Static description of one block pair (hashable: the custom rules' non-differentiable argument)."""

    block_q: int
    block_k: int
    k_length: int  # real keys in the local key block; the arrays are padded to whole tiles
    group: int  # query heads per key/value head
    causal: bool  # by global position: key column <= query row
    skip_causal: bool  # visit only the tiles on or below the diagonal (no user mask: no fully masked row)
    dropout: DropoutMode
    dropout_shape: tuple[int, int, int, int]  # GLOBAL shape of flax's mask: (B, Hq, Tq, Tk) or (1, 1, Tq, Tk)
    bias_full: tuple[bool, ...]  # per internal axis (batch, kv head, group, q, k): does the bias vary along it?
    precision: Any
    mask: str = "exact"  # which dropout mask the tiles draw: "exact" (flax's) or a cheaper one (see _dropout_mask)


class Offsets(NamedTuple):
    """Global position of a block pair: its first query row, key column, batch row and query head.

    Python ints (the default 0s: the block pair is the whole attention matrix) or traced integer scalars.
    """

    q: Any = 0
    k: Any = 0
    batch: Any = 0
    head: Any = 0


ORIGIN = Offsets()
"""The block pair at the origin: the whole attention matrix of one call."""


class Operands(NamedTuple):
    """A block pair's inputs in the kernel layout."""

    q: jax.Array  # (nq, B, Hk, G, bq, D), already scaled by 1/sqrt(D)
    k: jax.Array  # (nk, B, Hk, bk, D)
    v: jax.Array  # (nk, B, Hk, bk, Dv)
    bias: jax.Array | None
    mask: jax.Array | None
    drop: Drop | None


class LogSumExp(NamedTuple):
    """Each query row's logsumexp as its two parts, ``(nq, B, Hk, G, bq)`` each.

    Their sum would round ``log(Tk)`` away for a fully masked row (logits ``finfo.min``), whose
    probabilities the backward pass must still find uniform.
    """

    row_max: jax.Array
    log_row_sum: jax.Array


def dropout_operands(key: jax.Array, rate: float | jax.Array, dtype: Any) -> Drop:
    """``(key_data, threshold, factor)`` of a training pass; ``factor`` is ``1/keep`` (0 at rate 1, NaN if invalid)."""
    threshold = masks.keep_threshold(keep_probability(rate))
    _, factor = keep_and_factor(rate, dtype=jnp.promote_types(dtype, jnp.float32))
    return jax.random.key_data(key), threshold, factor


# ----------------------------------------------------------------------------------- one tile


def _is_zero(offset: Any) -> bool:
    return isinstance(offset, int) and offset == 0


def _shift(x: Any, offset: Any) -> Any:
    """``x + offset``, skipping a static zero offset (so the one-block program is unchanged)."""
    return x if _is_zero(offset) else x + offset


def _dot(cfg: Config, a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """Matmul batched over the two leading (batch, kv head) axes, accumulating in at least float32."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    dims = (((contract[0],), (contract[1],)), ((0, 1), (0, 1)))
    return lax.dot_general(a, b, dims, precision=cfg.precision, preferred_element_type=acc)


def _tile(cfg: Config, array: jax.Array, i: Any, j: Any) -> jax.Array:
    """Local tile (i, j) of a mask or bias of internal rank 5, whose q and k axes are full (padded) or 1."""
    start = (0, 0, 0, i * cfg.block_q if array.shape[3] > 1 else 0, j * cfg.block_k if array.shape[4] > 1 else 0)
    sizes = (*array.shape[:3], min(array.shape[3], cfg.block_q), min(array.shape[4], cfg.block_k))
    return lax.dynamic_slice(array, start, sizes)


def _scores(cfg: Config, ops: Operands, q_i: jax.Array, k_j: jax.Array, i: Any, j: Any,
            offsets: Offsets) -> tuple[jax.Array, jax.Array | None]:
    """Logits of local tile (i, j): ``(B, Hk, G, bq, bk)``, masked as flax masks them, and the mask (or None).

    ``q_i`` is ``(B, Hk, G, bq, D)``, ``k_j`` is ``(B, Hk, bk, D)``. Masked entries get
    ``finfo(float32).min`` (flax's big negative, so a fully masked row is uniform, as in flax); the
    padding columns past ``k_length`` get ``-inf`` so that they never count. The causal test
    compares global positions.
    """
    batch, kv_heads, group, bq, depth = q_i.shape
    s = _dot(cfg, q_i.reshape(batch, kv_heads, group * bq, depth), k_j, (3, 3))
    s = s.reshape(batch, kv_heads, group, bq, cfg.block_k)
    if ops.bias is not None:
        s = s + _tile(cfg, ops.bias, i, j).astype(s.dtype)
    cols = j * cfg.block_k + lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)  # local
    allowed = None if ops.mask is None else _tile(cfg, ops.mask, i, j)
    if cfg.causal:
        rows = _shift(i * cfg.block_q + lax.broadcasted_iota(jnp.int32, (bq, 1), 0), offsets.q)
        causal = _shift(cols, offsets.k) <= rows
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        s = jnp.where(allowed, s, jnp.finfo(s.dtype).min)
    if cfg.k_length % cfg.block_k:
        s = jnp.where(cols < cfg.k_length, s, -jnp.inf)
    return s, allowed


def _mask_rows(cfg: Config, heads: tuple[int, int], rows: jax.Array, offsets: Offsets) -> jax.Array:
    """Global rows of flax's dropout mask, ``cfg.dropout_shape`` (global, unpadded) viewed as ``(B * Hq * Tq, Tk)``.

    ``rows`` is ``(n, 1)`` ``uint32`` query rows; ``heads`` is the block's local ``(batch, kv_heads)``: per-head
    dropout folds the batch row and query head in, ``(B, Hk, G, n, 1)``. With the global columns this is the
    index a tile draws its mask by (:func:`jdrop.attention._dropout_mask.tile_keep_at`), so a tile draws
    exactly that array's bits. Padding rows and columns get indices too (they alias other elements) but
    their values are never used. The column index varies along the minor axis, so the exact and fast masks'
    threefry chain is never loop-invariant in the innermost loop of a fusion (the compile hazard of AVX-512's
    vectorizer, see jdrop.masks); hash8's per-group threefry is invariant along the columns, and compiles in
    seconds under the forced interleaving that exposed the hazard (tests/compile_programs.py,
    ``attention-cheap-masks``).
    """
    _, q_heads, q_length, _ = cfg.dropout_shape
    if cfg.dropout == DropoutMode.PER_ELEMENT:
        shape = (*heads, cfg.group, 1, 1)
        example = _shift(lax.broadcasted_iota(jnp.uint32, shape, 0), _uint32(offsets.batch))
        head = _shift(lax.broadcasted_iota(jnp.uint32, shape, 1) * np.uint32(cfg.group)
                      + lax.broadcasted_iota(jnp.uint32, shape, 2), _uint32(offsets.head))
        rows = (example * np.uint32(q_heads) + head) * np.uint32(q_length) + rows
    return rows


def _uint32(offset: Any) -> Any:
    return offset if isinstance(offset, int) else jnp.asarray(offset).astype(jnp.uint32)


def _dropout_factors(cfg: Config, drop: Drop, heads: tuple[int, int], row0: Any, n_rows: int, col0: Any,
                     n_cols: int, offsets: Offsets) -> jax.Array:
    """Factors of the probabilities in local rows ``row0 + [0, n_rows)`` x local columns ``col0 + [0, n_cols)``.

    ``1/keep`` where the mask keeps, 0 where it drops (NaN everywhere for an invalid traced rate);
    ``(n_rows, n_cols)`` for broadcast dropout, ``(B, Hk, G, n_rows, n_cols)`` otherwise.
    """
    key_data, threshold, factor = drop
    rows = _shift(row0 + _dropout_mask.first_rows(n_rows, cfg.mask), offsets.q).astype(jnp.uint32)
    cols = _shift(col0 + lax.broadcasted_iota(jnp.int32, (1, n_cols), 1), offsets.k).astype(jnp.uint32)
    n_batch, q_heads, q_length, k_length = cfg.dropout_shape
    keep = _dropout_mask.tile_keep_at(key_data, _mask_rows(cfg, heads, rows, offsets), cols, k_length,
                                      n_batch * q_heads * q_length, threshold, cfg.mask)
    return jnp.where(keep, factor, 0 * factor)  # dropped: 0, or NaN with the factor (as in the core)


def _shared_factors(cfg: Config, ops: Operands, row0: Any, n_rows: int, col0: Any, n_cols: int,
                    offsets: Offsets) -> jax.Array | None:
    """Broadcast dropout's factors for a whole row (or column) of tiles, drawn outside the inner loop.

    Computed before the loop over tiles, they cross its boundary and so are stored (``n_rows x n_cols``
    floats, O(T x block)): XLA would otherwise fuse the threefry into each tile's consumer, whose
    elements are the tile broadcast over all batch rows and heads, and draw it once per (batch, head).
    """
    if ops.drop is None or cfg.dropout != DropoutMode.BROADCAST:
        return None
    heads = (ops.q.shape[1], ops.q.shape[2])
    return _dropout_factors(cfg, ops.drop, heads, row0, n_rows, col0, n_cols, offsets)


def _visible_k_blocks(cfg: Config, i: Any, n_k: int, offsets: Offsets) -> Any:
    """Number of key tiles query tile ``i`` sees: all, or those that start on or below the causal diagonal.

    Zero or less (the loop then runs no step) for a key block entirely above the diagonal.
    """
    if not cfg.skip_causal:
        return n_k
    last_row = _shift(_shift((i + 1) * cfg.block_q - 1, offsets.q), -offsets.k)  # relative to the key block
    return jnp.minimum(n_k, last_row // cfg.block_k + 1)


def _first_q_block(cfg: Config, j: Any, offsets: Offsets) -> Any:
    """First query tile that sees key tile ``j`` (past the last one for a key block above the diagonal)."""
    if not cfg.skip_causal:
        return 0
    first = _shift(_shift(j * cfg.block_k, offsets.k), -offsets.q) // cfg.block_q  # relative to the query block
    return first if _is_zero(offsets.q) and _is_zero(offsets.k) else jnp.maximum(first, 0)


def _tile_loop(lower: Any, upper: Any, n: int, step: Any, init: Any) -> Any:
    """``lax.fori_loop(lower, upper, step, init)`` over tiles ``[lower, upper)`` of ``[0, n)``.

    Causal skipping makes a bound traced, and reverse mode cannot differentiate a loop with traced
    bounds, which second derivatives need (``jax.grad`` of ``jax.grad`` differentiates the custom rule's
    forward and backward passes themselves). So a traced range runs as ``n`` static steps, each a
    ``lax.cond`` that skips the tiles outside the range: they are still not computed (the branch is
    not taken), and the loop differentiates any number of times.
    """
    if isinstance(lower, int) and isinstance(upper, int):
        return lax.fori_loop(lower, upper, step, init)

    def body(t: Any, carry: Any) -> Any:
        return lax.cond((t >= lower) & (t < upper), lambda c: step(t, c), lambda c: c, carry)

    return lax.fori_loop(0, n, body, init)


# ----------------------------------------------------------------------------------- forward


def _forward_step(cfg: Config, ops: Operands, i: Any, q_i: jax.Array, j: Any, shared: jax.Array | None,
                  offsets: Offsets, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
    """One online-softmax step: query tile ``i`` meets key tile ``j``; ``carry`` is (row max, row sum, P~ V)."""
    row_max, row_sum, acc = carry
    batch, kv_heads, group, bq, _ = q_i.shape
    k_j, v_j = ops.k[j], ops.v[j]
    s, _ = _scores(cfg, ops, q_i, k_j, i, j, offsets)
    new_max = jnp.maximum(row_max, s.max(axis=-1))
    # A row whose logits so far are all -inf (a -inf bias) keeps a finite reference point.
    safe_max = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
    p = jnp.exp(s - safe_max[..., None])
    correction = jnp.exp(row_max - safe_max)
    row_sum = row_sum * correction + p.sum(axis=-1)
    if shared is not None:
        p = p * lax.dynamic_slice_in_dim(shared, j * cfg.block_k, cfg.block_k, axis=1)
    elif ops.drop is not None:
        p = p * _dropout_factors(cfg, ops.drop, (batch, kv_heads), i * cfg.block_q, cfg.block_q, j * cfg.block_k,
                                 cfg.block_k, offsets)
    pv = _dot(cfg, p.astype(v_j.dtype).reshape(batch, kv_heads, group * bq, -1), v_j, (3, 2))
    acc = acc * correction[..., None] + pv.reshape(acc.shape)
    return new_max, row_sum, acc


def forward(cfg: Config, ops: Operands, offsets: Offsets = ORIGIN, *,
            out_dtype: Any = None) -> tuple[jax.Array, LogSumExp]:
    """Blockwise forward of one block pair: ``(out, logsumexp)``, tile-major.

    Returns ``out`` ``(nq, B, Hk, G, bq, Dv)`` in ``out_dtype`` (default ``q``'s dtype; a caller
    that combines several key blocks asks for the float32 accumulator so that it rounds once),
    normalised over this key block, and each row's :class:`LogSumExp` over this key block, from
    which outputs over several key blocks combine (online softmax across blocks).
    """
    out_dtype = ops.q.dtype if out_dtype is None else out_dtype
    n_k = ops.k.shape[0]
    batch, kv_heads, group, bq, _ = ops.q.shape[1:]
    acc_dtype = jnp.promote_types(ops.q.dtype, jnp.float32)
    axes = varying_axes(ops, offsets)  # inside shard_map, the loop carries vary as the operands do

    def row_block(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        i, q_i = args
        shared = _shared_factors(cfg, ops, i * cfg.block_q, cfg.block_q, 0, n_k * cfg.block_k, offsets)
        init = vary_like((
            jnp.full((batch, kv_heads, group, bq), -jnp.inf, acc_dtype),
            jnp.zeros((batch, kv_heads, group, bq), acc_dtype),
            jnp.zeros((batch, kv_heads, group, bq, ops.v.shape[-1]), acc_dtype),
        ), axes)
        step = partial(_forward_step, cfg, ops, i, q_i, shared=shared, offsets=offsets)
        row_max, row_sum, acc = _tile_loop(0, _visible_k_blocks(cfg, i, n_k, offsets), n_k,
                                           lambda j, carry: step(j, carry=carry), init)
        out = (acc / row_sum[..., None]).astype(out_dtype)
        return out, (row_max, jnp.log(row_sum))

    out, (row_max, log_row_sum) = lax.map(row_block, (jnp.arange(ops.q.shape[0]), ops.q))
    return out, LogSumExp(row_max, log_row_sum)


# ----------------------------------------------------------------------------------- backward


def delta(out: jax.Array, d_out: jax.Array) -> jax.Array:
    """``rowsum(dO * O)`` = ``rowsum(dP~ * P~)``: the softmax backward's per-row term, dropout included.

    Computed once from the final output of all key blocks, in at least float32.
    """
    acc_dtype = jnp.promote_types(out.dtype, jnp.float32)
    return jnp.sum(d_out.astype(acc_dtype) * out.astype(acc_dtype), axis=-1)


def _add_bias_tile(cfg: Config, d_bias: jax.Array, ds: jax.Array, i: Any, j: Any) -> jax.Array:
    """Adds tile (i, j)'s logit gradient into ``d_bias``, summed over the axes the bias broadcasts along."""
    axes = tuple(axis for axis, full in enumerate(cfg.bias_full) if not full)
    contribution = ds.sum(axis=axes, keepdims=True) if axes else ds
    start = (0, 0, 0, i * cfg.block_q if cfg.bias_full[3] else 0, j * cfg.block_k if cfg.bias_full[4] else 0)
    current = lax.dynamic_slice(d_bias, start, contribution.shape)
    return lax.dynamic_update_slice(d_bias, current + contribution, start)


class _Cotangents(NamedTuple):
    """What the backward pass of one block pair reads besides the operands (tile-major like ``q``)."""

    d_out: jax.Array  # (nq, B, Hk, G, bq, Dv), in q's dtype
    logsumexp: LogSumExp
    delta: jax.Array  # (nq, B, Hk, G, bq)


def _backward_step(cfg: Config, ops: Operands, cot: _Cotangents, i: Any, column: tuple[Any, jax.Array, jax.Array],
                   shared: jax.Array | None, offsets: Offsets, carry: tuple[Any, ...]) -> tuple[Any, ...]:
    """Query tile ``i`` meets key tile ``j`` (``column`` is ``(j, k_j, v_j)``): adds into (dK_j, dV_j, dQ, dbias)."""
    d_k, d_v, d_q, d_bias = carry
    j, k_j, v_j = column
    q_i, do_i = ops.q[i], cot.d_out[i]
    batch, kv_heads, group, bq, depth = q_i.shape
    s, allowed = _scores(cfg, ops, q_i, k_j, i, j, offsets)
    shifted = s - cot.logsumexp.row_max[i][..., None]
    p = jnp.exp(shifted - cot.logsumexp.log_row_sum[i][..., None])
    dp = _dot(cfg, do_i.reshape(batch, kv_heads, group * bq, -1), v_j, (3, 3)).reshape(p.shape)
    # dS = P * (dP~ * factors - delta) = P~ * dP~ - P * delta with P~ = P * factors: the factors are
    # used once. Broadcast dropout's factors are stored (drawn once per column of tiles): a multiply
    # reads them. Per-element factors are drawn here: P~ = exp(S - L + log(factors)) ends in an exp, an
    # op XLA will not duplicate, so the dV product and dS share one P~ and the tile's mask is drawn once.
    if shared is not None:
        p_dropped = p * lax.dynamic_slice_in_dim(shared, i * bq, bq, axis=0)
    elif ops.drop is not None:
        factors = _dropout_factors(cfg, ops.drop, (batch, kv_heads), i * bq, bq, j * cfg.block_k, cfg.block_k,
                                   offsets)
        p_dropped = jnp.exp(shifted - cot.logsumexp.log_row_sum[i][..., None] + jnp.log(factors))
    else:
        p_dropped = p
    ds = p_dropped * dp - p * cot.delta[i][..., None]
    if ops.mask is not None and allowed is not None:
        # Masked logits are a constant: no gradient, even in a fully masked row (whose P is uniform).
        ds = jnp.where(allowed, ds, 0.0)
    rows = (batch, kv_heads, group * bq, cfg.block_k)
    d_v = d_v + _dot(cfg, p_dropped.astype(q_i.dtype).reshape(rows), do_i.reshape(batch, kv_heads, group * bq, -1),
                     (2, 2))
    d_k = d_k + _dot(cfg, ds.astype(q_i.dtype).reshape(rows), q_i.reshape(batch, kv_heads, group * bq, depth), (2, 2))
    d_q = d_q.at[i].add(_dot(cfg, ds.astype(q_i.dtype).reshape(rows), k_j, (3, 2)).reshape(q_i.shape))
    if d_bias is not None:
        d_bias = _add_bias_tile(cfg, d_bias, ds, i, j)
    return d_k, d_v, d_q, d_bias


def backward(cfg: Config, ops: Operands, d_out: jax.Array, logsumexp: LogSumExp, delta: jax.Array,
             offsets: Offsets = ORIGIN, *, grad_dtype: Any = None,
             bias_gradient: bool = True) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """FlashAttention-2 backward of one block pair: ``(dq, dk, dv, dbias)`` in the operands' dtypes.

    ``grad_dtype`` (default: each operand's dtype) is the dtype of all four instead: a caller that
    sums the gradients of several block pairs asks for the float32 accumulators. ``dbias`` is None
    without a bias, or with ``bias_gradient=False`` (a bias held constant: no bias-sized accumulator).

    One pass over key tiles, each visiting its query tiles. Each tile's probabilities are recomputed
    from the rows' ``logsumexp`` (over all key blocks, from :func:`forward`) and its dropout factors
    are drawn again from the key, so nothing of size ``Tq x Tk`` exists; ``delta`` is
    :func:`delta` of the final output. ``dK``, ``dV`` of a key tile accumulate in the inner loop;
    ``dQ`` (and ``dbias``) accumulate in place across the outer loop.
    """
    n_q, bq = ops.q.shape[0], cfg.block_q
    acc_dtype = jnp.promote_types(ops.q.dtype, jnp.float32)
    cot = _Cotangents(d_out.astype(ops.q.dtype), logsumexp, delta)
    k_dtype, v_dtype = (ops.k.dtype, ops.v.dtype) if grad_dtype is None else (grad_dtype, grad_dtype)
    axes = varying_axes(ops, offsets, d_out, logsumexp, delta)  # inside shard_map, the carries vary as these do

    def column_block(carry: tuple[Any, Any], column: tuple[Any, jax.Array, jax.Array]) -> tuple[Any, Any]:
        d_q, d_bias = carry
        j, k_j, v_j = column
        shared = _shared_factors(cfg, ops, 0, n_q * bq, j * cfg.block_k, cfg.block_k, offsets)
        step = partial(_backward_step, cfg, ops, cot, column=column, shared=shared, offsets=offsets)
        init = (*vary_like((jnp.zeros(k_j.shape, acc_dtype), jnp.zeros(v_j.shape, acc_dtype)), axes), d_q, d_bias)
        d_k, d_v, d_q, d_bias = _tile_loop(_first_q_block(cfg, j, offsets), n_q, n_q,
                                           lambda i, inner: step(i, carry=inner), init)
        return (d_q, d_bias), (d_k.astype(k_dtype), d_v.astype(v_dtype))

    d_bias = None if ops.bias is None or not bias_gradient else vary_like(jnp.zeros(ops.bias.shape, acc_dtype), axes)
    d_q = vary_like(jnp.zeros(ops.q.shape, acc_dtype), axes)
    (d_q, d_bias), (d_k, d_v) = lax.scan(column_block, (d_q, d_bias), (jnp.arange(ops.k.shape[0]), ops.k, ops.v))
    if d_bias is not None:
        d_bias = d_bias.astype(ops.bias.dtype if grad_dtype is None else grad_dtype)  # type: ignore[union-attr]
    return d_q.astype(ops.q.dtype if grad_dtype is None else grad_dtype), d_k, d_v, d_bias


# ----------------------------------------------------------------------------------- forward mode


class Tangent(NamedTuple):
    """The two sums of one block pair's output tangent (:func:`tangent`), tile-major like ``q``, in float32 or wider.

    ``dO = (weighted - c * O)`` where ``O`` is the final output over every key block: both terms sum over key
    blocks, so block pairs combine by adding them.
    """

    weighted: jax.Array  # (nq, B, Hk, G, bq, Dv): sum_j D_ij dV_j + (D * dS)_ij V_j
    c: jax.Array  # (nq, B, Hk, G, bq): sum_j P_ij dS_ij, the undropped probabilities


def _tangent_step(cfg: Config, ops: Operands, d_ops: Operands, i: Any, rows: tuple[jax.Array, ...],
                  lse: tuple[jax.Array, jax.Array], j: Any, shared: jax.Array | None, offsets: Offsets,
                  carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Query tile ``i`` (``rows``: its q and dq tiles) meets key tile ``j``: adds into ``(weighted, c)``."""
    weighted, c = carry
    q_i, dq_i = rows
    batch, kv_heads, group, bq, depth = q_i.shape
    k_j, v_j = ops.k[j], ops.v[j]
    s, allowed = _scores(cfg, ops, q_i, k_j, i, j, offsets)
    p = jnp.exp(s - lse[0][..., None] - lse[1][..., None])
    flat = (batch, kv_heads, group * bq, depth)
    ds = _dot(cfg, dq_i.reshape(flat), k_j, (3, 3)) + _dot(cfg, q_i.reshape(flat), d_ops.k[j], (3, 3))
    ds = ds.reshape(s.shape)
    if d_ops.bias is not None:
        ds = ds + _tile(cfg, d_ops.bias, i, j).astype(ds.dtype)
    if allowed is not None:
        ds = jnp.where(allowed, ds, 0.0)  # masked logits are a constant
    c = c + jnp.sum(p * ds, axis=-1)
    if shared is not None:
        p = p * lax.dynamic_slice_in_dim(shared, j * cfg.block_k, cfg.block_k, axis=1)
    elif ops.drop is not None:
        p = p * _dropout_factors(cfg, ops.drop, (batch, kv_heads), i * cfg.block_q, cfg.block_q, j * cfg.block_k,
                                 cfg.block_k, offsets)
    tile = (batch, kv_heads, group * bq, cfg.block_k)
    products = (_dot(cfg, p.astype(v_j.dtype).reshape(tile), d_ops.v[j], (3, 2))
                + _dot(cfg, (p * ds).astype(v_j.dtype).reshape(tile), v_j, (3, 2)))
    return weighted + products.reshape(weighted.shape), c


def tangent(cfg: Config, ops: Operands, d_ops: Operands, logsumexp: LogSumExp,
            offsets: Offsets = ORIGIN) -> Tangent:
    """Forward-mode FlashAttention of one block pair: the two sums of the output tangent, in O(T) memory.

    With ``S = q k^T + bias`` (``q`` already scaled), ``P = softmax(S)`` (undropped, from the rows' final
    ``logsumexp``), ``D = P * M / keep`` (``M`` the mask, drawn again tile by tile from the key, as in
    :func:`forward`) and ``O = D V``, the tangents ``d_ops`` (``dq``, ``dk``, ``dv``, ``dbias``; ``mask`` and
    ``drop`` unused) give::

        dS = dq k^T + q dk^T + dbias   (0 at masked logits)
        dO = D dV + (D * dS) V - c * O,   c_i = sum_j P_ij dS_ij

    One pass over the key tiles of each query tile (the tiles :func:`forward` visits) accumulates
    ``weighted = D dV + (D * dS) V`` and ``c``: :class:`Tangent`. The loops have static bounds (causal
    skipping by ``lax.cond``, :func:`_tile_loop`), so this function is JAX-transposable.
    """
    n_k = ops.k.shape[0]
    batch, kv_heads, group, bq, _ = ops.q.shape[1:]
    acc_dtype = jnp.promote_types(ops.q.dtype, jnp.float32)
    axes = varying_axes(ops, d_ops, logsumexp, offsets)

    def row_block(args: tuple[Any, ...]) -> Tangent:
        i, q_i, dq_i, row_max, log_row_sum = args
        shared = _shared_factors(cfg, ops, i * cfg.block_q, cfg.block_q, 0, n_k * cfg.block_k, offsets)
        init = vary_like((jnp.zeros((batch, kv_heads, group, bq, ops.v.shape[-1]), acc_dtype),
                          jnp.zeros((batch, kv_heads, group, bq), acc_dtype)), axes)
        step = partial(_tangent_step, cfg, ops, d_ops, i, (q_i, dq_i), (row_max, log_row_sum), shared=shared,
                       offsets=offsets)
        return Tangent(*_tile_loop(0, _visible_k_blocks(cfg, i, n_k, offsets), n_k,
                                   lambda j, carry: step(j, carry=carry), init))

    return lax.map(row_block, (jnp.arange(ops.q.shape[0]), ops.q, d_ops.q, *logsumexp))


def output_tangent(parts: Tangent, out: jax.Array) -> jax.Array:
    """``dO = weighted - c * O`` (:class:`Tangent`) in ``out``'s dtype, ``out`` the final output."""
    acc = parts.weighted.dtype
    return (parts.weighted - parts.c[..., None] * out.astype(acc)).astype(out.dtype)


# ----------------------------------------------------------------------------------- every mode of autodiff


def _float_tangents(ops: Operands, d_ops: Operands) -> tuple[Any, ...]:
    """The tangents of the differentiable operands: ``(dq, dk, dv)`` and ``dbias`` where there is a bias whose
    tangent is not a symbolic zero (a bias held constant has no leaf: neither pass computes its part)."""
    with_bias = ops.bias is not None and not isinstance(d_ops.bias, SymbolicZero)
    return (d_ops.q, d_ops.k, d_ops.v) + ((d_ops.bias,) if with_bias else ())


def _tangent_operands(tangents: tuple[jax.Array, ...]) -> Operands:
    d_q, d_k, d_v, *d_bias = tangents
    return Operands(d_q, d_k, d_v, d_bias[0] if d_bias else None, None, None)


def _attention_jvp_apply(cfg: Config, residuals: tuple[Any, ...], tangents: tuple[jax.Array, ...]) -> jax.Array:
    ops, out, logsumexp = residuals
    return output_tangent(tangent(cfg, ops, _tangent_operands(tangents), logsumexp), out)


def _attention_transpose(cfg: Config, residuals: tuple[Any, ...], d_out: jax.Array, *,
                         bias_gradient: bool = True) -> tuple[jax.Array, ...]:
    ops, out, logsumexp = residuals
    d_q, d_k, d_v, d_bias = backward(cfg, ops, d_out, logsumexp, delta(out, d_out), bias_gradient=bias_gradient)
    grads = cotangent_like(Operands(d_q, d_k, d_v, d_bias, None, None), ops)
    return (grads.q, grads.k, grads.v) + (() if grads.bias is None else (grads.bias,))


def attention(cfg: Config, ops: Operands) -> jax.Array:
    """Attention of the whole (one-block) problem, ``(nq, B, Hk, G, bq, Dv)``, differentiable in every mode.

    Forward mode runs :func:`tangent`; reverse mode keeps ``(ops, out, logsumexp)`` and runs :func:`backward`
    (:func:`jdrop._linear.linear_map`). The mask, the dropout operands (key, threshold, factor) are constants.
    Inside ``shard_map`` on sharded operands, reverse mode only (a ``custom_vjp`` around the same passes):
    ``lax.custom_linear_solve``, which carries the linear map, does not keep the mesh axes its operands vary
    along (JAX 0.10), so the forward-mode rule cannot run there.
    """
    if varying_axes(ops):
        return reverse_only(_vjp_attention, cfg, ops, where="inside jax.shard_map on sharded operands")
    return _every_mode(cfg, ops)


def _residuals(cfg: Config, ops: Operands) -> tuple[jax.Array, tuple[Any, ...]]:
    out, logsumexp = forward(cfg, ops)
    return out, (ops, out, logsumexp)


def _vjp_attention_bwd(cfg: Config, residuals: tuple[Any, ...], d_out: jax.Array) -> tuple[Operands]:
    grads = _attention_transpose(cfg, residuals, d_out)
    return (_tangent_operands(grads),)


_vjp_attention = jax.custom_vjp(lambda cfg, ops: forward(cfg, ops)[0], nondiff_argnums=(0,))
_vjp_attention.defvjp(_residuals, _vjp_attention_bwd)
_every_mode = jax.custom_jvp(lambda cfg, ops: forward(cfg, ops)[0], nondiff_argnums=(0,))


def reverse_only(fn: Any, *args: Any, where: str) -> Any:
    """``fn(*args)``, a ``custom_vjp``; forward-mode autodiff of it raises a ``TypeError`` that says ``where``
    attention is reverse mode only, and what to do.

    ``lax.custom_linear_solve``, which carries the forward-mode rule of :func:`attention`, does not keep the
    mesh axes its operands vary along inside ``jax.shard_map`` (JAX 0.10): there the attention is a
    ``custom_vjp`` around the same forward and backward passes (reverse mode and ``jax.hessian``).
    """
    try:
        return fn(*args)
    except TypeError as error:
        # JAX's refusal: "can't apply forward-mode autodiff (jvp) to a custom_vjp function"; inside shard_map,
        # JAX 0.10 fails earlier, hashing the call's parameters ("unhashable type: 'Unhashable'").
        if not any(sign in str(error) for sign in ("forward-mode autodiff", "'Unhashable'")):
            raise
        raise TypeError(f"jdrop.dot_product_attention {where} is differentiable in reverse mode only (jax.grad, "
                        "jax.vjp, jax.jacrev, and jax.hessian over them), not by jax.jvp / jax.jacfwd / "
                        "jax.linearize: take forward-mode derivatives of the attention outside jax.shard_map "
                        "(without axis_name), or use reverse mode.") from error


def whole_call(fn: Any) -> Any:
    """``fn(static, *args)`` as one opaque call (a ``custom_jvp`` differentiated by autodiff of ``fn`` itself).

    Reverse mode linearizes a ``custom_jvp`` rule by partial evaluation, whose scan rule hoists a loop's
    invariants (e.g. the dropout factors' broadcast operands) out of the loop into stored arrays; a call
    with a custom rule whose inputs are all known is staged whole, and compiles as ``fn`` alone does. The
    forward pass inside each attention rule is such a call.
    """
    wrapped = jax.custom_jvp(fn, nondiff_argnums=(0,))
    wrapped.defjvp(lambda static, primals, tangents: jax.jvp(partial(fn, static), primals, tangents))
    return wrapped


_primal = whole_call(forward)


@partial(_every_mode.defjvp, symbolic_zeros=True)
def _attention_jvp(cfg: Config, primals: tuple[Operands], tangents: tuple[Operands]) -> tuple[jax.Array, jax.Array]:
    (ops,), (d_ops,) = primals, tangents
    out, logsumexp = _primal(cfg, ops)
    residuals = (ops, out, logsumexp)
    live = _float_tangents(ops, d_ops)
    transpose = partial(_attention_transpose, cfg, bias_gradient=len(live) == 4)
    apply = partial(_attention_jvp_apply, cfg)
    # The reference is transposed when the solve is built: rematerialised, that transpose recomputes the tiles
    # from the residuals instead of staging a scan that stores every tile's probabilities (dead code, but traced).
    return out, linear_map(apply, transpose, residuals, live, out,
                           reference=jax.checkpoint(apply))
