"""A ``flax.nnx`` Module in the training loop: split into parameters and state, applied one example at a time.

Imported on demand (by :meth:`jdrop.TrainState.from_nnx` and :mod:`jdrop.interop.nnx`): ``import jdrop``
never imports flax.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdrop import masks
from jdrop.train._state import TrainState

__all__ = ["NnxApply", "merge", "train_state"]


def _is_variable(value: Any) -> bool:
    return isinstance(value, nnx.Variable)


def _is_stream_state(variable: Any) -> bool:
    return isinstance(variable, (nnx.RngKey, nnx.RngCount))


def _variables(state: Any) -> tuple[list[Any], Any]:
    return jax.tree_util.tree_flatten(state, is_leaf=_is_variable)


def _reseed(model_state: Any, key: jax.Array) -> Any:
    """``model_state`` with rng stream ``j`` (in the state's order) restarted at ``fold_in(key, j)``, count 0."""
    variables, treedef = _variables(model_state)
    reseeded, stream = [], 0
    for variable in variables:
        if isinstance(variable, nnx.RngKey):
            if jnp.shape(variable.get_value()) != ():
                raise ValueError(
                    f"train_step gives every example its own key; an rng stream with a key array of shape "
                    f"{jnp.shape(variable.get_value())} (split for nnx.vmap) cannot take it."
                )
            variable = variable.replace(masks.fold_in(key, stream))
            stream += 1
        elif isinstance(variable, nnx.RngCount):
            variable = variable.replace(jnp.zeros_like(variable.get_value()))
        reseeded.append(variable)
    return jax.tree_util.tree_unflatten(treedef, reseeded)


@dataclasses.dataclass(frozen=True)
class NnxApply:
    """The one-example ``apply_fn`` of a split ``flax.nnx`` Module (static: its graph definition).

    ``apply(params, x, *, key, deterministic, model_state, **kwargs)`` merges the module, sets it to
    ``train()`` or ``eval()`` (``deterministic``: dropout off, BatchNorm on its running statistics), and in
    training restarts every rng stream of the module at ``fold_in(key, j)`` (stream ``j`` in the order
    of the state's leaves, count 0), so each example's dropout layers, ``nnx.Dropout`` or
    :class:`jdrop.interop.nnx.Dropout`, draw masks from that example's key and no two layers share one.
    It returns ``(model(x, **kwargs), new_model_state)``; the rng streams come back unchanged (the next
    step's keys come from the next step key), the rest (batch statistics) as the module left it.
    """

    graphdef: Any
    wrt: Any = nnx.Param

    def __call__(
        self, params: Any, x: Any, *, key: jax.Array | None, deterministic: bool, model_state: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        model = nnx.merge(self.graphdef, params, model_state if key is None else _reseed(model_state, key))
        if deterministic:
            model.eval()
        else:
            model.train()
        outputs = model(x, **kwargs)
        _, _, new_state = nnx.split(model, self.wrt, ...)  # type: ignore[misc]
        old, treedef = _variables(model_state)
        new, new_treedef = _variables(new_state)
        if new_treedef != treedef:
            raise ValueError(
                "The nnx module created or removed variables while it ran (e.g. by sow): train_step keeps the "
                "state's structure fixed. Create every variable in __init__."
            )
        kept = [o if _is_stream_state(o) else n for o, n in zip(old, new)]
        return outputs, jax.tree_util.tree_unflatten(treedef, kept)

    def merge(self, params: Any, model_state: Any) -> nnx.Module:
        """The module with these parameters and this state (``nnx.merge``)."""
        return nnx.merge(self.graphdef, params, model_state)


def train_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, wrt: Any = nnx.Param, **options: Any
) -> TrainState:
    """A :class:`jdrop.TrainState` for a ``flax.nnx`` Module, trained with per-example dropout masks.

    ``nnx.split(model, wrt, ...)`` gives the parameters (what ``tx`` updates, ``wrt``: ``nnx.Param`` by
    default, any nnx filter) and the rest of the state (batch statistics, rng streams), which becomes
    ``model_state``. The ``apply_fn`` (:class:`NnxApply`) runs the module on ONE example: in training,
    every rng stream restarts at ``fold_in(k_i, j)`` from example ``i``'s key ``k_i``, so every example,
    and every dropout layer (``nnx.Dropout`` or jdrop's adapter), has its own mask, which ``nnx.vmap``
    over a module with one stream does not give. Give ``nnx.BatchNorm`` ``axis_name="batch"``
    (:data:`jdrop.train.BATCH_AXIS`) to normalise with the statistics of the whole batch.
    :func:`merge` turns the trained state back into a module.

    Args:
      model: the module; it is not modified.
      tx: an optax transformation.
      wrt: the nnx filter of the trained parameters.
      **options: :meth:`jdrop.TrainState.create`'s ``loss_fn``, ``hparams`` (keyword arguments of the
        module's ``__call__``), ``batch_format`` and ``axis_name``.

    Example::

      >>> model = MLP(rngs=nnx.Rngs(0))              # with nnx.Dropout and nnx.BatchNorm(..., axis_name="batch")
      >>> state = jdrop.TrainState.from_nnx(model, optax.adam(1e-3))
      >>> state, metrics = jdrop.train_step(state, {"x": x, "y": y}, jax.random.key(1))
      >>> model = jdrop.interop.nnx.merge(state)     # the trained module
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`model` must be a flax.nnx.Module, got {type(model).__name__}.")
    graphdef, params, model_state = nnx.split(model, wrt, ...)  # type: ignore[misc]
    return TrainState.create(
        apply_fn=NnxApply(graphdef, wrt), params=params, tx=tx, model_state=model_state, **options
    )


def merge(state: TrainState) -> nnx.Module:
    """The ``flax.nnx`` Module of a state made by :func:`train_state`, with its trained parameters and state.

    Example::

      >>> model = jdrop.interop.nnx.merge(state)
      >>> model.eval()                                 # BatchNorm on its running statistics, dropout off
      >>> logits = model(x_test)
    """
    if not isinstance(state.apply_fn, NnxApply):
        raise TypeError("`state` must come from jdrop.TrainState.from_nnx (jdrop.interop.nnx.train_state).")
    return state.apply_fn.merge(state.params, state.model_state)
