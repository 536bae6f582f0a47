"""Argument checks that only attention uses: shapes, dtypes, masks, sequence shards and mesh axes.

The rules shared across jdrop (rates, keys, flags, floating inputs) are :mod:`jdrop._validation`'s;
these follow its conventions: one function per rule, one wording per rule, at trace time where static,
``TypeError`` for the wrong kind of value, ``ValueError`` for a value outside the allowed range.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdrop._shard_map import varying_axes
from jdrop._validation import _describe, check_float_input

__all__ = [
    "check_attention_shapes",
    "check_broadcastable",
    "check_complex_supported",
    "check_float_dtype",
    "check_inexact_input",
    "check_mask_rows",
    "check_mesh_axis",
    "check_mesh_has",
    "check_multiple_of",
    "check_no_custom_products",
    "check_not_sequence_parallel",
    "check_sequence_shards",
    "check_shard_follows",
    "check_shared_key",
]


def check_float_dtype(dtype: Any, *, name: str = "dtype") -> np.dtype:
    """``dtype`` as a numpy dtype if it is floating or complex, else ``TypeError`` naming ``name``."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"`{name}` must be a floating or complex dtype, got {dtype}.")
    return dtype


def check_inexact_input(x: Any, *, name: str) -> jax.Array:
    """``x`` as an array if it is complex, else :func:`jdrop._validation.check_float_input`'s check (floating)."""
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.asarray(x)
    return check_float_input(x, name=name)


def check_complex_supported(dtype: np.dtype, *, implementation: str, sequence_parallel: bool) -> None:
    """``ValueError`` for complex inputs where only the xla path's whole-matrix formula takes them."""
    if not jnp.issubdtype(dtype, jnp.complexfloating):
        return
    if implementation != "xla":
        raise ValueError(
            f"implementation={implementation!r} takes float16, bfloat16 and float32 inputs, got {dtype}: complex "
            "attention runs flax's formula on implementation='xla' (or None, the default)."
        )
    if sequence_parallel:
        raise ValueError(f"sequence-parallel attention (axis_name=...) takes floating inputs, got {dtype}.")


def check_no_custom_products(**products: Any) -> None:
    """``ValueError`` unless every custom product argument (``einsum_dot_general`` and the like) is None."""
    given = [name for name, value in products.items() if value is not None]
    if given:
        raise ValueError(
            "jdrop.dot_product_attention computes its own blockwise products: custom einsums or dot_generals "
            f"({', '.join(products)}, e.g. for AQT) are not supported (got {', '.join(given)}); use "
            "flax.linen.dot_product_attention for them."
        )


def check_attention_shapes(query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...]) -> None:
    """``ValueError`` unless ``(batch..., length, heads, depth)`` query, key and value shapes fit together."""
    if not len(query) == len(key) == len(value) or len(query) < 3:
        raise ValueError(
            "query, key and value must have the same rank, at least 3 ((batch..., length, heads, depth)); got "
            f"shapes {query}, {key}, {value}."
        )
    if not query[:-3] == key[:-3] == value[:-3]:
        raise ValueError(f"query, key and value batch dims must match, got {query}, {key}, {value}.")
    if key[-3] != value[-3] or key[-2] != value[-2]:
        raise ValueError(f"key and value lengths and heads must match, got {key} and {value}.")
    if query[-1] != key[-1]:
        raise ValueError(f"query and key depths must match, got {query[-1]} and {key[-1]}.")
    if (key[-2] == 0 and query[-2] != 0) or (key[-2] != 0 and query[-2] % key[-2]):
        raise ValueError(
            f"query heads ({query[-2]}) must be a multiple of key/value heads ({key[-2]}) for grouped-query attention."
        )


def check_broadcastable(shape: tuple[int, ...], target: tuple[int, ...], *, name: str, axes: str) -> None:
    """``ValueError`` unless ``shape`` broadcasts to ``target`` (numpy's rule), naming ``name`` and the ``axes``."""
    if len(shape) > len(target):
        raise ValueError(f"`{name}` of shape {shape} has more dims than {axes} {target}.")
    for size, full in zip(shape[::-1], target[::-1]):
        if size not in (1, full):
            raise ValueError(f"`{name}` of shape {shape} does not broadcast to {axes} {target}.")


def check_mask_rows(rows: int) -> None:
    """``ValueError`` if a dropout mask has ``2**32`` rows or more (its row index must fit one ``uint32`` word)."""
    if rows >= 2**32:
        raise ValueError(f"the dropout mask has 2**32 rows or more ({rows}); split the batch.")


# ------------------------------------------------------------------------------------------------ sequence parallelism


