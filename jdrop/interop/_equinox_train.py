"""An ``equinox`` Module in the training loop: partitioned into parameters and the rest, applied per example.

Imported on demand (by :meth:`jdrop.TrainState.from_equinox` and :mod:`jdrop.interop.equinox`): ``import
jdrop`` never imports equinox.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import optax

from jdrop.train._state import TrainState

__all__ = ["EquinoxApply", "combine", "train_state"]

_EVAL_KEY_SEED = 0


@dataclasses.dataclass(frozen=True, eq=False)
class EquinoxApply:
    """The one-example ``apply_fn`` of a partitioned ``equinox`` Module (static: the non-parameter part).

    ``apply(params, x, *, key, deterministic, model_state=..., **kwargs)`` combines the module, sets every
    ``inference`` field with ``equinox.nn.inference_mode(model, deterministic)``, and calls it the equinox
    way: ``model(x, key=key, **kwargs)``, or ``model(x, model_state, key=key, **kwargs)`` returning
    ``(outputs, state)`` for a stateful module (``equinox.nn.make_with_state``). The module splits ``key``
    among its layers, as equinox modules do; in evaluation it gets a fixed key, which dropout in inference
    mode ignores. Compared by identity: one compiled step per state made by :func:`train_state`.
    """

    static: Any
    stateful: bool

    def __call__(
        self, params: Any, x: Any, *, key: jax.Array | None, deterministic: bool, **kwargs: Any
    ) -> Any:
        model = eqx.nn.inference_mode(eqx.combine(params, self.static), value=deterministic)
        if key is None:
            key = jax.random.key(_EVAL_KEY_SEED)
        if self.stateful:
            model_state = kwargs.pop("model_state")
            return model(x, model_state, key=key, **kwargs)
        return model(x, key=key, **kwargs)

    def combine(self, params: Any) -> eqx.Module:
        """The module with these parameters (``equinox.combine``)."""
        return eqx.combine(params, self.static)


def train_state(
    model: eqx.Module,
    tx: optax.GradientTransformation,
    *,
    state: eqx.nn.State | None = None,
    **options: Any,
) -> TrainState:
    """A :class:`jdrop.TrainState` for an ``equinox`` Module, trained with per-example dropout masks.

    ``equinox.partition(model, equinox.is_inexact_array)`` gives the parameters (what ``tx`` updates);
    the rest stays static in the ``apply_fn`` (:class:`EquinoxApply`), which runs the module on ONE
    example with that example's key, ``model(x_i, key=k_i)`` (``model(x_i, state, key=k_i)`` with
    ``state``), so every example's ``equinox.nn.Dropout`` (or :class:`jdrop.interop.equinox.Dropout`)
    draws its own mask. ``state`` (from ``equinox.nn.make_with_state``) becomes ``model_state``; give
    ``equinox.nn.BatchNorm`` ``axis_name="batch"`` (:data:`jdrop.train.BATCH_AXIS`) to normalise with the
    statistics of the whole batch. :func:`combine` turns the trained state back into a module.

    Args:
      model: the module.
      tx: an optax transformation.
      state: the module's ``equinox.nn.State``, for a stateful module (BatchNorm).
      **options: :meth:`jdrop.TrainState.create`'s ``loss_fn``, ``hparams`` (keyword arguments of the
        module's ``__call__``), ``batch_format`` and ``axis_name``.

    Example::

      >>> model, bn_state = eqx.nn.make_with_state(Net)(key=jax.random.key(0))
      >>> state = jdrop.TrainState.from_equinox(model, optax.adam(1e-3), state=bn_state)
      >>> state, metrics = jdrop.train_step(state, {"x": x, "y": y}, jax.random.key(1))
      >>> model, bn_state = jdrop.interop.equinox.combine(state)
    """
    if not isinstance(model, eqx.Module):
        raise TypeError(f"`model` must be an equinox.Module, got {type(model).__name__}.")
    if state is not None and not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"`state` must be an equinox.nn.State (from equinox.nn.make_with_state), got {type(state).__name__}."
        )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return TrainState.create(
        apply_fn=EquinoxApply(static, state is not None), params=params, tx=tx, model_state=state, **options
    )


def combine(state: TrainState) -> eqx.Module | tuple[eqx.Module, eqx.nn.State]:
    """The ``equinox`` Module of a state made by :func:`train_state`, with ``(module, state)`` for a stateful one.

    Example::

      >>> model = jdrop.interop.equinox.combine(state)
      >>> logits = jax.vmap(eqx.nn.inference_mode(model))(x_test, key=keys)   # keys: ignored in inference
    """
    if not isinstance(state.apply_fn, EquinoxApply):
        raise TypeError(
            "`state` must come from jdrop.TrainState.from_equinox (jdrop.interop.equinox.train_state)."
        )
    model = state.apply_fn.combine(state.params)
    return (model, state.model_state) if state.apply_fn.stateful else model
