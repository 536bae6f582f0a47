"""Type aliases of jdrop's public signatures."""

from __future__ import annotations

from typing import TypeAlias

import jax

__all__ = ["KeyLike"]

KeyLike: TypeAlias = jax.Array
"""A PRNG key: a typed key array (``jax.random.key(seed)``) or a legacy raw ``uint32`` key (``PRNGKey``)."""
