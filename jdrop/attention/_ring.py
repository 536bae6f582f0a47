"""Ring attention: the blockwise kernel composed across the devices of one mesh axis, flax's mask on each.

Every device of the axis holds a shard of the queries, keys and values along the sequence. The key/value
shards travel around the ring (``lax.ppermute`` to the next device, N steps); at each step a device
runs :func:`jdrop.attention._kernel.forward` on its queries and the shard it holds, at the shards'
global positions (:class:`~jdrop.attention._kernel.Offsets`), and combines the partial outputs by
their logsumexp (the online softmax across steps). The backward pass (``custom_vjp``) sends the
key/value shards around again together with their float32 gradient accumulators, which come home
after a full turn; every tile's probabilities and dropout mask are recomputed from the row
logsumexp and the key by global (row, column) index. Nothing of size ``T x T``, nor ``T / N x T``,
exists: per-device memory is that of one ``T / N`` attention plus the shards in flight (the next
key/value shard; in the backward pass also the travelling gradients and theirs in flight): about
twice a single device's memory per token, measured by ``benchmarks/sequence_parallel.py``.

Sequence layouts (how a device's shard maps to global positions; ``L`` local rows, ``N`` devices):

- ``"contiguous"``: device ``d`` holds ``[d L, (d + 1) L)``. Causal attention then skips the steps
  whose shard lies above the diagonal, but the work is unbalanced: at step ``s`` only devices
  ``d >= s`` have a block to do, so the ring takes ``N - 1/2`` block-times where ``N / 2`` would do.
- ``"zigzag"``: the sequence in ``2N`` chunks of ``L / 2``; device ``d`` holds chunks ``d`` and
  ``2N - 1 - d`` (Brandon et al. 2023's striping by chunk, as in zhuzilin/ring-flash-attention). At
  every step every device then does the same half block of causal work: its second query chunk
  against the held shard's first key chunk, plus one of the (first, first) or (second, second)
  chunk pairs. ``N / 2`` block-times for causal attention.

A device's shard is split into chunks (two for the zigzag layout and for causal contiguous shards,
see :func:`chunks_of`) and the kernel runs on (query chunk, key chunk) pairs, all of one shape, so
one compiled kernel serves every pair of a step (a loop over the pairs; with contiguous shards, a
``lax.cond`` skips a shard above the diagonal). The diagonal
step has its own kernel (causal tiles); off the diagonal every visited pair is entirely visible.

References: H. Liu, M. Zaharia, P. Abbeel, Ring attention with blockwise transformers for near-infinite
context, arXiv:2310.01889, 2023; W. Brandon et al., Striped attention: faster ring attention for causal
transformers, arXiv:2311.09431, 2023; T. Dao, FlashAttention-2, arXiv:2307.08691, 2023.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jdrop._shard_map import cotangent_like, vary_like, varying_axes
from jdrop._validation import check_choice
from jdrop.attention import _kernel as kernel
from jdrop.attention._checks import check_mesh_axis, check_sequence_shards, check_shard_follows
from jdrop.attention._kernel import Config, LogSumExp, Offsets, Operands
from jdrop.attention._layout import Layout

__all__ = ["SEQUENCE_LAYOUTS", "Ring", "attention", "chunk_starts", "chunks_of"]

SEQUENCE_LAYOUTS = ("contiguous", "zigzag")
"""How a device's shard of the sequence maps to global positions (see the module docstring)."""

QUERY, KEY, SHARED = "query", "key", "shared"
"""What a mask's or bias's local slice follows: the query chunk, the key chunk (it travels), or neither."""


