"""A ``flax.linen`` Module in the training loop: its variables split into parameters and model state, applied
one example at a time with that example's rng streams.

Imported on demand (by :meth:`jdrop.TrainState.from_linen` and :mod:`jdrop.interop.linen`): ``import jdrop``
never imports flax.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax

from jdrop import masks
from jdrop.train._state import TrainState

__all__ = ["LinenApply", "train_state", "variables"]

_FLAGS = ("deterministic", "train", "training")


def _flag(module: nn.Module) -> str | None:
    """The evaluation flag ``module.__call__`` declares: ``deterministic`` (flax's), ``train``, ``training`` or none."""
    parameters = inspect.signature(module.__call__).parameters
    return next((name for name in _FLAGS if name in parameters), None)


@dataclasses.dataclass(frozen=True, eq=False)
class LinenApply:
    """The one-example ``apply_fn`` of a ``flax.linen`` Module (static: the module and its call conventions).

    ``apply(params, x, *, key, deterministic, model_state=None, **kwargs)`` is what one writes by hand::

        variables = {"params": params, **model_state}
        # evaluation: module.apply(variables, x, deterministic=True, **kwargs), the state unchanged
        out, updates = module.apply(variables, x, deterministic=False, rngs={"dropout": key},
                                    mutable=["batch_stats"], **kwargs)
        return out, {**model_state, **updates}

    with the module's own flag (``deterministic=d``, or ``train=not d`` / ``training=not d``, whichever its
    ``__call__`` declares). In training, rng stream ``j`` of ``rng_streams`` gets the example's key for
    ``j = 0`` and ``fold_in(key, j)`` after, so every example, and every stream, has its own masks; the
    collections in ``mutable`` (batch statistics) come back as the new model state. Compared by identity:
    one compiled step per state made by :func:`train_state`.
    """

    module: nn.Module
    rng_streams: tuple[str, ...]
    mutable: tuple[str, ...]
    flag: str | None

    def __call__(
        self, params: Any, x: Any, *, key: jax.Array | None, deterministic: bool, model_state: Any = None,
        **kwargs: Any,
    ) -> Any:
        variables = {"params": params, **(model_state or {})}
        if self.flag is not None:
            kwargs[self.flag] = deterministic if self.flag == "deterministic" else not deterministic
        if deterministic:
            outputs = self.module.apply(variables, x, **kwargs)
            return outputs if model_state is None else (outputs, model_state)
        key = masks.require_key(key, what="the linen apply_fn", eval_hint="deterministic=True")
        rngs = {name: key if j == 0 else masks.fold_in(key, j) for j, name in enumerate(self.rng_streams)}
        if not self.mutable:
            outputs = self.module.apply(variables, x, rngs=rngs, **kwargs)
            return outputs if model_state is None else (outputs, model_state)
        outputs, updates = self.module.apply(variables, x, rngs=rngs, mutable=list(self.mutable), **kwargs)
        return outputs, {**model_state, **updates}


def train_state(
    module: nn.Module,
    variables: Mapping[str, Any],
    tx: optax.GradientTransformation,
    *,
    rng_streams: Sequence[str] = ("dropout",),
    mutable: Sequence[str] | None = None,
    **options: Any,
) -> TrainState:
    """A :class:`jdrop.TrainState` for a ``flax.linen`` Module, trained with per-example dropout masks.

    ``variables["params"]`` are the parameters (what ``tx`` updates); the other collections
    (``batch_stats``, ...) are the model state. The ``apply_fn`` (:class:`LinenApply`) applies the module to
    ONE example, with that example's key for the ``rng_streams`` (``{"dropout": k_i}``) and, in training,
    the model-state collections mutable (``mutable=["batch_stats"]``): the one-example ``apply_fn`` one
    writes by hand for :func:`jdrop.train_step`. Give ``flax.linen.BatchNorm`` ``axis_name="batch"``
    (:data:`jdrop.train.BATCH_AXIS`) to normalise with the statistics of the whole batch (and
    ``use_running_average=deterministic``). The module's evaluation flag is found from its ``__call__``:
    ``deterministic``, ``train`` or ``training``. :func:`variables` gives the trained variables back.

    Args:
      module: the module.
      variables: its variables, e.g. ``module.init(key, x_example)``; they are not modified.
      tx: an optax transformation.
      rng_streams: the rng collections the module draws from in training (``make_rng`` names).
      mutable: the collections the module updates in training; default: every collection but ``params``.
      **options: :meth:`jdrop.TrainState.create`'s ``loss_fn``, ``hparams`` (keyword arguments of the
        module's ``__call__``), ``batch_format`` and ``axis_name``.

    Example::

      >>> model = Net()                                   # nn.Dropout, nn.BatchNorm(axis_name="batch") inside
      >>> variables = model.init(jax.random.key(0), x[0], deterministic=True)
      >>> state = jdrop.TrainState.from_linen(model, variables, optax.adam(1e-3))
      >>> state, metrics = jdrop.train_step(state, {"x": x, "y": y}, jax.random.key(1))
      >>> variables = jdrop.interop.linen.variables(state)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a flax.linen.Module, got {type(module).__name__}.")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("`variables` must be the module's variables, a mapping with a 'params' collection "
                        "(what module.init returns).")
    if isinstance(rng_streams, str) or not all(isinstance(name, str) for name in rng_streams):
        raise TypeError(f"`rng_streams` must be a sequence of rng collection names, got {rng_streams!r}.")
    state = {name: collection for name, collection in variables.items() if name != "params"}
    mutable = tuple(state) if mutable is None else tuple(mutable)
    unknown = set(mutable) - set(state)
    if unknown:
        raise ValueError(
            f"`mutable` names {sorted(unknown)}, which `variables` does not hold (it has {sorted(state)})."
        )
    apply_fn = LinenApply(module, tuple(rng_streams), mutable, _flag(module))
    return TrainState.create(apply_fn=apply_fn, params=variables["params"], tx=tx, model_state=state or None,
                             **options)


def variables(state: TrainState) -> dict[str, Any]:
    """The ``flax.linen`` variables of a state made by :func:`train_state`: ``{"params": ..., **model_state}``.

    Example::

      >>> logits = model.apply(jdrop.interop.linen.variables(state), x_test, deterministic=True)
    """
    if not isinstance(state.apply_fn, LinenApply):
        raise TypeError("`state` must come from jdrop.TrainState.from_linen (jdrop.interop.linen.train_state).")
    return {"params": state.params, **(state.model_state or {})}
