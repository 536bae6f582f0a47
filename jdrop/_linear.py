"""A linear map with a hand-written transpose, for every mode of autodiff: forward, reverse, and their compositions.

A ``jax.custom_vjp`` gives reverse mode a hand-written backward pass but refuses forward mode (``jax.jvp``,
``jacfwd``, ``linearize``); a ``jax.custom_jvp`` gives forward mode, and JAX derives reverse mode by transposing
its tangent computation, which keeps whatever that computation needs and runs JAX's transpose, not ours.
:func:`linear_map` gives both: inside a ``custom_jvp`` rule, the output tangent ``L(r) t`` is computed by
``apply(r, t)`` in forward mode, while reverse mode (linearize + transpose of the rule) keeps exactly the
residuals ``r`` and runs ``transpose(r, c) = L(r)^T c``, the hand-written backward pass, on the cotangent.

The carrier is ``lax.custom_linear_solve``, the one JAX primitive whose transpose is user-given, on a square
system built around the non-square ``L`` (``t`` in the tangent space of the inputs, ``w`` in the output's)::

    A(r) = [[I, 0], [-L(r), I]]       A^{-1} (t, w) = (t, w + L t)       A^{-T} (c, d) = (c + L^T d, d)

``A^{-1} (t, 0) = (t, L t)``: the solve is ``apply``, the transpose solve ``transpose``, and ``matvec`` is ``A``
itself, so the solve's derivative with respect to the residuals (implicit differentiation, ``dx = A^{-1} (db -
dA x)``) is the exact product rule: second and higher derivatives (``jax.hessian``, ``grad`` of ``grad``,
``jacrev`` of ``jacfwd``) are right. JAX transposes ``matvec`` itself when the solve is built, so ``reference``
(default ``apply``) must be JAX-transposable; it is only evaluated for second-order derivatives.

Two details keep every right-hand side linear, which the solve's transpose requires: the rule must be declared
with ``symbolic_zeros=True`` (only the tangents JAX actually carries enter the system), and the blocks that are
structurally zero are tied to their sources by a select that always picks zero, so their derivatives are never
JAX's symbolic zeros. XLA folds these selects away: a compiled gradient is the same program a ``custom_vjp``
gives (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["linear_map"]


def _is_zero(leaf: Any) -> bool:
    return isinstance(leaf, SymbolicZero)


def _tie(sources: list[jax.Array], like: Any) -> Any:
    """Zeros shaped like ``like``, linear in every array of ``sources`` (its first element, selected away)."""
    firsts = [lax.slice(jnp.ravel(s), (0,), (1,)).reshape(()) for s in sources if s.size]
    if not firsts:
        return jax.tree.map(jnp.zeros_like, like)
    total = firsts[0]
    for first in firsts[1:]:
        total = total + first.astype(total.dtype)

    def zeros(leaf: jax.Array) -> jax.Array:
        tied = jnp.broadcast_to(total.astype(leaf.dtype), leaf.shape)
        return lax.select(jnp.zeros(leaf.shape, bool), tied, jnp.zeros_like(leaf))

    return jax.tree.map(zeros, like)


def _add(tree: Any, other: Any) -> Any:
    return jax.tree.map(jnp.add, tree, other)


def linear_map(
    apply: Callable[[Any, Any], Any],
    transpose: Callable[[Any, Any], Any],
    residuals: Any,
    tangents: Any,
    out_like: Any,
    *,
    reference: Callable[[Any, Any], Any] | None = None,
) -> Any:
    """``L(r) t`` by ``apply(r, t)``, whose transpose is ``transpose(r, c) = L(r)^T c`` (module docstring).

    Args:
      apply: ``(residuals, tangents) -> output tangent``, linear in ``tangents`` (a pytree like ``tangents``
        with arrays in place of symbolic zeros).
      transpose: ``(residuals, cotangent) -> tangents``: the transpose of ``apply``, a pytree like ``tangents``.
      residuals: what both need (a pytree of arrays; reverse mode keeps exactly these).
      tangents: the ``custom_jvp`` rule's tangents (declared with ``symbolic_zeros=True``).
      out_like: a pytree of arrays shaped like the output tangent.
      reference: a JAX-transposable version of ``apply`` (default: ``apply``), used by higher derivatives.

    Returns:
      the output tangent, shaped like ``out_like``.
    """
    reference = apply if reference is None else reference
    leaves, tree = jax.tree.flatten(tangents, is_leaf=_is_zero)
    live = [i for i, leaf in enumerate(leaves) if not _is_zero(leaf)]
    if not live:
        return jax.tree.map(jnp.zeros_like, out_like)

    def full(live_leaves: list[jax.Array]) -> Any:
        out = [jnp.zeros(leaf.shape, leaf.dtype) if _is_zero(leaf) else leaf for leaf in leaves]
        for i, leaf in zip(live, live_leaves):
            out[i] = leaf
        return jax.tree.unflatten(tree, out)

    floats = [leaf for leaf in jax.tree.leaves(residuals) if jnp.issubdtype(leaf.dtype, jnp.inexact)]

    def matvec(u: tuple[list[jax.Array], Any]) -> tuple[list[jax.Array], Any]:
        t, w = u
        # Each block depends on the residuals, so its derivative with respect to them is never a symbolic zero.
        t, w = _add(t, _tie(floats, t)), _add(w, _tie(floats, w))
        return t, jax.tree.map(jnp.subtract, w, reference(residuals, full(t)))

    def solve(_: Any, b: tuple[list[jax.Array], Any]) -> tuple[list[jax.Array], Any]:
        t, w = b
        return t, _add(w, apply(residuals, full(t)))

    def transpose_solve(_: Any, c: tuple[list[jax.Array], Any]) -> tuple[list[jax.Array], Any]:
        ct, d = c
        back = jax.tree.leaves(transpose(residuals, d))
        return [a + back[i].astype(a.dtype) for a, i in zip(ct, live)], d

    t = [leaves[i] for i in live]
    x_t, x_w = lax.custom_linear_solve(matvec, (t, _tie(t, out_like)), solve, transpose_solve)
    return _add(x_w, _tie(x_t, out_like))
