"""The training state: parameters, optimiser state, step and hyper-parameters, as one pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jdrop.train._losses import softmax_cross_entropy

__all__ = ["Batch", "LossFn", "TrainState", "check_batch"]

Batch = Mapping[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["step", "params", "opt_state", "hparams"],
    meta_fields=["apply_fn", "tx", "loss_fn"],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, optimiser state and step count (a pytree); ``apply_fn``, ``tx``, ``loss_fn`` are static.

    ``loss_fn(outputs, targets)`` returns the mean loss of a minibatch; the default is
    :func:`softmax_cross_entropy` with integer labels.

    ``hparams`` is an optional dict of arrays passed to ``apply_fn`` as keyword arguments, e.g.
    ``{"rates": (0.1, 0.5, 0.5)}`` for :func:`jdrop.mlp.apply`. Being data, not static, it can change
    between steps (a rate schedule: ``dataclasses.replace(state, hparams=...)``) or be vmapped over
    (a rate sweep as one compiled program) without recompiling.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    apply_fn: Callable[..., jax.Array]
    tx: optax.GradientTransformation
    loss_fn: LossFn = softmax_cross_entropy
    hparams: Any = None

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., jax.Array],
        params: Any,
        tx: optax.GradientTransformation,
        loss_fn: LossFn | None = None,
        hparams: Mapping[str, Any] | None = None,
    ) -> TrainState:
        """A fresh state at step 0 with ``tx.init(params)``."""
        if not callable(apply_fn):
            raise TypeError(f"`apply_fn` must be callable as apply_fn(params, x, *, key, train), got {apply_fn!r}.")
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(f"`tx` must be an optax.GradientTransformation, got {type(tx).__name__}.")
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            apply_fn=apply_fn,
            tx=tx,
            loss_fn=softmax_cross_entropy if loss_fn is None else loss_fn,
            hparams=None if hparams is None else jax.tree_util.tree_map(_strongly_typed, dict(hparams)),
        )

    def apply_gradients(self, grads: Any) -> TrainState:
        """One optimiser update: ``params <- params + tx.update(grads)``."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return dataclasses.replace(
            self, step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state
        )


def _strongly_typed(value: Any) -> jax.Array:
    """``value`` as an array of a definite dtype: a Python float becomes float32, not a weakly typed array,
    so that replacing it by a schedule's float32 output later does not recompile the step."""
    array = jnp.asarray(value)
    return jnp.asarray(array, dtype=array.dtype)


def check_batch(batch: Any) -> tuple[jax.Array, jax.Array]:
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        raise TypeError(f"`batch` must be a mapping with keys 'x' and 'y', got {type(batch).__name__}.")
    x, y = batch["x"], batch["y"]
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] != jnp.shape(y)[0]:
        raise ValueError(
            f"`batch['x']` and `batch['y']` must share their leading (example) axis, "
            f"got {jnp.shape(x)} and {jnp.shape(y)}."
        )
    return x, y
