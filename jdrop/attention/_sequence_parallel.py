"""Sequence parallelism on global arrays, and the zigzag layout's helpers for code inside ``shard_map``.

The ring itself is ``jdrop.dot_product_attention(..., axis_name=...)`` called inside ``jax.shard_map``
(:mod:`jdrop.attention._ring`): that is the form a model needs, since a flax attention module takes it as
``attention_fn`` and the whole model runs on local shards. :func:`sequence_parallel_attention` wraps it
for global arrays in a few lines (a ``shard_map`` over the given mesh); :func:`to_zigzag`,
:func:`from_zigzag` and :func:`sequence_positions` move shards between the contiguous and zigzag
layouts and give a shard's global positions (for position embeddings).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypedDict

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike, DTypeLike

from jdrop._validation import canonical_axis, check_choice, check_float_input, check_keywords, static_bool
from jdrop.attention._api import dot_product_attention
from jdrop.attention._checks import (
    check_attention_shapes,
    check_mesh_axis,
    check_mesh_has,
    check_multiple_of,
    check_shard_follows,
)
from jdrop.attention._ring import SEQUENCE_LAYOUTS, chunk_starts

if TYPE_CHECKING:  # typing.Unpack is Python 3.11's
    from typing_extensions import Unpack

__all__ = ["AttentionOptions", "from_zigzag", "sequence_parallel_attention", "sequence_positions", "to_zigzag"]


class AttentionOptions(TypedDict, total=False):
    """The keyword arguments of :func:`jdrop.dot_product_attention` that :func:`sequence_parallel_attention`
    takes and passes on: their meaning and defaults are that function's. The others do not apply to a ring over
    global arrays (the sequence-parallel ones are the wrapper's own; ``module``, ``implementation="pallas"`` and
    the fast masks are what the ring rejects)."""

    broadcast_dropout: bool
    dropout_rng: Any
    dropout_rate: Any
    deterministic: bool
    dtype: DTypeLike | None
    precision: Any
    is_causal: bool
    block_q: int
    block_k: int


def _owner(half: int, devices: int) -> int:
    """The device that holds half-shard ``half`` (of ``2 * devices``) in the zigzag layout."""
    return half if half < devices else 2 * devices - 1 - half


def _halves(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    length = check_multiple_of(x.shape[axis], 2, name="x", why="the zigzag layout holds two chunks per device")
    return lax.slice_in_dim(x, 0, length // 2, axis=axis), lax.slice_in_dim(x, length // 2, length, axis=axis)


def _exchange_halves(x: ArrayLike, axis_name: Any, axis: int, *, inverse: bool) -> jax.Array:
    """The local shard moved from the contiguous layout to the zigzag one (or back, ``inverse``): its two halves
    sent by one ``lax.ppermute`` each."""
    x = jnp.asarray(x)
    axis = canonical_axis(axis, x.ndim, name="axis")
    n = check_mesh_axis(axis_name)
    first, second = _halves(x, axis)
    if n == 1:
        return x
    # Device d's zigzag chunks are d and 2N - 1 - d: one even, one odd; the even one first on an even device.
    me_even = lax.axis_index(axis_name) % 2 == 0

    def even_first(a: jax.Array, b: jax.Array) -> list[jax.Array]:  # this device's order <-> (even, odd)
        return [jnp.where(me_even, a, b), jnp.where(me_even, b, a)]

    moved = []  # contiguous chunk 2d + parity is on device d, zigzag chunk c on device _owner(c)
    for parity, half in enumerate(even_first(first, second) if inverse else [first, second]):
        pairs = [(d, _owner(2 * d + parity, n)) for d in range(n)]
        moved.append(lax.ppermute(half, axis_name, [(b, a) for a, b in pairs] if inverse else pairs))
    return jnp.concatenate(moved if inverse else even_first(*moved), axis=axis)


def to_zigzag(x: ArrayLike, axis_name: Any, *, axis: int = -3) -> jax.Array:
    """This device's shard in the zigzag layout, from its shard in the contiguous layout (inside ``shard_map``).

    With ``N`` devices on ``axis_name`` and the sequence in ``2N`` chunks, device ``d`` holds chunks
    ``2d`` and ``2d + 1`` before and chunks ``d`` and ``2N - 1 - d`` after: the layout in which causal
    ring attention gives every device the same work at every step. Two ``lax.ppermute`` of half a
    shard each; differentiable (the transpose is :func:`from_zigzag`'s permutation).

    Args:
      x: the local shard; ``axis`` is its sequence axis (default -3: ``(batch..., L, heads, depth)``),
        of even length.
      axis_name: the mesh axis the sequence is sharded over.
      axis: the sequence axis of ``x``.

    Returns:
      The local shard of the zigzag layout, same shape.

    Example::

      >>> x = jdrop.attention.to_zigzag(embeddings, "seq", axis=1)   # once, at the model's input
      >>> positions = jdrop.attention.sequence_positions(x.shape[1], "seq", "zigzag")
    """
    return _exchange_halves(x, axis_name, axis, inverse=False)


def from_zigzag(x: ArrayLike, axis_name: Any, *, axis: int = -3) -> jax.Array:
    """Inverse of :func:`to_zigzag`: this device's contiguous shard from its zigzag shard (inside ``shard_map``)."""
    return _exchange_halves(x, axis_name, axis, inverse=True)


def sequence_positions(length: int, axis_name: Any, sequence_layout: str = "contiguous") -> jax.Array:
    """Global positions (``int32``) of the ``length`` rows this device holds (inside ``shard_map``).

    ``[d L, (d + 1) L)`` for the contiguous layout; for the zigzag layout, chunk ``d`` then chunk
    ``2N - 1 - d`` of ``L / 2`` rows each. What rotary or learned position embeddings need.
    """
    layout = check_choice(sequence_layout, SEQUENCE_LAYOUTS, name="sequence_layout")
    n = check_mesh_axis(axis_name)
    chunks = 2 if layout == "zigzag" else 1
    chunk = check_multiple_of(length, chunks, name="length", why=f"sequence_layout={layout!r}") // chunks
    starts = chunk_starts(layout, n, lax.axis_index(axis_name), chunk, chunks)
    return (starts[:, None] + jnp.arange(chunk, dtype=jnp.int32)).reshape(-1)


def _spec(shape: tuple[int, ...], sharded: dict[int, Any]) -> PartitionSpec:
    """The spec sharding dim ``i`` over ``sharded[i]`` where that dim is longer than 1."""
    return PartitionSpec(*(sharded.get(i) if size > 1 else None for i, size in enumerate(shape)))


def sequence_parallel_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    mesh: Mesh,
    axis_name: Any = "seq",
    batch_axis_name: Any = None,
    head_axis_name: Any = None,
    load_balance: bool | None = None,
    **options: Unpack[AttentionOptions],
) -> jax.Array:
    """:func:`jdrop.dot_product_attention` on global arrays, the sequence sharded over ``mesh``'s ``axis_name``.

    The same attention, dropout mask and gradients as one device's call, for the same
    ``dropout_rng`` (flax's mask ``bernoulli(dropout_rng, 1 - rate, (B, H, Tq, Tk))`` or its
    ``(1, 1, Tq, Tk)`` broadcast form); each of the ``N`` devices holds ``T / N`` queries, keys and
    values, and the key/value shards travel around a ring (Liu et al. 2023), so a device's
    temporary memory is that of a ``T / N`` attention. Batch and heads may be sharded too, over
    ``batch_axis_name`` (the leading batch dim) and ``head_axis_name``: a 2-D or 3-D mesh.

    This is a ``jax.shard_map`` around ``jdrop.dot_product_attention(..., axis_name=axis_name)``,
    the form to use inside a model that runs on local shards (flax's ``attention_fn``: see the
    sequence-parallelism guide); use this one where the arrays are global.

    Args:
      query: ``(batch..., Tq, heads, D)``; ``Tq`` a multiple of the devices on ``axis_name`` (of
        twice that with ``load_balance``).
      key: ``(batch..., Tk, kv_heads, D)``; ``Tk`` likewise.
      value: ``(batch..., Tk, kv_heads, Dv)``.
      bias: broadcastable to ``(batch..., heads, Tq, Tk)`` and varying along the queries or the keys,
        not both (e.g. ``(batch, 1, 1, Tk)``); sharded with what it varies along. Differentiable.
      mask: bool, likewise (e.g. a key-padding mask ``(batch, 1, 1, Tk)``).
      mesh: the ``jax.sharding.Mesh`` to run on.
      axis_name: the mesh axis (or tuple of axes) to shard the sequence over.
      batch_axis_name: mesh axes to shard the leading batch dim over (None: replicated).
      head_axis_name: mesh axes to shard the heads over (query and key/value heads alike).
      load_balance: reorder the sequence into the zigzag layout inside (:func:`to_zigzag`: two
        half-shard transfers per array), so that causal attention gives every device the same
        work at every step. Default: ``is_causal``.
      **options: the keyword arguments of :func:`jdrop.dot_product_attention` that apply here
        (:class:`AttentionOptions`), passed on with that function's meaning and defaults:
        ``broadcast_dropout``, ``dropout_rng`` (a threefry key, the same for the whole call),
        ``dropout_rate``, ``deterministic``, ``dtype``, ``precision``, ``is_causal`` (by global
        position), ``block_q`` and ``block_k`` (the tiles on each device).

    Returns:
      ``(batch..., Tq, heads, Dv)``, sharded as ``query``.

    Raises:
      ValueError: for lengths, batch or heads that do not split over their mesh axes, a mask or
        bias that varies along both queries and keys, or anything ``jdrop.dot_product_attention``
        rejects.
      TypeError: for a keyword argument not named above, or what ``jdrop.dot_product_attention``
        rejects with one.

    Example::

      >>> mesh = jax.make_mesh((2, 4), ("data", "seq"))
      >>> out = jdrop.sequence_parallel_attention(q, k, v, mesh=mesh, batch_axis_name="data",
      ...                                         dropout_rng=jax.random.key(0), dropout_rate=0.1,
      ...                                         is_causal=True)
    """
    check_keywords(options, AttentionOptions.__optional_keys__, where="sequence_parallel_attention")
    query, key, value = (check_float_input(x, name=n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    check_attention_shapes(query.shape, key.shape, value.shape)
    causal = options.get("is_causal", False)
    balance = static_bool(bool(causal) if load_balance is None else load_balance, name="load_balance")
    devices = _devices(mesh, axis_name=axis_name, batch_axis_name=batch_axis_name, head_axis_name=head_axis_name)
    balance = balance and devices["axis_name"] > 1  # one device holds the sequence in order
    _check_global_shapes(query.shape, key.shape, devices, balance, axis_name, batch_axis_name, head_axis_name)
    rank = query.ndim
    qkv_spec = PartitionSpec(*({0: batch_axis_name, rank - 3: axis_name, rank - 2: head_axis_name}.get(i)
                               for i in range(rank)))
    extras = [_full_rank(x, rank, name) for x, name in ((bias, "bias"), (mask, "mask"))]
    extra_specs = [_spec(x.shape, {0: batch_axis_name, rank - 3: head_axis_name, rank - 2: axis_name,
                                   rank - 1: axis_name}) for x in extras if x is not None]

    def local(query: jax.Array, key: jax.Array, value: jax.Array, *extra: jax.Array) -> jax.Array:
        given = iter(extra)
        bias, mask = (None if x is None else next(given) for x in extras)
        if balance:
            query, key, value = (to_zigzag(x, axis_name) for x in (query, key, value))
            bias, mask = (None if x is None else _zigzag_along_sequence(x, axis_name) for x in (bias, mask))
        out = dot_product_attention(query, key, value, bias, mask, axis_name=axis_name,
                                    sequence_layout="zigzag" if balance else "contiguous",
                                    batch_axis_name=batch_axis_name, head_axis_name=head_axis_name, **options)
        return from_zigzag(out, axis_name) if balance else out

    specs = (qkv_spec, qkv_spec, qkv_spec, *extra_specs)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec)
    args = (query, key, value, *(x for x in extras if x is not None))
    return sharded(*(_placed(x, mesh, spec) for x, spec in zip(args, specs)))  # type: ignore[no-any-return]


def _full_rank(array: ArrayLike | None, rank: int, name: str) -> jax.Array | None:
    """A mask or bias as ``(batch..., heads, Tq, Tk)`` (leading 1s added), checked to be shardable."""
    if array is None:
        return None
    array = jnp.asarray(array)
    array = array.reshape((1,) * (rank - array.ndim) + array.shape)
    check_shard_follows(array.shape, name=name)
    return array


def _devices(mesh: Mesh, **axis_names: Any) -> dict[str, int]:
    """Devices along each given mesh axis (a name or a tuple of names), after checking ``mesh`` has them."""
    devices = {}
    for name, axis in axis_names.items():
        if axis is not None:
            names = axis if isinstance(axis, tuple) else (axis,)
            check_mesh_has(dict(mesh.shape), names, name=name)
            devices[name] = math.prod(mesh.shape[a] for a in names)
    return devices


def _check_global_shapes(q_shape: tuple[int, ...], k_shape: tuple[int, ...], devices: dict[str, int],
                         balance: bool, axis_name: Any, batch_axis_name: Any, head_axis_name: Any) -> None:
    """``ValueError`` unless the lengths, the batch and the heads split evenly over their mesh axes."""
    per_shard = 2 * devices["axis_name"] if balance else devices["axis_name"]
    why = "twice the devices: load_balance splits each shard in two" if balance else "the devices"
    for shape, name in ((q_shape, "query"), (k_shape, "key")):
        check_multiple_of(shape[-3], per_shard, name=f"{name} length", why=f"{why} on {axis_name!r}")
    if batch_axis_name is not None:
        check_multiple_of(q_shape[0], devices["batch_axis_name"], name="batch",
                          why=f"the devices on {batch_axis_name!r}")
    if head_axis_name is not None:
        check_multiple_of(k_shape[-2], devices["head_axis_name"], name="kv heads",
                          why=f"the devices on {head_axis_name!r}")


def _placed(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """``x`` placed as ``spec`` says where ``mesh``'s axes are explicit (``jax.make_mesh``'s default).

    ``shard_map`` reshards its inputs over a mesh of automatic axes itself, but takes them only as
    they are placed over explicit ones.
    """
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ())))
    used = [a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))]
    if explicit is None or not types or any(types.get(a) != explicit for a in used):
        return x
    return jax.reshard(x, NamedSharding(mesh, spec))


def _zigzag_along_sequence(x: jax.Array, axis_name: Any) -> jax.Array:
    """A mask's or bias's local shard in the zigzag layout along whichever of its last two axes is sharded."""
    for axis in (x.ndim - 1, x.ndim - 2):
        if x.shape[axis] > 1:
            return to_zigzag(x, axis_name, axis=axis)
    return x
