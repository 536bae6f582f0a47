"""Manual mesh axes inside ``jax.shard_map``: which axes a value varies along, and giving a value those axes.

Inside ``shard_map`` (with its default ``check_vma=True``) every value records the mesh axes along which
it differs from device to device, and a loop's carry must keep the same axes from one iteration to the
next. A carry that starts as a constant (zeros, ``-inf``) and accumulates sharded operands therefore has
to start with the operands' axes: :func:`vary_like` gives them. A ``custom_vjp`` whose primal input is
the same on every device (a replicated bias) but meets sharded operands returns that input's cotangent
summed over the devices: :func:`cotangent_like`, the transpose of the implicit broadcast. Outside
``shard_map``, or on a JAX that does not track the axes, these functions are no-ops.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

__all__ = ["cotangent_like", "vary_like", "varying_axes"]


def _axes_of(leaf: Any) -> frozenset:
    typeof = getattr(jax, "typeof", None)
    if typeof is None or not hasattr(leaf, "dtype"):
        return frozenset()
    aval = typeof(leaf)
    axes = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(getattr(aval, "vma", frozenset()) if axes is None else axes)


def varying_axes(*trees: Any) -> frozenset:
    """The manual mesh axes along which any array leaf of ``trees`` varies (empty outside ``shard_map``)."""
    axes: frozenset = frozenset()
    for leaf in jax.tree.leaves(trees):
        axes |= _axes_of(leaf)
    return axes


def vary_like(tree: Any, axes: frozenset) -> Any:
    """``tree`` with every array leaf varying along ``axes`` too (the start of a loop carry)."""
    if not axes:
        return tree
    cast = getattr(lax, "pcast", None)

    def vary(x: jax.Array) -> jax.Array:
        missing = tuple(sorted(axes - _axes_of(x)))
        if not missing:
            return x
        if cast is not None:
            return cast(x, missing, to="varying")
        return lax.pvary(x, missing)  # type: ignore[attr-defined]  # JAX before pcast

    return jax.tree.map(vary, tree)


def cotangent_like(cotangent: Any, primal: Any) -> Any:
    """``cotangent`` summed (``lax.psum``) over the axes it varies along but its ``primal`` does not.

    ``cotangent`` and ``primal`` are trees of one structure, with None for a zero cotangent.
    """

    def reduce(ct: Any, x: Any) -> Any:
        if ct is None:
            return None
        extra = tuple(sorted(_axes_of(ct) - _axes_of(x)))
        return lax.psum(ct, extra) if extra else ct

    return jax.tree.map(reduce, cotangent, primal, is_leaf=lambda x: x is None)