def check_mesh_axis(axis_name: Any, *, name: str = "axis_name") -> int:
    """The number of devices along the bound mesh axis (or tuple of axes) ``axis_name``, or ``ValueError``.

    The axis is bound inside ``jax.shard_map`` over a mesh that has it.
    """
    if not isinstance(axis_name, (str, tuple)) or (isinstance(axis_name, tuple) and not all(
            isinstance(a, str) for a in axis_name)):
        raise TypeError(f"`{name}` must be a mesh axis name (a str) or a tuple of them, got {_describe(axis_name)}.")
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError:
        raise ValueError(
            f"`{name}`={axis_name!r} is not a bound mesh axis: call this function (e.g. "
            f"jdrop.dot_product_attention(..., {name}={axis_name!r})) inside jax.shard_map over a mesh with that "
            "axis (local shards in, local shards out), or use jdrop.sequence_parallel_attention(..., mesh=mesh) "
            "on global arrays."
        ) from None


def check_not_sequence_parallel(value: Any, *, name: str, why: str) -> None:
    """``ValueError`` if ``value`` (an option the ring cannot honour) is set with ``axis_name``, saying ``why``."""
    if value is not None:
        raise ValueError(f"`{name}` is not supported by sequence-parallel attention (axis_name=...): {why}.")


def check_mesh_has(mesh_shape: dict[str, int], axes: tuple[Any, ...], *, name: str) -> None:
    """``ValueError`` unless every mesh axis in ``axes`` (named by argument ``name``) is in ``mesh_shape``."""
    missing = [a for a in axes if a not in mesh_shape]
    if missing:
        raise ValueError(f"`{name}`={axes} names axes {missing} that the mesh {mesh_shape} does not have.")


def check_multiple_of(value: int, factor: int, *, name: str, why: str) -> int:
    """``value`` if it is a multiple of ``factor``, else ``ValueError`` naming ``name`` and ``why`` it must be."""
    if value % factor:
        raise ValueError(f"`{name}` ({value}) must be a multiple of {factor} ({why}); pad it, or change the mesh.")
    return value


def check_sequence_shards(q_length: int, k_length: int, *, devices: int, layout: str, causal: bool) -> None:
    """``ValueError`` unless the local query and key lengths suit the ring's ``layout`` and causal masking.

    Causal attention by global position needs equal query and key shards; the zigzag layout splits
    each shard into two equal chunks, so its lengths must be even.
    """
    if causal and q_length != k_length:
        raise ValueError(
            f"causal sequence-parallel attention needs query and key shards of one length, got {q_length} and "
            f"{k_length} per device (over {devices} devices)."
        )
    if layout == "zigzag" and (q_length % 2 or k_length % 2):
        raise ValueError(
            "sequence_layout='zigzag' holds two chunks of the sequence per device, so the local lengths must be "
            f"even, got {q_length} (queries) and {k_length} (keys); pad the sequence to a multiple of "
            f"{2 * devices} or use sequence_layout='contiguous'."
        )


def check_shard_follows(shape: tuple[int, ...], *, name: str) -> None:
    """``ValueError`` if a sequence-sharded mask or bias varies along both queries and keys (``(..., Tq, Tk)``)."""
    if len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1:
        raise ValueError(
            f"`{name}` of shape {shape} varies along both queries and keys: a (Tq, Tk) {name} cannot be "
            "sharded along the sequence (each device would need its rows for every key shard). Give one that "
            "varies along the keys (e.g. a padding mask (batch, 1, 1, Tk), sharded with the keys) or the queries "
            "(batch, heads, Tq, 1), and is_causal=True for causal masking."
        )


def _axes(*axis_names: Any) -> frozenset:
    """The mesh axis names among ``axis_names`` (each None, a name, or a tuple of names)."""
    names = (axis if isinstance(axis, tuple) else (axis,) for axis in axis_names if axis is not None)
    return frozenset(a for group in names for a in group)


def check_shared_key(key: jax.Array, query: jax.Array, *, sequence_axis: Any, declared: tuple[Any, ...],
                     per_element: bool, name: str = "dropout_rng") -> None:
    """``ValueError`` if the dropout key differs along the sequence axis, or would repeat one mask unseen.

    Every device of the ring draws its part of one global mask, so the key must be the same on all of
    them. With one mask per batch row and head (``broadcast_dropout=False``), a query that varies along a
    mesh axis over which the key does not would draw the same mask on every shard of that axis unless the
    axis is declared (``batch_axis_name`` or ``head_axis_name``), so that each shard draws its own part.
    Checked where ``jax.shard_map`` tracks varying axes (``check_vma=True``, its default).
    """
    key_axes = varying_axes(key)
    ring = _axes(sequence_axis)
    if key_axes & ring:
        raise ValueError(
            f"`{name}` varies along the sequence axis {sorted(key_axes & ring)}: every device of the ring draws "
            "its part of one dropout mask, so all must pass the same key (do not fold the axis index into it)."
        )
    undeclared = {a for a in varying_axes(query) - key_axes - ring - _axes(*declared) if jax.lax.axis_size(a) > 1}
    if per_element and undeclared:
        raise ValueError(
            f"the query varies along mesh axes {sorted(undeclared)} but `{name}` does not: with "
            "broadcast_dropout=False every shard along them would draw the same dropout mask. Pass "
            "batch_axis_name= or head_axis_name= for the axes that shard the batch or the heads (each shard then "
            "draws its part of the global mask), or give each shard its own key."
        )