class Ring(NamedTuple):
    """Static description of the ring (hashable: the custom_vjp's non-differentiable argument)."""

    axis_name: Any  # the mesh axis (or tuple of axes) the sequence is sharded over
    size: int  # devices on that axis
    layout: str  # one of SEQUENCE_LAYOUTS
    chunks: int  # per shard: 2 (the zigzag layout, or even lengths), else 1
    q_chunk: int  # real query rows per chunk (the local length / chunks)
    k_chunk: int
    bias_follows: str | None  # QUERY, KEY, SHARED, or None without a bias
    mask_follows: str | None
    batch_axis_name: Any  # mesh axes that shard the leading batch dim (None: not sharded)
    head_axis_name: Any  # mesh axes that shard the heads
    local_batch: int  # batch rows (all batch dims flattened) and query heads of this device
    local_heads: int

    @classmethod
    def plan(cls, axis_name: Any, layout: str, batch_axis_name: Any, head_axis_name: Any, local: Layout,
             bias: jax.Array | None, mask: jax.Array | None, causal: bool) -> Ring:
        """The ring of one call on local shards described by ``local``; checks what the ring supports."""
        size = check_mesh_axis(axis_name, name="axis_name")
        for other, name in ((batch_axis_name, "batch_axis_name"), (head_axis_name, "head_axis_name")):
            if other is not None:
                check_mesh_axis(other, name=name)
        layout = check_choice(layout, SEQUENCE_LAYOUTS, name="sequence_layout")
        layout = "contiguous" if size == 1 else layout  # one device holds the whole sequence, in order
        check_sequence_shards(local.q_length, local.k_length, devices=size, layout=layout, causal=causal)
        chunks = chunks_of(layout, size, local.q_length, local.k_length, causal)
        return cls(axis_name, size, layout, chunks, local.q_length // chunks, local.k_length // chunks,
                   _follows(bias, local, "bias"), _follows(mask, local, "mask"), batch_axis_name, head_axis_name,
                   local.batch, local.q_heads)

    def chunk_layout(self, local: Layout) -> Layout:
        """The kernel layout of one chunk of the local shards."""
        return local._replace(q_length=self.q_chunk, k_length=self.k_chunk, block_q=min(local.block_q, self.q_chunk),
                              block_k=min(local.block_k, self.k_chunk))

    def dropout_shape(self, local: Layout, per_element: bool) -> tuple[int, int, int, int]:
        """The global shape of flax's dropout mask: the whole sequence, and all batch rows and heads."""
        q_length, k_length = self.size * local.q_length, self.size * local.k_length
        if not per_element:
            return 1, 1, q_length, k_length
        batch = local.batch * (1 if self.batch_axis_name is None else lax.axis_size(self.batch_axis_name))
        heads = local.q_heads * (1 if self.head_axis_name is None else lax.axis_size(self.head_axis_name))
        return batch, heads, q_length, k_length

    def operands(self, chunk: Layout, query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None,
                 mask: jax.Array | None, drop: kernel.Drop | None) -> Operands:
        """Local ``(batch..., L, H, D)`` shards in the kernel layout, split into chunks (the leading axis)."""
        n, axis = self.chunks, query.ndim - 3
        return Operands(jax.vmap(chunk.query_tiles)(_split(query, n, axis)),
                        jax.vmap(chunk.key_tiles)(_split(key, n, axis)),
                        jax.vmap(chunk.key_tiles)(_split(value, n, axis)),
                        self._internal(chunk, bias, self.bias_follows), self._internal(chunk, mask, self.mask_follows),
                        drop)

    def _internal(self, chunk: Layout, array: jax.Array | None, follows: str | None) -> jax.Array | None:
        if array is None:
            return None
        array = array.reshape((1,) * (len(chunk.batch_shape) + 3 - array.ndim) + array.shape)
        if follows == SHARED:
            return chunk.internal(array)[None]
        return jax.vmap(chunk.internal)(_split(array, self.chunks, array.ndim - (1 if follows == KEY else 2)))

    def output(self, chunk: Layout, out: jax.Array) -> jax.Array:
        """The output back from the kernel layout: ``(chunks, nq, B, Hk, G, bq, Dv)`` -> ``(batch..., L, H, Dv)``."""
        out = jax.vmap(chunk.from_query_tiles)(out)
        return jnp.concatenate(list(out), axis=out.ndim - 4) if self.chunks > 1 else out[0]


