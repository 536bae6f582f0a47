"""Manual mesh axes inside ``jax.shard_map``: which axes a value varies along, and giving a value those axes.

Inside ``shard_map`` (with its default ``check_vma=True``) every value records the mesh axes along which
it differs from device to device, and a loop's carry must keep the same axes from one iteration to the
next. A carry that starts as a constant (zeros, ``-inf``) and accumulates sharded operands therefore has
to start with the operands' axes: :func:`vary_like` gives them. A ``custom_vjp`` whose primal input is
the same on every device (a replicated bias) but meets sharded operands returns that input's cotangent
summed over the devices: :func:`cotangent_like`, the transpose of the implicit broadcast. Outside
``shard_map``, or on a JAX that does not track the axes, these functions are no-ops.

Explicit mesh axes (``jax.make_mesh``'s default axis type, under ``jax.set_mesh``): an array's type
then carries its sharding, and every op must have a sharding rule for it (a loop carry built from a
shape is replicated, the loop body's result sharded: their types differ). :func:`explicit_axes`
finds those axes in the arrays' types, and :func:`on_auto_axes` runs a computation with them turned
to ``Auto`` (``jax.sharding.auto_axes``), the compiler propagating the shardings inside, the result
given the sharding its caller names.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

__all__ = ["cotangent_like", "explicit_axes", "in_manual_mesh", "on_auto_axes", "spec_of", "vary_like", "varying_axes"]


def _axes_of(leaf: Any) -> frozenset:
    typeof = getattr(jax, "typeof", None)
    if typeof is None or not hasattr(leaf, "dtype"):
        return frozenset()
    aval = typeof(leaf)
    axes = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(getattr(aval, "vma", frozenset()) if axes is None else axes)


def in_manual_mesh() -> bool:
    """Whether the code being traced runs inside ``jax.shard_map`` (the abstract mesh has manual axes).

    ``lax.custom_linear_solve``, which carries jdrop's forward-mode rules, does not keep the mesh axes its
    operands vary along there (JAX 0.10): inside, jdrop's cores fall back to ``custom_vjp`` (reverse mode only).
    """
    return bool(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


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


def _named_sharding(leaf: Any) -> Any:
    typeof = getattr(jax, "typeof", None)
    if typeof is None or not hasattr(leaf, "dtype"):
        return None
    return getattr(typeof(leaf), "sharding", None)


def explicit_axes(*trees: Any) -> tuple[str, ...]:
    """The mesh axes of type ``Explicit``, sorted (often none), of the context mesh (``jax.set_mesh``) and of the
    shardings of the array leaves of ``trees``."""
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    context = getattr(jax.sharding, "get_abstract_mesh", lambda: None)()
    meshes = [context, *(getattr(_named_sharding(leaf), "mesh", None) for leaf in jax.tree.leaves(trees))]
    axes: set[str] = set()
    for mesh in meshes:
        for name, kind in zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ())):
            if explicit is not None and kind == explicit:
                axes.add(name)
    return tuple(sorted(axes))


def spec_of(x: jax.Array) -> tuple[Any, ...]:
    """The mesh axes (or None) each dimension of ``x`` is sharded along, one entry per dimension."""
    spec = tuple(getattr(_named_sharding(x), "spec", None) or ())
    return spec + (None,) * (x.ndim - len(spec))


def _mesh_of(axes: tuple[str, ...], args: Any) -> Any:
    """The abstract mesh that names ``axes``: the context mesh's, else that of an array of ``args``."""
    context = jax.sharding.get_abstract_mesh()
    if set(axes) <= set(getattr(context, "axis_names", ())):
        return context
    for leaf in jax.tree.leaves(args):
        mesh = getattr(_named_sharding(leaf), "mesh", None)
        if mesh is not None and set(axes) <= set(mesh.axis_names):
            return mesh
    raise ValueError(f"no mesh names the explicit axes {axes}: run under jax.set_mesh(mesh)")


def _without(spec: tuple[Any, ...], axes: tuple[str, ...]) -> jax.sharding.PartitionSpec:
    """``spec`` with ``axes`` removed from every entry."""
    def keep(entry: Any) -> Any:
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a not in axes)
            return kept or None
        return None if entry in axes else entry

    return jax.sharding.PartitionSpec(*(keep(entry) for entry in spec))


def on_auto_axes(fn: Any, args: tuple[Any, ...], axes: tuple[str, ...], out_spec: Any) -> Any:
    """``fn(*args)`` with the mesh ``axes`` turned from ``Explicit`` to ``Auto`` inside, as ``jax.sharding.auto_axes``.

    ``out_spec(out)`` gives the result's shardings (a ``PartitionSpec``, or a tree of them like the
    result), so that a result whose structure is known only once ``fn`` ran can be sharded per leaf.
    Every array ``fn`` reads must be in ``args`` (a closed-over array keeps its explicit type, which the
    ``Auto`` context refuses). Differentiable: the cotangents come back with their inputs' shardings.
    """
    mesh = _mesh_of(axes, args)
    auto = mesh.update_axis_types({axis: jax.sharding.AxisType.Auto for axis in axes})
    with jax.sharding.use_abstract_mesh(auto):
        args = jax.tree.map(lambda a: jax.sharding.reshard(a, _without(spec_of(a), axes)), args)
        out = fn(*args)
    specs = out_spec(out)
    if isinstance(specs, jax.sharding.PartitionSpec):
        specs = jax.tree.map(lambda _: specs, out)
    return jax.tree.map(lambda x, spec: jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec)), out, specs)

