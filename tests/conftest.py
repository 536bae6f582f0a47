"""Shared fixtures: PRNG keys and a scoped float64 mode."""

import jax
import pytest


@pytest.fixture
def key() -> jax.Array:
    """A typed threefry key; tests that need several keys split or fold it."""
    return jax.random.key(0)


@pytest.fixture
def x64():
    """Enables float64 for one test only (``jax.enable_x64`` is a context manager: nothing leaks)."""
    with jax.enable_x64(True):
        yield
