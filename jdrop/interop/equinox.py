"""``equinox`` Dropout around :func:`jdrop.dropout`: a drop-in replacement for ``equinox.nn.Dropout``."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
from jaxtyping import Array, PRNGKeyArray

from jdrop._dropout import Residual, Scale, dropout
from jdrop.interop import _check_fields

__all__ = ["Dropout"]


class Dropout(eqx.Module):
    """Dropout (Srivastava et al. 2014) as an ``equinox`` module, computed by :func:`jdrop.dropout`.

    The fields, call signature and errors of ``equinox.nn.Dropout`` (``p``, ``inference``,
    ``key=``, the deprecated ``deterministic``; toggled with ``equinox.nn.inference_mode``), plus
    jdrop's ``scale`` and ``residual``. The mask is ``jdrop.dropout``'s for ``key``, which is
    equinox's mask (``jax.random.bernoulli(key, 1 - p, x.shape)``): same model, same keys, same
    outputs and gradients (to float rounding). With ``m`` that mask and ``keep = 1 - p`` (to
    2**-23, see :func:`jdrop.dropout`)::

        scale="inverted" (equinox's):  train  y = m * x / keep      inference  y = x
        scale="classic":               train  y = m * x             inference  y = keep * x

    Unlike equinox, the backward pass does not keep the mask unless asked: ``residual="key"``
    regenerates it from the key, ``"bits"`` keeps it packed 1 bit per element, ``"mask"`` keeps
    the bool mask as equinox does. All three give the same gradients, and ``p = 1`` gives zero
    (not NaN) gradients.

    Example::

      >>> import equinox as eqx, jax, jax.numpy as jnp
      >>> from jdrop.interop import equinox as jdrop_eqx
      >>> dropout = jdrop_eqx.Dropout(0.5)
      >>> y = dropout(jnp.ones(8), key=jax.random.key(0))              # train: m * x / 0.5
      >>> y = eqx.nn.inference_mode(dropout)(jnp.ones(8))              # inference: x
    """

    # Not static, as in equinox: one may want to change them with equinox.tree_at.
    p: float
    inference: bool
    # Static: they choose the computation, and are strings (not arrays) in any case.
    scale: Scale = eqx.field(static=True)
    residual: Residual = eqx.field(static=True)

    def __init__(
        self,
        p: float = 0.5,
        inference: bool = False,
        *,
        deterministic: bool | None = None,
        scale: Scale = "inverted",
        residual: Residual = "key",
    ):
        """**Arguments:**

        - `p`: The fraction of entries to set to zero. (On average.)
        - `inference`: Whether to actually apply dropout at all. If `True` then dropout is *not*
            applied. May be toggled with `equinox.nn.inference_mode` or overridden at call time.
        - `deterministic`: Deprecated alternative to `inference` (as in equinox).
        - `scale`: `"inverted"` (default, equinox's) or `"classic"`.
        - `residual`: `"key"` (default), `"bits"` or `"mask"`: what the backward pass keeps.
        """
        if deterministic is not None:
            inference = deterministic
            warnings.warn("Dropout(deterministic=...) is deprecated in favour of Dropout(inference=...)", stacklevel=2)
        _check_fields(scale, residual)
        self.p = p
        self.inference = inference
        self.scale = scale
        self.residual = residual

    # Backward compatibility, as in equinox.
    @property
    def deterministic(self) -> bool:
        return self.inference

    def __call__(
        self,
        x: Array,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        deterministic: bool | None = None,
    ) -> Array:
        """**Arguments:**

        - `x`: A floating JAX array of any shape to dropout.
        - `key`: A PRNG key providing the randomness of the mask. (Keyword only argument.)
        - `inference`: If `True` or `False`, takes priority over `self.inference`; if `None`,
            `self.inference` is used.
        - `deterministic`: Deprecated alternative to `inference` (as in equinox).

        **Returns:**

        The dropped-out array, same shape and dtype as `x`.
        """
        if deterministic is not None:
            inference = deterministic
            warnings.warn(
                "Dropout()(deterministic=...) is deprecated in favour of Dropout()(inference=...)", stacklevel=2
            )
        if inference is None:
            inference = self.inference
        if isinstance(self.p, (int, float)) and self.p == 0:
            inference = True
        with jax.named_scope("jdrop.interop.equinox.Dropout"):
            if inference:
                return dropout(None, x, self.p, deterministic=True, scale=self.scale, residual=self.residual)
            if key is None:
                raise RuntimeError("Dropout requires a key when running in non-deterministic mode.")
            return dropout(key, x, self.p, scale=self.scale, residual=self.residual)