def _split(x: jax.Array, n: int, axis: int) -> jax.Array:
    """``x`` with its ``axis`` cut into ``n`` equal chunks, stacked along a new leading axis."""
    x = x.reshape(*x.shape[:axis], n, x.shape[axis] // n, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _follows(array: jax.Array | None, local: Layout, name: str) -> str | None:
    """What a local mask or bias follows around the ring (QUERY, KEY or SHARED), after checking it can be sharded.

    A key axis of length 1 on a device that holds a single key may be that key's entry: it travels (for
    a bias shared by all keys, travelling changes nothing, not even the gradient, which sums over keys).
    """
    if array is None:
        return None
    check_shard_follows(array.shape, name=name)
    if array.ndim >= 2 and array.shape[-2] > 1:
        return QUERY
    if array.ndim >= 1 and array.shape[-1] > 1 or local.k_length == 1:
        return KEY
    return SHARED


def chunks_of(layout: str, devices: int, q_length: int, k_length: int, causal: bool) -> int:
    """Chunks per shard: two for the zigzag layout, and for causal contiguous shards of even length; else one.

    Causal attention runs two kernels (the diagonal step's and the others'); with each call covering
    half a shard their float32 temporaries are halved: 30% less memory per device for contiguous
    shards at N = 2 to 8 (``benchmarks/sequence_parallel.py``), for four calls per step instead of
    one. Without causal masking the halves save nothing (measured), and one device runs one call on
    its whole shard (a loop over chunk pairs would only add copies of its carries).
    """
    if devices == 1:
        return 1
    return 2 if layout == "zigzag" or (causal and q_length % 2 == 0 and k_length % 2 == 0) else 1


def chunk_starts(layout: str, size: int, device: Any, chunk: int, chunks: int) -> jax.Array:
    """Global first positions of ``device``'s ``chunks`` chunks of ``chunk`` rows each (``int32``)."""
    if layout == "zigzag":
        return jnp.stack([device * chunk, (2 * size - 1 - device) * chunk]).astype(jnp.int32)
    return (device * chunks * chunk + chunk * jnp.arange(chunks)).astype(jnp.int32)


def _offset(axis_name: Any, local: int) -> Any:
    """This device's first global index along a dim of ``local`` entries per device sharded over ``axis_name``."""
    return 0 if axis_name is None else lax.axis_index(axis_name) * local


# ----------------------------------------------------------------------------------- schedule


def _schedule(ring: Ring, cfg: Config, diagonal: bool, me: Any, src: Any) -> tuple[Any, Any, Any]:
    """The (query chunk, key chunk) pairs a device visits at one step, and whether each is visible.

    ``me`` holds the key/value shard of device ``src``. Without tile skipping (not causal, or causal
    with a user mask, whose fully masked rows see every key), every pair is visited. With it, the
    diagonal step (``src == me``) visits the pairs on or below the diagonal, and the other steps the
    pairs below it, each entirely visible (see the module docstring for the zigzag layout).

    Returns ``(query chunks, key chunks, visible)``: int32 arrays of one entry per pair, and a bool
    array, or None where every pair is visible (known at trace time).
    """
    n = ring.chunks
    if not cfg.skip_causal or diagonal:
        pairs = [(a, b) for a in range(n) for b in range(n) if not cfg.skip_causal or a >= b]
        return jnp.asarray([a for a, _ in pairs]), jnp.asarray([b for _, b in pairs]), None
    if ring.layout == "contiguous":  # the held shard lies entirely below the diagonal or above it
        pairs = [(a, b) for a in range(n) for b in range(n)]
        return (jnp.asarray([a for a, _ in pairs]), jnp.asarray([b for _, b in pairs]),
                jnp.full(len(pairs), src < me))
    # Zigzag: the second query chunk sees the held first key chunk; the held shard from an earlier
    # device is seen by the first query chunk too, one from a later device by the second one.
    same = jnp.where(src < me, 0, 1)
    return jnp.stack([jnp.int32(1), same]), jnp.stack([jnp.int32(0), same]), None


def _over_pairs(q_index: jax.Array, visible: Any, contribution: Any, skip: Any, add: Any, carry: Any) -> Any:
    """Adds ``contribution(p)`` (or ``skip()`` where pair ``p`` is not visible) into ``carry`` for every pair.

    The pairs run in a loop with one kernel in its body; a hidden pair skips the kernel (``lax.cond``
    around the contribution only, so that the carry is not copied into the branches).
    """

    def pair(p: Any, carry: Any) -> Any:
        value = contribution(p) if visible is None else lax.cond(visible[p], contribution, lambda _: skip(), p)
        return add(carry, p, value)

    n = q_index.shape[0]
    return pair(0, carry) if n == 1 else lax.fori_loop(0, n, pair, carry)


def _step_configs(cfg: Config) -> tuple[Config, Config]:
    """Kernel configs of the diagonal step and of the others: off the diagonal a visited pair is entirely visible."""
    if not cfg.skip_causal:
        return cfg, cfg
    return cfg, cfg._replace(causal=False, skip_causal=False)


# ----------------------------------------------------------------------------------- operands


class Held(NamedTuple):
    """What travels around the ring: a key/value shard and the parts of a mask or bias that follow its keys."""

    k: jax.Array  # (chunks, nk, B, Hk, bk, D)
    v: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None


def _held(ring: Ring, ops: Operands) -> Held:
    return Held(ops.k, ops.v, ops.bias if ring.bias_follows == KEY else None,
                ops.mask if ring.mask_follows == KEY else None)


def _pick(follows: str | None, local: jax.Array | None, held: jax.Array | None, a: Any, b: Any) -> jax.Array | None:
    """The slice of a (chunked) mask or bias that goes with query chunk ``a`` and held key chunk ``b``."""
    if follows is None:
        return None
    if follows == KEY:
        return held[b]  # type: ignore[index]
    return local[a if follows == QUERY else 0]  # type: ignore[index]


def _pair(ring: Ring, ops: Operands, held: Held, a: Any, b: Any) -> Operands:
    """The kernel operands of query chunk ``a`` and held key chunk ``b``."""
    return Operands(ops.q[a], held.k[b], held.v[b], _pick(ring.bias_follows, ops.bias, held.bias, a, b),
                    _pick(ring.mask_follows, ops.mask, held.mask, a, b), ops.drop)


def _shift(ring: Ring, tree: Any) -> Any:
    """``tree`` sent one device along the ring (device ``d`` to ``d + 1``)."""
    perm = [(d, (d + 1) % ring.size) for d in range(ring.size)]
    return jax.tree.map(lambda x: lax.ppermute(x, ring.axis_name, perm), tree)


class _Position(NamedTuple):
    me: Any
    q_starts: jax.Array
    batch: Any
    head: Any


def _position(ring: Ring) -> _Position:
    me = lax.axis_index(ring.axis_name)
    return _Position(me, chunk_starts(ring.layout, ring.size, me, ring.q_chunk, ring.chunks),
                     _offset(ring.batch_axis_name, ring.local_batch), _offset(ring.head_axis_name, ring.local_heads))


def _offsets(ring: Ring, pos: _Position, src: Any, a: Any, b: Any) -> Offsets:
    k_starts = chunk_starts(ring.layout, ring.size, src, ring.k_chunk, ring.chunks)
    return Offsets(q=pos.q_starts[a], k=k_starts[b], batch=pos.batch, head=pos.head)


def _carry_axes(ring: Ring, *trees: Any) -> frozenset:
    """The mesh axes the ring's loop carries vary along: the operands' and the ring's own."""
    names = ring.axis_name if isinstance(ring.axis_name, tuple) else (ring.axis_name,)
    return varying_axes(*trees) | frozenset(names)


def _ring_loop(ring: Ring, cfg: Config, pos: _Position, visit: Any, carry: Any, held: Held) -> Any:
    """Runs ``visit(step_cfg, diagonal, src, carry, held) -> carry`` on every step of the ring.

    The shard for the next step is sent before the current one is visited, so that the transfer can
    overlap the computation (XLA's asynchronous collective-permute); the last transfer is one more
    than needed, to keep one kernel per step kind in the program. ``carry`` may hold a part
    (``carry[-1]``) that travels with the shard: it is sent on after each visit.
    """
    diagonal_cfg, off_cfg = _step_configs(cfg)
    n = ring.size

    def step(s: Any, state: tuple[Any, Held]) -> tuple[Any, Held]:
        carry, held = state
        following = _shift(ring, held) if n > 1 else held
        carry = visit(off_cfg, False, (pos.me - s) % n, carry, held)
        return carry, following

    if cfg.skip_causal:  # the diagonal step (own shard) has its own schedule and causal tiles
        following = _shift(ring, held) if n > 1 else held
        carry = visit(diagonal_cfg, True, pos.me, carry, held)
        carry, _ = lax.fori_loop(1, n, step, (carry, following))
    else:
        carry, _ = lax.fori_loop(0, n, step, (carry, held))
    return carry


# ----------------------------------------------------------------------------------- forward


class _Partial(NamedTuple):
    """Running output of each query chunk: normalised float32 output and its rows' logsumexp parts."""

    out: jax.Array  # (chunks, nq, B, Hk, G, bq, Dv)
    row_max: jax.Array  # (chunks, nq, B, Hk, G, bq)
    log_row_sum: jax.Array


def _combine(acc: _Partial, a: Any, out: jax.Array, lse: LogSumExp) -> _Partial:
    """``acc`` with query chunk ``a``'s output combined with a new key block's ``out`` by logsumexp.

    A weight of 0 (a row that has seen no key yet, or whose logits here are all -inf) contributes
    nothing, even where its output is NaN (0/0); a row with no weight at all stays NaN, as in flax.
    The maximum and log-sum stay apart so that fully masked rows (logits ``finfo.min``) combine
    into a uniform softmax over all keys (see :class:`~jdrop.attention._kernel.LogSumExp`).
    """
    old_max, old_log = acc.row_max[a], acc.log_row_sum[a]
    row_max = jnp.maximum(old_max, lse.row_max)
    reference = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
    old_weight = jnp.exp(old_max - reference + old_log)
    new_weight = jnp.exp(lse.row_max - reference + lse.log_row_sum)
    total = old_weight + new_weight
    weighted = (jnp.where(old_weight[..., None] > 0, acc.out[a] * old_weight[..., None], 0.0)
                + jnp.where(new_weight[..., None] > 0, out * new_weight[..., None], 0.0))
    return _Partial(acc.out.at[a].set(weighted / total[..., None]), acc.row_max.at[a].set(row_max),
                    acc.log_row_sum.at[a].set(jnp.log(total)))


def _forward(cfg: Config, ring: Ring, ops: Operands) -> tuple[jax.Array, LogSumExp]:
    """The ring's forward pass: this device's output ``(chunks, nq, B, Hk, G, bq, Dv)`` and row logsumexp."""
    pos = _position(ring)
    acc_dtype = jnp.promote_types(ops.q.dtype, jnp.float32)
    rows = ops.q.shape[:-1]
    axes = _carry_axes(ring, ops)
    init = vary_like(_Partial(jnp.zeros((*rows, ops.v.shape[-1]), acc_dtype), jnp.full(rows, -jnp.inf, acc_dtype),
                              jnp.full(rows, -jnp.inf, acc_dtype)), axes)

    def visit(step_cfg: Config, diagonal: bool, src: Any, acc: _Partial, held: Held) -> _Partial:
        q_index, k_index, visible = _schedule(ring, cfg, diagonal, pos.me, src)

        def attend(p: Any) -> tuple[jax.Array, LogSumExp]:
            a, b = q_index[p], k_index[p]
            return kernel.forward(step_cfg, _pair(ring, ops, held, a, b), _offsets(ring, pos, src, a, b),
                                  out_dtype=acc_dtype)

        def skip() -> tuple[jax.Array, LogSumExp]:  # no keys seen: weight 0, combines into nothing
            return jnp.zeros_like(init.out[0]), LogSumExp(init.row_max[0], init.log_row_sum[0])

        return _over_pairs(q_index, visible, attend, skip, lambda acc, p, new: _combine(acc, q_index[p], *new), acc)

    acc = _ring_loop(ring, cfg, pos, visit, init, vary_like(_held(ring, ops), axes))
    return acc.out.astype(ops.q.dtype), LogSumExp(acc.row_max, acc.log_row_sum)


# ----------------------------------------------------------------------------------- backward


class _Grads(NamedTuple):
    """Float32 gradient accumulators: the local ones, and those that travel with the held shard."""

    q: jax.Array
    bias: jax.Array | None  # a bias that follows the queries or neither
    held: Held  # dK, dV and the gradient of a bias that follows the keys (mask: None)


def _backward(cfg: Config, ring: Ring, residuals: tuple[Any, ...], d_out: jax.Array) -> tuple[Operands]:
    ops, out, lse = residuals
    pos = _position(ring)
    acc_dtype = jnp.promote_types(ops.q.dtype, jnp.float32)
    d_out = d_out.astype(ops.q.dtype)
    delta = kernel.delta(out, d_out)

    def zeros(x: Any) -> Any:
        return None if x is None else jnp.zeros(x.shape, acc_dtype)

    axes = _carry_axes(ring, ops, out, lse, d_out)
    held = vary_like(_held(ring, ops), axes)
    local_bias = None if ring.bias_follows in (None, KEY) else ops.bias
    travelling = Held(zeros(held.k), zeros(held.v), zeros(held.bias), None)
    init = vary_like(_Grads(zeros(ops.q), zeros(local_bias), travelling), axes)

    def visit(step_cfg: Config, diagonal: bool, src: Any, grads: _Grads, held: Held) -> _Grads:
        q_index, k_index, visible = _schedule(ring, cfg, diagonal, pos.me, src)

        def attend(p: Any) -> tuple[Any, ...]:
            a, b = q_index[p], k_index[p]
            return tuple(kernel.backward(
                step_cfg, _pair(ring, ops, held, a, b), d_out[a], LogSumExp(lse.row_max[a], lse.log_row_sum[a]),
                delta[a], _offsets(ring, pos, src, a, b), grad_dtype=acc_dtype))

        def skip() -> tuple[Any, ...]:
            first = (grads.q, grads.held.k, grads.held.v, grads.held.bias if ring.bias_follows == KEY else grads.bias)
            return tuple(None if x is None else jnp.zeros_like(x[0]) for x in first)

        def add(grads: _Grads, p: Any, new: tuple[Any, ...]) -> _Grads:
            a, b = q_index[p], k_index[p]
            d_q, d_k, d_v, d_bias = new
            travelling = grads.held
            bias, held_bias = grads.bias, travelling.bias
            if ring.bias_follows == KEY:
                held_bias = held_bias.at[b].add(d_bias)  # type: ignore[union-attr]
            elif ring.bias_follows is not None:
                bias = bias.at[a if ring.bias_follows == QUERY else 0].add(d_bias)  # type: ignore[union-attr]
            return _Grads(grads.q.at[a].add(d_q), bias,
                          Held(travelling.k.at[b].add(d_k), travelling.v.at[b].add(d_v), held_bias, None))

        grads = _over_pairs(q_index, visible, attend, skip, add, grads)
        # The shard's gradients go on with it; after the last step they have come home.
        return grads._replace(held=_shift(ring, grads.held)) if ring.size > 1 else grads

    grads = _ring_loop(ring, cfg, pos, visit, init, held)
    d_bias = grads.held.bias if ring.bias_follows == KEY else grads.bias
    d_bias = None if d_bias is None else d_bias.astype(ops.bias.dtype)  # type: ignore[union-attr]
    d_ops = Operands(grads.q.astype(ops.q.dtype), grads.held.k.astype(ops.k.dtype), grads.held.v.astype(ops.v.dtype),
                     d_bias, None, None)
    return (cotangent_like(d_ops, ops),)


# ----------------------------------------------------------------------------------- custom_vjp


def _attention(cfg: Config, ring: Ring, ops: Operands) -> jax.Array:
    return _forward(cfg, ring, ops)[0]


def _attention_fwd(cfg: Config, ring: Ring, ops: Operands) -> tuple[jax.Array, tuple[Any, ...]]:
    out, lse = _forward(cfg, ring, ops)
    return out, (ops, out, lse)


attention = jax.custom_vjp(_attention, nondiff_argnums=(0, 1))
"""This device's attention output over the whole ring, ``(chunks, nq, B, Hk, G, bq, Dv)``; ring backward.

``ops`` holds this device's shards in the kernel layout with a leading chunk axis: ``q``
``(chunks, nq, B, Hk, G, bq, D)``, ``k`` and ``v`` ``(chunks, nk, B, Hk, bk, D)``, a mask or bias
``(chunks | 1, internal...)`` split by chunk along what it follows (``Ring.bias_follows``).
"""
attention.defvjp(_attention_fwd, _backward)
