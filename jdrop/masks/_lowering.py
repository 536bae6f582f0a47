"""The process-wide switch between the two lowerings of threefry bits, per platform.

:func:`jdrop.masks.random_bits` reads it when a function is traced; ``JDROP_BITS_LOWERING``
sets it at import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

__all__ = ["BitsLowering", "bits_lowering", "current", "from_environment", "set_bits_lowering"]

BitsLowering = Literal["fused", "jax"]
_LOWERINGS = ("fused", "jax")
_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def from_environment() -> dict[str, str]:
    """The per-platform table that ``JDROP_BITS_LOWERING`` asks for (``"fused"`` when unset)."""
    value = os.environ.get("JDROP_BITS_LOWERING", "fused").strip().lower()
    if value not in _LOWERINGS:
        raise ValueError(f"JDROP_BITS_LOWERING must be one of {_LOWERINGS}, got {value!r}.")
    return dict.fromkeys(_PLATFORMS, value)


_bits_lowering: dict[str, str] = from_environment()
"""The process-wide choice, per platform (read when a function is traced)."""


def set_bits_lowering(lowering: BitsLowering, *, platforms: Sequence[str] | None = None) -> None:
    """Chooses how :func:`jdrop.masks.random_bits` computes threefry bits: ``"fused"`` (default) or ``"jax"``.

    Both give the same bits, ``jax.random.bits(key, shape, jnp.uint32)``; only the program differs:

    - ``"fused"``: the 20 threefry rounds written out in ``jnp`` ops, which XLA fuses into the
      consumer of the bits (nothing per element is stored; fastest on CPU and GPU).
    - ``"jax"``: ``jax.random.bits`` itself, JAX's own lowering (a rolled loop on CPU, a kernel or
      unrolled code on GPU), whose bits are materialised. An escape hatch for any backend or
      compiler version where the fused program misbehaves (compile time, speed).

    ``platforms`` restricts the choice to some backends (``"cpu"``, ``"cuda"``, ``"rocm"``,
    ``"tpu"``); the choice per backend is made when a program is lowered for it. The setting is
    read when a function is traced: set it at start-up (or call ``jax.clear_caches()`` after
    changing it), or set the environment variable ``JDROP_BITS_LOWERING=jax`` before importing
    jdrop.

    Raises:
      ValueError: for an unknown lowering or platform.
    """
    if lowering not in _LOWERINGS:
        raise ValueError(f"`lowering` must be one of {_LOWERINGS}, got {lowering!r}.")
    chosen = _PLATFORMS if platforms is None else tuple(platforms)
    for platform in chosen:
        if platform not in _PLATFORMS:
            raise ValueError(f"`platforms` entries must be among {_PLATFORMS}, got {platform!r}.")
    _bits_lowering.update(dict.fromkeys(chosen, lowering))


def bits_lowering() -> dict[str, str]:
    """The lowering :func:`jdrop.masks.random_bits` uses per platform (see :func:`set_bits_lowering`)."""
    return dict(_bits_lowering)


def current() -> dict[str, str]:
    """The live per-platform table (not a copy): what a program being traced now uses."""
    return _bits_lowering
