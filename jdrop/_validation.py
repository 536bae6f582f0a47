"""Argument checks of every public function: one function per rule, one wording per rule.

Each check validates and canonicalises a value at trace time (where it is static) and raises a
``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, outside the allowed range) that
names the argument and what is allowed, as ``jax.random`` does. Traced rates cannot be checked at
trace time: :func:`rate_is_valid` and :func:`nan_unless_valid` make an invalid one give NaN outputs.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "canonical_axis",
    "check_apply_fn",
    "check_choice",
    "check_deterministic",
    "deterministic_or_train",
    "check_float_input",
    "check_rate",
    "check_scale",
    "int_at_least",
    "keep_probability",
    "nan_unless_valid",
    "positive_int",
    "rate_is_valid",
    "static_bool",
    "SCALES",
]

SCALES = ("inverted", "classic")
"""Dropout's two scalings: ``"inverted"`` (1/keep in training) and ``"classic"`` (keep at evaluation)."""


def _is_tracer(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_rate(rate: Any, *, name: str = "rate", upper: float = 1.0) -> float | jax.Array:
    """Returns ``rate`` as a Python float when static (checked), or a float32 scalar array.

    Static values (Python numbers, numpy scalars, concrete arrays) are checked here, at trace
    time: NaN, inf, or a value outside ``[0, upper]`` raise ``ValueError`` naming ``name``.
    Traced values cannot be checked at trace time; :func:`rate_is_valid` turns an invalid traced
    value into NaN outputs instead of a silently different rate.

    Raises:
      TypeError: if ``rate`` is not a real number or a real scalar array.
      ValueError: if a static ``rate`` is NaN, infinite or outside ``[0, upper]``.
    """
    if isinstance(rate, (bool, np.bool_)) or isinstance(rate, (str, bytes)) or rate is None:
        raise TypeError(f"`{name}` must be a real number in [0, {upper:g}], got {type(rate).__name__} {rate!r}.")
    if isinstance(rate, numbers.Real):
        value = float(rate)
    elif hasattr(rate, "dtype") and hasattr(rate, "shape"):
        dtype = np.dtype(rate.dtype) if not jax.dtypes.issubdtype(rate.dtype, jax.dtypes.prng_key) else None
        real = dtype is not None and dtype != np.bool_
        if not (real and (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer))):
            raise TypeError(f"`{name}` must be a real scalar, got an array of dtype {rate.dtype}.")
        if tuple(rate.shape) != ():
            raise ValueError(f"`{name}` must be a scalar, got shape {tuple(rate.shape)}.")
        if _is_tracer(rate):
            return jnp.asarray(rate, jnp.float32)
        value = float(rate)
    else:
        raise TypeError(f"`{name}` must be a real number in [0, {upper:g}], got {type(rate).__name__} {rate!r}.")
    if not (0.0 <= value <= upper):  # also rejects NaN
        raise ValueError(f"`{name}` must be in [0, {upper:g}], got {value!r}.")
    return value


def rate_is_valid(rate: float | jax.Array, *, upper: float = 1.0) -> jax.Array | bool:
    """True for a static rate (already checked); a traced bool for a traced one."""
    if isinstance(rate, float):
        return True
    return (rate >= 0.0) & (rate <= upper)


def nan_unless_valid(rate: float | jax.Array, dtype: Any) -> jax.Array:
    """1 for a valid rate, NaN for a traced one outside [0, 1]: multiply an output by it."""
    return jnp.where(rate_is_valid(rate), 1.0, jnp.nan).astype(dtype)


def keep_probability(rate: Any) -> jax.Array:
    """``1 - rate`` as a float32 scalar after checking ``rate`` (see :func:`check_rate`).

    A static rate is subtracted in float64 and rounded once, as ``jax.random.bernoulli(key,
    1 - rate)`` would see it; a traced one is clipped into [0, 1] for the threshold only (callers
    that scale also poison the output with NaN when it was out of range).
    """
    rate = check_rate(rate)
    if isinstance(rate, float):
        return jnp.asarray(np.float32(1.0 - rate))
    return jnp.clip(1.0 - jax.lax.stop_gradient(rate), 0.0, 1.0)


