"""The one custom_vjp core of jdrop: ``dropout``, ``dropout_fwd`` and ``dropout_bwd``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._typing import KeyLike
from jdrop._validation import (
    check_choice,
    check_deterministic,
    check_float_input,
    check_rate,
    check_scale,
    keep_probability,
    rate_is_valid,
)

__all__ = ["DropoutResidual", "dropout", "dropout_bwd", "dropout_fwd", "keep_and_factor"]

Scale = Literal["inverted", "classic"]
Residual = Literal["key", "bits", "mask"]
RESIDUALS = ("key", "bits", "mask")
"""The residual policies of :func:`dropout`."""


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["key_data", "mask", "threshold", "valid"],
    meta_fields=["residual", "scale", "train", "impl", "mask_shape", "identity"],
)
@dataclasses.dataclass(frozen=True)
class DropoutResidual:
    """What :func:`dropout_bwd` needs to apply the forward pass's mask again.

    Per policy, the only per-element field is ``mask``:

    - ``"key"``: ``key_data`` (2 words for threefry); ``mask`` is None. The backward pass
      regenerates the mask from the key, so nothing per element is kept.
    - ``"bits"``: ``mask`` is the drawn mask packed 8 elements per byte (:func:`jdrop.masks.pack_bits`).
    - ``"mask"``: ``mask`` is the drawn bool mask (1 byte per element, what other libraries keep).
    - deterministic (``train=False``): no mask; the backward pass multiplies by the eval scale.

    ``threshold`` is the integer keep threshold (``ceil(keep * 2**23)``) and ``valid`` is False
    when a traced rate was outside [0, 1] (outputs and gradients are then NaN). ``identity`` marks a
    pass that is statically the identity (static rate 0, or inverted evaluation with a static rate):
    it returns its input itself, not a product with 1, which XLA:CPU would flush to zero for
    subnormal numbers outside ``jit``.
    """

    key_data: jax.Array | None
    mask: jax.Array | None
    threshold: jax.Array
    valid: jax.Array
    residual: str
    scale: str
    train: bool
    impl: str | None
    mask_shape: tuple[int, ...]
    identity: bool = False


@dataclasses.dataclass(frozen=True)
class _Options:
    """The static part of a training call: the custom_vjp's (hashable) non-differentiable argument."""

    residual: str
    scale: str
    impl: str | None
    mask_shape: tuple[int, ...]


def _residual(
    options: _Options,
    threshold: jax.Array,
    valid: jax.Array,
    *,
    train: bool,
    key_data: jax.Array | None = None,
    mask: jax.Array | None = None,
    identity: bool = False,
) -> DropoutResidual:
    """The one place that builds a :class:`DropoutResidual`."""
    return DropoutResidual(
        key_data=key_data,
        mask=mask,
        threshold=threshold,
        valid=valid,
        residual=options.residual,
        scale=options.scale,
        train=train,
        impl=options.impl,
        mask_shape=options.mask_shape,
        identity=identity,
    )


