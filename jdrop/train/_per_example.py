"""jdrop's per-example convention, in one place.

``apply_fn(params, x, *, key, deterministic, **hparams)`` is written for ONE example. Every training-level
tool (:func:`jdrop.train_step`, :func:`jdrop.mc_predict`, :func:`jdrop.rdrop_loss`) runs it over a
batch through :func:`per_example`: ``jax.vmap`` over the examples, example ``i`` (global index
``offset + i``) keyed by ``jdrop.example_keys(key, B, offset=offset)[i]``. So every example samples
its own sub-network, and its mask depends only on the key and its global index.

How ``apply_fn`` is called, decided once from its signature (statically, when it is traced):

- the evaluation flag: ``deterministic=`` if ``apply_fn`` has a parameter named ``deterministic``
  (flax's name, what jdrop uses everywhere), else ``train=`` (``train = not deterministic``, the
  original contract ``apply_fn(params, x, *, key, train)``, which keeps working without a warning);
- the batch: a function marked :func:`jdrop.train.takes_batch` (such as :func:`jdrop.mlp.apply`) is
  called once on the whole batch with the ``B`` example keys instead of being vmapped;
- model state (batch statistics): with ``model_state`` given, ``apply_fn`` also gets
  ``model_state=...`` and returns ``(outputs, new_model_state)``. The vmap over examples is named
  ``axis_name`` (``"batch"``), so a layer that reduces over it (``flax.linen.BatchNorm(axis_name="batch")``,
  ``flax.nnx.BatchNorm(..., axis_name="batch")``, ``equinox.nn.BatchNorm(..., axis_name="batch")``) sees the
  whole batch, and the new state, being the same for every example, comes back once;
- batch axes: ``apply_fn`` is traced in a one-example context, so the variants' default
  ``batch_axis="auto"`` treats its input as one example (``drop_path`` draws once per example, not per
  token); a function marked :func:`jdrop.train.takes_batch` gets the batch, and ``"auto"`` stays axis 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._batching import is_batched, one_example
from jdrop._shard_map import explicit_axes, on_auto_axes, spec_of
from jdrop._typing import KeyLike
from jdrop._validation import deterministic_or_train

__all__ = ["BATCH_AXIS", "call_apply", "check_apply_fn", "per_example"]

BATCH_AXIS = "batch"
"""The name of the vmap over examples: give it to BatchNorm layers as ``axis_name``."""


def check_apply_fn(apply_fn: Any) -> Any:
    """``apply_fn`` if it is callable, else ``TypeError`` with the convention it must follow."""
    if not callable(apply_fn):
        raise TypeError(
            f"`apply_fn` must be callable as apply_fn(params, x, *, key, deterministic), got {apply_fn!r}."
        )
    return apply_fn


def _takes_deterministic(apply_fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(apply_fn).parameters
    except (TypeError, ValueError):  # some callables have no signature: the documented contract then
        return False
    parameter = parameters.get("deterministic")
    return parameter is not None and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)


def call_apply(
    apply_fn: Callable[..., Any], params: Any, x: Any, key: Any, deterministic: bool, extra: Mapping[str, Any]
) -> Any:
    """``apply_fn(params, x, key=key, <flag>, **extra)`` with the flag ``apply_fn`` declares (module docstring)."""
    flag = {"deterministic": deterministic} if _takes_deterministic(apply_fn) else {"train": not deterministic}
    return apply_fn(params, x, key=key, **flag, **extra)


def _on_batch_sharding(mapped: Callable[..., Any], args: tuple[Any, ...], example: Any, axis: int,
                       with_state: bool) -> Any:
    """``mapped(*args)``; on an explicit mesh (``jax.set_mesh``), on ``Auto`` axes, the outputs sharded as the batch.

    ``jax.vmap`` needs its mapped axes sharded alike, and the examples' keys are made from a shape
    (replicated) while the batch is sharded: the compiler propagates the shardings inside instead.
    """
    axes = explicit_axes(args)
    if not axes:
        return mapped(*args)
    batch = P(spec_of(example)[axis]) if hasattr(example, "ndim") else P()

    def specs(out: Any) -> Any:
        if with_state:
            return (jax.tree.map(lambda _: batch, out[0]), jax.tree.map(lambda _: P(), out[1]))
        return jax.tree.map(lambda _: batch, out)

    return on_auto_axes(mapped, args, axes, specs)


def per_example(
    apply_fn: Callable[..., Any],
    params: Any,
    x: Any,
    key: KeyLike | None,
    *,
    deterministic: bool | None = None,
    offset: ArrayLike = 0,
    hparams: Mapping[str, Any] | None = None,
    axis: int = 0,
    model_state: Any = None,
    axis_name: str = BATCH_AXIS,
    train: bool | None = None,
) -> Any:
    """``y_i = apply_fn(params, x_i, key=k_i, deterministic=d, **hparams)`` for every example ``x_i`` of a batch.

    ``k_i = jdrop.example_keys(key, B, offset=offset)[i]`` in training; ``key=None`` in evaluation.
    ``x`` may be any pytree whose leaves hold the examples along ``axis`` (a dict of token ids and a
    padding mask, say); ``x_i`` is then the pytree of example ``i``. See the module docstring for the
    flag ``apply_fn`` gets, functions marked :func:`jdrop.train.takes_batch` and model state.

    Args:
      apply_fn: the network for one example.
      params: its parameters (shared by all examples).
      x: the batch (an array or a pytree of arrays); examples along ``axis``.
      key: the PRNG key of this batch (None in evaluation).
      deterministic: evaluation (True) or training (False, the default).
      offset: global index of the batch's first example (microbatches, shards).
      hparams: keyword arguments of ``apply_fn`` shared by all examples (e.g. traced ``rates``).
      axis: the example axis of ``x``'s leaves.
      model_state: mutable model state (e.g. batch statistics) shared by the examples; when given,
        ``apply_fn(..., model_state=model_state)`` returns ``(outputs, new_model_state)``.
      axis_name: the name of the vmap over examples (for ``BatchNorm(axis_name=...)``).
      train: deprecated spelling of ``not deterministic``.

    Returns:
      The outputs, stacked along a leading example axis; ``(outputs, new_model_state)`` with ``model_state``.

    Raises:
      ValueError: in training without a key, or if the new model state differs between examples
        (a BatchNorm without ``axis_name``).

    Example::

      >>> def apply_fn(params, x, *, key, deterministic):              # ONE example
      ...     return jdrop.dropout(key, x, 0.5, deterministic=deterministic) @ params["w"]
      >>> y = jdrop.train.per_example(apply_fn, {"w": jnp.ones((4, 2))}, jnp.ones((8, 4)), jax.random.key(0))
      >>> y.shape                                                      # (8, 2): every row its own mask
    """
    deterministic = deterministic_or_train(deterministic, train, default=False, where="jdrop.train.per_example")
    extra = dict(hparams or {})
    if model_state is not None:
        extra["model_state"] = model_state
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError("`x` holds no arrays: per_example needs at least one array of examples.")
    size = jnp.shape(leaves[0])[axis]
    keys = None
    if not deterministic:
        key = masks.require_key(key, what="apply_fn", eval_hint="deterministic=True")
        keys = masks.example_keys(key, size, offset=offset)
    if is_batched(apply_fn):
        x = x if axis == 0 else jax.tree_util.tree_map(lambda leaf: jnp.moveaxis(leaf, axis, 0), x)
        return _on_batch_sharding(lambda x, keys, params, extra: call_apply(apply_fn, params, x, keys, deterministic,
                                                                            extra),
                                  (x, keys, params, extra), leaves[0], 0, model_state is not None)

    def one(xi: Any, ki: Any, params: Any, extra: dict[str, Any]) -> Any:
        return call_apply(apply_fn, params, xi, ki, deterministic, extra)

    # params and extra go in as (unmapped) arguments, not in the closure: a module framework that checks
    # where its variables were made (flax nnx) then sees them made inside the vmap that updates them.
    in_axes = (axis, None if keys is None else 0, None, None)
    out_axes: Any = 0 if model_state is None else (0, None)
    mapped = jax.vmap(one, in_axes=in_axes, out_axes=out_axes, axis_name=axis_name)
    try:
        with one_example():  # the variants' batch_axis="auto" is None: apply_fn sees one example
            return _on_batch_sharding(mapped, (x, keys, params, extra), leaves[0], axis, model_state is not None)
    except ValueError as error:
        if model_state is None or "out_axes" not in str(error):
            raise
        raise ValueError(
            "The model state apply_fn returns differs between the examples of a batch: a layer updates it "
            f"from one example. Reduce over the batch, e.g. BatchNorm(..., axis_name={axis_name!r})."
        ) from error
