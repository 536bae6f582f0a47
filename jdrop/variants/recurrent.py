"""Dropout for recurrent networks: locked (variational) dropout, embedding dropout and zoneout."""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from jdrop._dropout import dropout
from jdrop._typing import KeyLike, Residual, Scale
from jdrop._validation import canonical_axis, check_float_input, check_rank_at_least

__all__ = ["embedding_dropout", "locked_dropout", "zoneout"]


def locked_dropout(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    time_axis: int | None,
    deterministic: bool = False,
    scale: Scale = "inverted",
    residual: Residual | None = None,
) -> jax.Array:
    """Locked ("variational") dropout: the same mask at every time step (Gal & Ghahramani 2016).

    "A Theoretically Grounded Application of Dropout in Recurrent Neural Networks": each sequence
    draws one mask and applies it to its inputs (or hidden states, or outputs) at every step::

        scale="inverted":  train  y[..., t, ...] = m * x[..., t, ...] / keep     eval  y = x
        scale="classic":   train  y[..., t, ...] = m * x[..., t, ...]            eval  y = keep * x

    i.e. :func:`jdrop.dropout` with ``broadcast_dims=(time_axis,)`` (the ``LockedDropout`` of
    AWD-LSTM, Merity et al. 2017, for ``time_axis=0``).

    Inside a ``lax.scan`` recurrence, where each step sees one slice, pass ``time_axis=None`` and
    the *same* key at every step: a key and a shape give one mask, and the slice's mask is exactly
    the whole sequence's mask (``random_bits`` of shape ``(1, B, D)`` and ``(B, D)`` agree), so::

        def step(h, x_t):
            h = cell(params, locked_dropout(key_x, x_t, rate, time_axis=None),
                     locked_dropout(key_h, h, rate, time_axis=None))
            return h, h

    equals dropping ``xs`` with ``locked_dropout(key_x, xs, rate, time_axis=0)`` outside the scan.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array.
      rate: drop probability in [0, 1]; may be traced.
      time_axis: the axis along which the mask is shared, or None for one time step.
      deterministic: evaluation mode.
      scale: ``"inverted"`` (default) or ``"classic"``, as in :func:`jdrop.dropout`.
      residual: the core's residual policy.

    Returns:
      Array of ``x``'s shape and dtype.
    """
    x = check_float_input(x)
    dims = () if time_axis is None else (canonical_axis(time_axis, x.ndim, name="time_axis"),)
    return dropout(key, x, rate, deterministic=deterministic, broadcast_dims=dims, scale=scale, residual=residual)


def embedding_dropout(
    key: KeyLike | None,
    table: ArrayLike,
    rate: ArrayLike,
    *,
    deterministic: bool = False,
    scale: Scale = "inverted",
    residual: Residual | None = None,
) -> jax.Array:
    """Embedding dropout: whole word types dropped (Gal & Ghahramani 2016, sec. 4; Merity et al. 2017).

    Rows of the ``(vocab, ...)`` table are dropped, so every occurrence of a dropped word in the
    batch embeds to zero::

        scale="inverted":  train  E'[w] = m[w] * E[w] / keep      eval  E' = E
        scale="classic":   train  E'[w] = m[w] * E[w]             eval  E' = keep * E

    then look up ``E'[tokens]``. Same as AWD-LSTM's ``embedded_dropout``: :func:`jdrop.dropout` on
    the table with the mask shared along every axis but the first; gradients reach only the kept rows.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      table: floating array ``(vocab, ...)``.
      rate: probability of dropping a word type, in [0, 1]; may be traced.
      deterministic: evaluation mode.
      scale: ``"inverted"`` (default) or ``"classic"``, as in :func:`jdrop.dropout`.
      residual: the core's residual policy.

    Returns:
      The dropped table, same shape and dtype.
    """
    table = check_float_input(table, name="table")
    check_rank_at_least(table, 1, name="table", why="a leading vocabulary axis")
    dims = tuple(range(1, table.ndim))
    return dropout(key, table, rate, deterministic=deterministic, broadcast_dims=dims, scale=scale, residual=residual)


def zoneout(
    key: KeyLike | None,
    h_prev: ArrayLike,
    h_new: ArrayLike,
    rate: ArrayLike,
    *,
    deterministic: bool = False,
    residual: Residual | None = None,
) -> jax.Array:
    """Zoneout (Krueger et al. 2017): each unit keeps its previous value with probability ``rate``.

    With ``m ~ Bernoulli(rate)`` per unit::

        train  h = m * h_prev + (1 - m) * h_new
        eval   h = rate * h_prev + (1 - rate) * h_new

    Written as ``h = h_prev - D(h_prev) + D(h_new)`` where ``D`` is :func:`jdrop.dropout` with
    ``scale="classic"`` and one key for both calls (so one mask ``1 - m``): the training output is
    exactly ``h_prev`` or ``h_new`` per unit, the evaluation output is the expectation (with the
    realised keep probability, within 2**-23 of ``1 - rate``), and both gradients come from the
    core (``dh_new = (1 - m) dh``, ``dh_prev = m dh``). For an LSTM call it once for the cell and
    once for the hidden state, with their own keys and rates.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      h_prev: previous state, floating array.
      h_new: the cell's proposed new state, same shape and dtype as ``h_prev``.
      rate: zoneout probability (of keeping ``h_prev``) in [0, 1]; may be traced.
      deterministic: evaluation mode.
      residual: the core's residual policy.

    Returns:
      The new state, shape and dtype of ``h_new``.
    """
    h_prev = check_float_input(h_prev, name="h_prev")
    h_new = check_float_input(h_new, name="h_new")
    if h_prev.shape != h_new.shape or h_prev.dtype != h_new.dtype:
        raise ValueError(
            f"`h_prev` and `h_new` must have the same shape and dtype, got {h_prev.shape} {h_prev.dtype} "
            f"and {h_new.shape} {h_new.dtype}."
        )

    def update(value: jax.Array) -> jax.Array:
        return dropout(key, value, rate, deterministic=deterministic, scale="classic", residual=residual)

    return h_prev - update(h_prev) + update(h_new)
