"""Shared fixtures: PRNG keys, a scoped float64 mode, and the jitted-or-not variant of a function."""

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


@pytest.fixture(params=["with_jit", "without_jit"])
def variant(request):
    """``variant(fn)`` is ``jax.jit(fn)`` or ``fn`` itself: ``chex.variants(with_jit=True, without_jit=True)``
    for pytest functions, so a test runs once compiled and once op by op."""
    return jax.jit if request.param == "with_jit" else (lambda fn: fn)