def _keep_and_factor(
    threshold: jax.Array, valid: jax.Array | bool, *, scale: str, train: bool, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """The realised keep probability and the factor of a pass, in ``dtype``; the factor is NaN if invalid.

    Train: kept elements are multiplied by ``1 / keep`` (inverted; 0 when ``keep = 0``, where nothing
    is kept) or 1 (classic). Eval: every element by 1 (inverted) or ``keep`` (classic).
    """
    keep = masks.realised_keep(threshold).astype(dtype)
    if train and scale == "inverted":
        factor = jnp.where(threshold > 0, 1.0 / jnp.where(threshold > 0, keep, 1.0), 0.0)
    elif train or scale == "inverted":
        factor = jnp.ones((), dtype)
    else:
        factor = keep
    return keep, jnp.where(valid, factor, jnp.nan).astype(dtype)


def keep_and_factor(
    rate: ArrayLike, *, scale: str = "inverted", train: bool = True, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """The realised keep probability of ``rate`` and the factor dropout multiplies by, as the core uses them.

    ``keep = ceil((1 - rate) * 2**23) / 2**23``; the factor is ``1 / keep`` (inverted training, 0 at
    ``keep = 0``), 1 (classic training, inverted evaluation) or ``keep`` (classic evaluation); NaN for a
    traced ``rate`` outside [0, 1]. Variants that scale by hand (alpha dropout, DropConnect's moments) use it.
    """
    checked = check_rate(rate)
    threshold = masks.keep_threshold(keep_probability(checked))
    return _keep_and_factor(threshold, rate_is_valid(checked), scale=check_scale(scale), train=train, dtype=dtype)


def _compute_dtype(dtype: Any) -> np.dtype:
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _apply(res: DropoutResidual, mask: jax.Array | None, values: jax.Array) -> jax.Array:
    """``values * mask * multiplier`` in at least float32, cast back to the input dtype."""
    if res.identity:
        return values
    dtype = _compute_dtype(values.dtype)
    _, factor = _keep_and_factor(res.threshold, res.valid, scale=res.scale, train=res.train, dtype=dtype)
    wide = values.astype(dtype)
    if mask is None:
        out = wide * factor
    else:
        fill = jnp.where(res.valid, dtype.type(0), dtype.type(np.nan))
        out = jnp.where(mask, wide * factor, fill)
    return out.astype(values.dtype)


def _mask_from_key(key_data: jax.Array, res: DropoutResidual, shape: tuple[int, ...]) -> jax.Array:
    """The keep mask at ``res.mask_shape``, for a consumer of ``shape`` (broadcast along ``broadcast_dims``)."""
    key = jax.random.wrap_key_data(key_data, impl=res.impl)
    bits = masks.random_bits(key, res.mask_shape, broadcast_to=shape)
    return masks.keep_from_bits(bits, res.threshold)


def _train_forward(
    options: _Options, key_data: jax.Array, x: jax.Array, threshold: jax.Array, valid: jax.Array
) -> tuple[jax.Array, DropoutResidual]:
    res = _residual(options, threshold, valid, train=True, key_data=key_data)
    mask = _mask_from_key(key_data, res, x.shape)
    y = _apply(res, mask, x)
    if options.residual == "bits":
        res = dataclasses.replace(res, key_data=None, mask=masks.pack_bits(mask))
    elif options.residual == "mask":
        res = dataclasses.replace(res, key_data=None, mask=mask)
    return y, res


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train_dropout(options, key_data, x, threshold, valid):
    return _train_forward(options, key_data, x, threshold, valid)[0]


def _train_dropout_bwd(options, res, dy):
    del options
    return None, dropout_bwd(res, dy), None, None


_train_dropout.defvjp(_train_forward, _train_dropout_bwd)


def dropout_bwd(res: DropoutResidual, dy: jax.Array) -> jax.Array:
    """Backward pass of dropout: ``dx = dy * m * s`` with the forward pass's mask ``m``.

    ``s`` is ``1 / keep`` (inverted) or 1 (classic) in training, and 1 (inverted) or ``keep``
    (classic) in a deterministic pass. With ``residual="key"`` the mask is regenerated from the
    key, tied to ``dy`` by an optimisation barrier. What the barrier does depends on the compiler:
    it stops XLA's common-subexpression pass from merging the regeneration with the forward pass's
    mask (which would then be kept alive as a per-element residual); XLA:CPU removes barriers right
    after that pass (``cse_barrier_expander``), so they do not constrain its fusion. Inside one
    ``jit`` XLA then computes the mask within the fusions that use it, forward and backward alike:
    the compiled step keeps nothing per element (``tests/test_dropout.py`` checks the temporary
    memory).

    Args:
      res: the residual returned by :func:`dropout_fwd`.
      dy: cotangent of the output, same shape as the forward input.

    Returns:
      ``dx``, with the dtype of ``dy``.
    """
    if not res.train:
        return _apply(res, None, dy)
    if res.residual == "key":
        key_data, dy = lax.optimization_barrier((res.key_data, dy))
        mask = _mask_from_key(key_data, res, dy.shape)
    else:
        assert res.mask is not None, "a bits/mask residual carries the mask"
        mask = masks.unpack_bits(res.mask, res.mask_shape) if res.residual == "bits" else res.mask
    return _apply(res, mask, dy)


def mask_residual(mask: jax.Array, rate: ArrayLike, *, scale: str = "inverted") -> DropoutResidual:
    """A training residual that holds ``mask`` itself, for ``dropout_bwd(res, dy) = dy * mask * s``.

    ``s`` is the training scale of ``rate`` (``1 / keep`` or 1) and a traced ``rate`` outside
    [0, 1] makes the result NaN, as in the forward pass. :mod:`jdrop.mlp` uses it with
    ``mask = [a > 0]`` for a ReLU layer's dropped activation ``a``, which is the dropout mask
    times ``relu'``: the backward pass then needs neither the key nor a stored mask.
    """
    checked = check_rate(rate)
    threshold = masks.keep_threshold(keep_probability(checked))
    options = _Options(residual="mask", scale=check_scale(scale), impl=None, mask_shape=tuple(mask.shape))
    return _residual(options, threshold, jnp.asarray(rate_is_valid(checked)), train=True, mask=mask)


def check_options(scale: Any, residual: Any) -> None:
    """Rejects an unknown ``scale`` or ``residual`` (``ValueError``)."""
    check_scale(scale)
    check_choice(residual, RESIDUALS, name="residual")


class _Call(NamedTuple):
    """A checked call: a training pass (``key_data`` set) or a deterministic one (``key_data`` None)."""

    x: jax.Array
    options: _Options
    threshold: jax.Array
    valid: jax.Array
    key_data: jax.Array | None
    identity: bool

    def eval_residual(self) -> DropoutResidual:
        return _residual(self.options, self.threshold, self.valid, train=False, identity=self.identity)

    def train_arguments(self) -> tuple[Any, ...]:
        """The arguments of the custom_vjp core (and of its forward rule)."""
        return self.options, self.key_data, self.x, self.threshold, self.valid


def _prepare(key, x, rate, deterministic, broadcast_dims, scale, residual) -> _Call:
    """Checks and canonicalises the arguments at trace time (``rate == 0`` statically is deterministic)."""
    x = check_float_input(x)
    check_options(scale, residual)
    deterministic = check_deterministic(deterministic)
    rate = check_rate(rate)
    mask_shape = masks.broadcast_shape(x.shape, broadcast_dims)
    threshold = masks.keep_threshold(keep_probability(rate))
    valid = jnp.asarray(rate_is_valid(rate))
    static = isinstance(rate, float)
    if deterministic or (static and rate == 0.0):
        options = _Options(residual=residual, scale=scale, impl=None, mask_shape=mask_shape)
        identity = static and (rate == 0.0 or scale == "inverted")
        return _Call(x, options, threshold, valid, None, identity)
    key = masks.require_key(key, what="dropout")
    options = _Options(residual=residual, scale=scale, impl=str(jax.random.key_impl(key)), mask_shape=mask_shape)
    return _Call(x, options, threshold, valid, jax.random.key_data(key), False)


def dropout_fwd(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    deterministic: bool = False,
    broadcast_dims: Sequence[int] = (),
    scale: Scale = "inverted",
    residual: Residual = "key",
) -> tuple[jax.Array, DropoutResidual]:
    """Dropout's forward pass, returning the output and the residuals for :func:`dropout_bwd`.

    Same arguments and output as :func:`dropout`; use this pair when writing a backward pass by
    hand (as :mod:`jdrop.mlp` does). ``dropout_bwd(res, dy)`` is exactly the gradient that
    ``jax.vjp(dropout)`` gives.

    Returns:
      ``(y, res)`` where ``res`` is a :class:`DropoutResidual`.
    """
    call = _prepare(key, x, rate, deterministic, broadcast_dims, scale, residual)
    if call.key_data is None:
        res = call.eval_residual()
        return _apply(res, None, call.x), res
    return _train_forward(*call.train_arguments())


def dropout(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    deterministic: bool = False,
    broadcast_dims: Sequence[int] = (),
    scale: Scale = "inverted",
    residual: Residual = "key",
) -> jax.Array:
    """Dropout (Hinton et al. 2012; Srivastava et al. 2014), with a custom_vjp backward pass.

    With ``m ~ Bernoulli(keep)`` per element (shared along ``broadcast_dims``),
    ``keep = ceil((1 - rate) * 2**23) / 2**23`` (within 2**-23 of ``1 - rate``)::

        scale="inverted":  train  y = m * x / keep      eval  y = x
        scale="classic":   train  y = m * x             eval  y = keep * x

    Both make the eval output equal the expected train output (exactly, since ``keep`` is the
    realised keep probability). The mask is ``jdrop.keep_mask(key, x.shape, rate)``, which equals
    ``jax.random.bernoulli(key, 1 - rate, ...)``: for the same key, the same mask as
    ``flax.linen.Dropout`` and ``equinox.nn.Dropout``.

    The backward pass is ``dx = dy * m * (1 / keep or 1)``, with the very same mask, read from
    the residual that ``residual`` selects:

    - ``"key"`` (default): nothing per element; the mask is regenerated from the key.
    - ``"bits"``: the mask packed 1 bit per element.
    - ``"mask"``: the bool mask, 1 byte per element (as flax, equinox and haiku keep it).

    ``rate`` may be a traced scalar (schedules, sweeps): one compilation serves all rates. A
    static rate outside [0, 1] raises ``ValueError``; a traced one outside [0, 1] makes the
    output and gradient NaN rather than silently using another rate. ``rate = 1`` gives zeros
    and zero gradients; ``rate = 0`` returns ``x`` unchanged. No gradient flows to ``rate``.

    Args:
      key: a PRNG key (``jax.random.key``; a legacy ``PRNGKey`` is accepted). May be None when
        ``deterministic``.
      x: floating array (float16, bfloat16, float32, float64); the output has its dtype.
      rate: drop probability in [0, 1].
      deterministic: evaluation mode (no randomness).
      broadcast_dims: dims along which one mask value is shared (e.g. the time axis).
      scale: ``"inverted"`` or ``"classic"``.
      residual: ``"key"``, ``"bits"`` or ``"mask"``.

    Returns:
      The dropped-out array, same shape and dtype as ``x``.

    Example::

      >>> y = jdrop.dropout(jax.random.key(0), jnp.ones((4, 8)), 0.5)
    """
    call = _prepare(key, x, rate, deterministic, broadcast_dims, scale, residual)
    if call.key_data is None:
        return _apply(call.eval_residual(), None, call.x)
    return _train_dropout(*call.train_arguments())
