"""Other frameworks' ``Dropout`` modules around :func:`jdrop.dropout`.

One drop-in replacement per framework, each with that framework's own conventions:

- :class:`jdrop.interop.linen.Dropout`: a ``flax.linen`` module (``rng_collection``, ``make_rng``);
- :class:`jdrop.interop.nnx.Dropout`: a ``flax.nnx`` module (``rngs`` streams, ``train()`` / ``eval()``);
- :class:`jdrop.interop.equinox.Dropout`: an ``equinox`` module (``key=``, ``inference``).

Each takes its key exactly where and when its framework's ``Dropout`` does and hands it to
:func:`jdrop.dropout`, whose mask equals ``jax.random.bernoulli``'s: a model using the adapter
gives the framework's outputs and gradients (to float rounding) for the same rng state, and adds
jdrop's ``residual`` and ``scale`` options.

The frameworks are optional dependencies. ``import jdrop`` (and ``import jdrop.interop``) imports
none of them; a submodule imports its framework when it is first used::

  from flax import nnx
  from jdrop.interop import nnx as jdrop_nnx     # the adapter module; jdrop.interop.nnx works too
  layer = jdrop_nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0), residual="bits")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax.numpy as jnp
from jax.typing import ArrayLike

from jdrop._validation import check_float_input, check_rate, check_residual, check_scale
from jdrop.train._state import register_builder
from jdrop.variants.stochastic_depth import drop_path

_SUBMODULES = ("equinox", "linen", "nnx")


def _builder(framework: str) -> Any:
    """``TrainState.from_<framework>``: the submodule's ``train_state``, its framework imported on first use."""

    def build(*args: Any, **options: Any) -> Any:
        return importlib.import_module(f"{__name__}.{framework}").train_state(*args, **options)

    return build


for _framework in _SUBMODULES:
    register_builder(_framework, _builder(_framework))


def __getattr__(name: str) -> ModuleType:
    # Lazy: importing a submodule imports its framework, which jdrop never needs by itself.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_SUBMODULES)


def _check_fields(scale: Any, residual: Any) -> None:
    """Rejects an unknown ``scale`` or ``residual`` when the module is built, not at its first call."""
    check_scale(scale)
    check_residual(residual)


def _concrete_rate(rate: ArrayLike) -> float | None:
    """A checked ``rate`` as a float when it is known in Python, else None (a traced rate).

    flax decides "rate 0: identity" and "rate 1: zeros" in Python, before drawing a key; the flax
    adapters make the same decisions on the same values, so the rng streams advance exactly as with
    flax's Dropout, and leave traced rates (schedules) to :func:`jdrop.dropout`.
    """
    rate = check_rate(rate)
    return rate if isinstance(rate, float) else None


def _drop_path_module(inputs: Any, rate: Any, deterministic: bool, draw_key: Callable[[], Any],
                      options: dict[str, Any]) -> Any:
    """The flax DropPath modules' call: flax's Python-level decisions for rates 0 and 1 (no key drawn), then
    :func:`jdrop.drop_path` with the key ``draw_key()`` gives (from the module's rng stream)."""
    known = _concrete_rate(rate)
    if known == 0.0 or deterministic:
        return drop_path(None, inputs, rate, deterministic=True, **options)
    if known == 1.0:
        return jnp.zeros_like(check_float_input(inputs))
    return drop_path(draw_key(), inputs, rate, **options)

