"""Dropout-rate schedules: plain functions of the step, for traced rates (one compilation for all steps).

Each factory checks its rates once and returns ``schedule(step) -> float32 scalar``, built from
``jnp`` ops: call it inside the jitted step with the traced step counter and pass the result as the
``rate`` of any jdrop op (``jdrop.dropout``, the variants, ``jdrop.mlp.apply(rates=...)``); the rate
changes every step without recompiling, as an optax schedule does for the learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from jdrop._validation import check_choice, check_rate, int_at_least

__all__ = ["Schedule", "constant_schedule", "early_dropout_schedule", "late_dropout_schedule", "linear_schedule"]

Schedule = Callable[[Any], jax.Array]


def _step(step: Any) -> jax.Array:
    step = jnp.asarray(step)
    if not (jnp.issubdtype(step.dtype, jnp.integer) or jnp.issubdtype(step.dtype, jnp.floating)) or step.ndim:
        raise TypeError(f"`step` must be a real scalar, got dtype {step.dtype} and shape {step.shape}.")
    return step.astype(jnp.float32)


def constant_schedule(rate: ArrayLike) -> Schedule:
    """``rate(step) = rate`` for every step (standard dropout)."""
    rate = check_rate(rate)

    def schedule(step: Any) -> jax.Array:
        _step(step)
        return jnp.asarray(rate, jnp.float32)

    return schedule


def linear_schedule(
    init_rate: ArrayLike, end_rate: ArrayLike, transition_steps: int, *, transition_begin: int = 0
) -> Schedule:
    """Linear warm-up (``init_rate < end_rate``) or decay (``init_rate > end_rate``): ``optax.linear_schedule``.

    ``rate(step) = init_rate + (end_rate - init_rate) * clip((step - transition_begin) / transition_steps, 0, 1)``:
    ``init_rate`` until ``transition_begin``, ``end_rate`` from ``transition_begin + transition_steps`` on.
    It is optax's schedule, with the rates checked to lie in [0, 1] and a float32 result.
    """
    init_rate = check_rate(init_rate, name="init_rate")
    end_rate = check_rate(end_rate, name="end_rate")
    transition_steps = int_at_least(transition_steps, 1, name="transition_steps")
    transition_begin = int_at_least(transition_begin, 0, name="transition_begin")
    linear = optax.linear_schedule(init_rate, end_rate, transition_steps, transition_begin)

    def schedule(step: Any) -> jax.Array:
        return jnp.asarray(linear(_step(step)), jnp.float32)

    return schedule


def early_dropout_schedule(
    rate: ArrayLike, cutoff_step: int, *, schedule: Literal["constant", "linear"] = "constant"
) -> Schedule:
    """Early dropout (Liu et al. 2023, "Dropout Reduces Underfitting"): dropout only for the first steps.

    For steps ``0 .. cutoff_step - 1``, then 0::

        "constant":  rate(step) = rate
        "linear":    rate(step) = rate * (1 - step / (cutoff_step - 1))   (rate down to 0, as np.linspace)

    the two early schedules of the paper's ``drop_scheduler`` (``mode="early"``), in steps rather
    than epochs (``cutoff_step = cutoff_epoch * iterations_per_epoch``).
    """
    check_choice(schedule, ("constant", "linear"), name="schedule")
    rate = check_rate(rate)
    cutoff_step = int_at_least(cutoff_step, 0, name="cutoff_step")
    span = max(cutoff_step - 1, 1)

    def early(step: Any) -> jax.Array:
        step = _step(step)
        value = rate if schedule == "constant" else rate * (1.0 - step / span)
        return jnp.where(step < cutoff_step, value, 0.0).astype(jnp.float32)

    return early


def late_dropout_schedule(rate: ArrayLike, start_step: int) -> Schedule:
    """Late dropout (Liu et al. 2023): no dropout before ``start_step``, ``rate`` from then on.

    ``rate(step) = 0`` for ``step < start_step``, else ``rate`` (the paper's ``mode="late"``, for
    regularising overfitting models).
    """
    rate = check_rate(rate)
    start_step = int_at_least(start_step, 0, name="start_step")

    def late(step: Any) -> jax.Array:
        return jnp.where(_step(step) < start_step, 0.0, rate).astype(jnp.float32)

    return late
