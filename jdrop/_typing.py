"""Type aliases of jdrop's public signatures."""

from __future__ import annotations

from typing import Literal, TypeAlias

import jax

__all__ = ["KeyLike", "Residual", "Scale"]

KeyLike: TypeAlias = jax.Array
"""A PRNG key: a typed key array (``jax.random.key(seed)``) or a legacy raw ``uint32`` key (``PRNGKey``)."""

Scale: TypeAlias = Literal["inverted", "classic"]
"""Dropout's scaling: ``"inverted"`` (``m * x / keep`` in training, ``x`` at evaluation) or ``"classic"``
(``m * x`` in training, ``keep * x`` at evaluation)."""

Residual: TypeAlias = Literal["key", "bits", "mask"]
"""What a training pass keeps for its backward pass: the key (``"key"``: the mask is regenerated), the mask
packed 1 bit per element (``"bits"``) or the bool mask (``"mask"``)."""
