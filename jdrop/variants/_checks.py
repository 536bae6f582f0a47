"""Argument checks shared by the variants.

What runs through the core (:func:`jdrop.dropout`) is checked there; these cover the variants'
own arguments (axes, block sizes, modes) and the variants that draw their noise directly from
:mod:`jdrop.masks` (Gaussian, concrete, DropBlock).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_deterministic(deterministic: Any) -> bool:
    """``deterministic`` as a Python bool, or ``TypeError`` (it selects a code path, so it is static)."""
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(
            f"`deterministic` must be a Python bool (static), got {type(deterministic).__name__}. "
            "Choose train or eval outside jit, or mark it static."
        )
    return bool(deterministic)


def canonical_axis(axis: Any, ndim: int, *, name: str) -> int:
    """``axis`` in ``0..ndim-1`` (negative counts from the end), or ``TypeError``/``ValueError`` naming it."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(axis).__name__} {axis!r}.")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"`{name}` = {axis} is out of range for an input of rank {ndim}: allowed are {-ndim}..{ndim - 1}."
        )
    return int(axis) % ndim


def positive_int(value: Any, *, name: str) -> int:
    """``value`` as a Python int >= 1, or ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int (>= 1), got {value}.")
    return int(value)