def check_float_input(x: Any, *, name: str = "x") -> jax.Array:
    """Returns ``x`` as a floating array, or raises ``TypeError`` naming ``name``.

    Integer, bool and complex arrays are rejected: dropout's scaling has no exact meaning for them.
    """
    if not (isinstance(x, (jax.Array, np.ndarray, np.generic)) or _is_tracer(x)) and not (
        hasattr(x, "__jax_array__")
    ):
        raise TypeError(
            f"`{name}` must be a floating-point array (float16, bfloat16, float32 or float64), "
            f"got {type(x).__name__}. Wrap Python data with jnp.asarray(..., jnp.float32)."
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}. Cast it first, e.g. x.astype(jnp.float32)."
        )
    return x


def check_choice(value: Any, choices: tuple[str, ...], *, name: str) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``name`` and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def check_scale(scale: Any) -> str:
    """``scale`` if it is ``"inverted"`` or ``"classic"``, else ``ValueError``."""
    return check_choice(scale, SCALES, name="scale")


def static_bool(value: Any, *, name: str, hint: str = "") -> bool:
    """``value`` as a Python bool, or ``TypeError`` naming ``name`` (a flag that selects a code path is static)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a Python bool (static), got {type(value).__name__}.{hint}")
    return bool(value)


def check_deterministic(deterministic: Any) -> bool:
    """``deterministic`` as a Python bool, or ``TypeError`` (see :func:`static_bool`)."""
    return static_bool(
        deterministic, name="deterministic", hint=" Choose train or eval outside jit, or mark it static."
    )


def deterministic_or_train(deterministic: Any, train: Any, *, default: bool, where: str) -> bool:
    """The evaluation flag of a function that takes ``deterministic`` and the older ``train`` (deprecated).

    ``train=t`` means ``deterministic=not t`` and warns (``DeprecationWarning``); neither gives ``default``.

    Raises:
      TypeError: if both are given, or either is not a Python bool (see :func:`static_bool`).
    """
    if train is None:
        return default if deterministic is None else check_deterministic(deterministic)
    if deterministic is not None:
        raise TypeError(f"{where} got both `deterministic` and the deprecated `train`: pass only `deterministic`.")
    train = static_bool(train, name="train", hint=" Choose train or eval outside jit, or mark it static.")
    warnings.warn(
        f"{where}(train=...) is deprecated: use deterministic={not train} (flax's name, used across jdrop).",
        DeprecationWarning,
        stacklevel=3,
    )
    return not train


def check_apply_fn(apply_fn: Any) -> Any:
    """``apply_fn`` if it is callable, else ``TypeError`` with the convention it must follow."""
    if not callable(apply_fn):
        raise TypeError(
            f"`apply_fn` must be callable as apply_fn(params, x, *, key, deterministic), got {apply_fn!r}."
        )
    return apply_fn


def canonical_axis(axis: Any, ndim: int, *, name: str) -> int:
    """``axis`` in ``0..ndim-1`` (negative counts from the end), or ``TypeError``/``ValueError`` naming it."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(axis).__name__} {axis!r}.")
    if not -ndim <= axis < ndim:
        allowed = f"allowed are {-ndim}..{ndim - 1}" if ndim else "a 0-d input has no axes"
        raise ValueError(f"`{name}` = {axis} is out of range for an input of rank {ndim}: {allowed}.")
    return int(axis) % ndim


def int_at_least(value: Any, minimum: int, *, name: str) -> int:
    """``value`` as a Python int >= ``minimum``: ``TypeError`` if it is not an int, ``ValueError`` if smaller."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.")
    return int(value)


def positive_int(value: Any, *, name: str) -> int:
    """``value`` as a Python int >= 1 (see :func:`int_at_least`)."""
    return int_at_least(value, 1, name=name)
