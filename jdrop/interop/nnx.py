"""``flax.nnx`` Dropout around :func:`jdrop.dropout`: a drop-in replacement for ``flax.nnx.Dropout``.

For attention, pass ``attention_fn=jdrop.dot_product_attention`` to ``flax.nnx.MultiHeadAttention``: the
same dropout mask for the same rngs, in O(T) memory (see :func:`jdrop.dot_product_attention`).

A flax.nnx transformer gets jdrop's dropout everywhere with two changes, same parameters, same rngs, same
outputs and gradients (to float rounding)::

    self.dropout = jdrop.interop.nnx.Dropout(0.1, rngs=rngs)       # was nnx.Dropout: residual and MLP dropout
    self.attention = nnx.MultiHeadAttention(heads, width, dropout_rate=0.1, decode=False, rngs=rngs,
                                            attention_fn=jdrop.dot_product_attention)

nnx's attention draws ``dropout_rng`` from its ``rngs`` stream (the call's ``rngs``, else the module's) and
passes it to ``attention_fn``, which draws flax's mask tile by tile. Both work under ``nnx.remat``; see
BENCHMARKS.md, "Transformer benchmark", for the memory and time.

To train a module with :func:`jdrop.train_step` (every example its own dropout mask, BatchNorm over the
whole batch), :func:`train_state` splits it into a :class:`jdrop.TrainState` and :func:`merge` turns the
trained state back into a module::

    state = jdrop.interop.nnx.train_state(model, optax.adam(1e-3))    # = jdrop.TrainState.from_nnx
    state, metrics = jdrop.train_step(state, batch, key)
    model = jdrop.interop.nnx.merge(state)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdrop._dropout import Residual, Scale, dropout
from jdrop._validation import check_float_input
from jdrop.interop import _check_fields, _concrete_rate
from jdrop.train._nnx import NnxApply, merge, train_state

__all__ = ["Dropout", "NnxApply", "merge", "train_state"]

_NO_DETERMINISTIC = (
    "No `deterministic` argument was provided to Dropout. Pass it to the constructor "
    "(Dropout(..., deterministic=True/False)) or to the call (dropout(x, deterministic=True/False)), "
    "or set it with model.train() / model.eval() or nnx.view(model, deterministic=True/False)."
)
_NO_RNGS = (
    "`deterministic` is False, but no `rngs` argument was provided to Dropout as either a __call__ "
    "argument or a constructor argument: pass rngs=nnx.Rngs(dropout=seed) to one of them."
)


class Dropout(nnx.Dropout):
    """Dropout (Srivastava et al. 2014) as a ``flax.nnx`` module, computed by :func:`jdrop.dropout`.

    A subclass of ``flax.nnx.Dropout`` (so ``model.train()``, ``model.eval()``, ``nnx.view`` and
    filters on ``nnx.Dropout`` treat it as one) with its arguments, rng streams and errors: the key
    is drawn from the call's ``rngs`` if given, else from the stream forked at construction, and
    only when a mask is needed (not in deterministic mode, nor at rate 0 or 1), so the streams
    advance as with ``flax.nnx.Dropout``. That key goes to ``jdrop.dropout``, whose mask is flax's
    mask (``jax.random.bernoulli(key, 1 - rate)``): same model, same rngs, same outputs and
    gradients (to float rounding). With ``m`` that mask, shared along ``broadcast_dims``, and
    ``keep = 1 - rate`` (to 2**-23, see :func:`jdrop.dropout`)::

        scale="inverted" (flax's):  train  y = m * x / keep      deterministic  y = x
        scale="classic":            train  y = m * x             deterministic  y = keep * x

    Unlike flax, the backward pass does not keep the mask unless asked: ``residual="key"``
    regenerates it from the key, ``"bits"`` keeps it packed 1 bit per element, ``"mask"`` keeps
    the bool mask as flax does. All three give the same gradients.

    Args:
      rate: the dropout probability (*not* the keep rate!).
      broadcast_dims: dimensions that will share the same dropout mask.
      deterministic: if False the inputs are masked and scaled; if True no mask is applied.
        ``model.train()`` / ``model.eval()`` set it; the call's argument takes precedence.
      rng_collection: the rng collection name to use when requesting an rng key.
      rngs: an ``nnx.Rngs`` (its ``rng_collection`` stream is forked) or an ``nnx.RngStream``.
      scale: ``"inverted"`` (default, flax's) or ``"classic"``.
      residual: ``"key"``, ``"bits"`` or ``"mask"``: what the backward pass keeps (None: the
        default per key implementation, see :func:`jdrop.dropout`).

    Example::

      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from jdrop.interop import nnx as jdrop_nnx
      >>> class MLP(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear = nnx.Linear(3, 4, rngs=rngs)
      ...     self.dropout = jdrop_nnx.Dropout(0.5, rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.dropout(self.linear(x))
      >>> model = MLP(rngs=nnx.Rngs(0))
      >>> y_train = model(jnp.ones((1, 3)))   # dropout on
      >>> model.eval()
      >>> y_eval = model(jnp.ones((1, 3)))    # identity
    """

    def __init__(
        self,
        rate: float,
        *,
        broadcast_dims: Sequence[int] = (),
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        scale: Scale = "inverted",
        residual: Residual | None = None,
    ):
        _check_fields(scale, residual)
        super().__init__(
            rate, broadcast_dims=broadcast_dims, deterministic=deterministic, rng_collection=rng_collection, rngs=rngs
        )
        self.scale = scale
        self.residual = residual

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """Applies a random dropout mask to the input.

        Args:
          inputs: the inputs that should be randomly masked (a floating array).
          deterministic: if False the inputs are masked and scaled; if True no mask is applied.
            Takes precedence over the constructor's ``deterministic``.
          rngs: an optional key, ``nnx.RngStream`` or ``nnx.Rngs`` to draw the mask's key from;
            takes precedence over the ``rngs`` given to the constructor.

        Returns:
          The masked inputs, reweighted to preserve the mean; same shape and dtype.
        """
        if deterministic is None:
            deterministic = self.deterministic
        if deterministic is None:
            raise ValueError(_NO_DETERMINISTIC)
        rate = _concrete_rate(self.rate)
        options: dict[str, Any] = dict(broadcast_dims=self.broadcast_dims, scale=self.scale, residual=self.residual)
        if rate == 0.0 or deterministic:
            return dropout(None, inputs, self.rate, deterministic=True, **options)
        if rate == 1.0:
            # flax draws no key at rate 1; neither do we, so the stream stays in step with flax's.
            return jnp.zeros_like(check_float_input(inputs))
        if rngs is None:
            rngs = self.rngs
        if isinstance(rngs, nnx.Rngs):
            key = rngs[self.rng_collection]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        elif isinstance(rngs, jax.Array):
            key = rngs
        elif rngs is None:
            raise ValueError(_NO_RNGS)
        else:
            raise TypeError(f"rngs must be a Rngs, RngStream or jax.Array, but got {type(rngs)}.")
        return dropout(key, inputs, self.rate, **options)
