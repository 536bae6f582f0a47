"""The batched-apply marker: which ``apply_fn`` may be given a whole batch with one key per example.

jdrop's convention writes ``apply_fn(params, x, *, key, deterministic)`` for ONE example and vmaps it
(:func:`jdrop.train.per_example`). Some functions compute a batch better than ``jax.vmap`` does: the
hand-written backward of :func:`jdrop.mlp.apply` sums the weight gradient over the batch as one matrix
product, where vmap of its ``custom_vjp`` sums per-example outer products. Such a function declares, with
:func:`takes_batch`, that ``apply_fn(params, x_batch, key=keys)`` with ``keys[i]`` the key of example ``i``
equals the vmap of its single-example calls; ``per_example`` then calls it once instead of vmapping.
Asking the function, rather than the trace (JAX has no public way to ask whether ``vmap`` is the
innermost transformation), needs no JAX internals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["is_batched", "takes_batch"]

F = TypeVar("F", bound=Callable[..., Any])

_MARKER = "__jdrop_takes_batch__"


def takes_batch(fn: F) -> F:
    """Marks ``fn`` as an ``apply_fn`` that also takes a whole batch with one key per example.

    The promise: for a batch ``x`` of ``B`` examples along axis 0 and keys ``keys`` of shape ``(B,)``,
    ``fn(params, x, key=keys, **kw)`` equals ``jax.vmap(lambda xi, ki: fn(params, xi, key=ki, **kw))(x,
    keys)``, and in evaluation ``fn(params, x, key=None, **kw)`` equals the vmap over ``x``. Then
    :func:`jdrop.train.per_example` (so :func:`jdrop.train_step`, :func:`jdrop.mc_predict`,
    :func:`jdrop.rdrop_loss`) calls ``fn`` once on the batch. ``functools.partial`` of a marked
    function is marked too.

    Args:
      fn: the function; it is returned unchanged, with the marker attribute set.

    Returns:
      ``fn``.

    Example::

      >>> @jdrop.train.takes_batch
      ... def apply_fn(params, x, *, key, deterministic):
      ...     # x: one example (d,) and one key, or a batch (B, d) and keys (B,): row i dropped with key i.
      ...     if not deterministic:
      ...         drop = lambda k, row: jdrop.dropout(k, row, 0.5)
      ...         x = drop(key, x) if x.ndim == 1 else jax.vmap(drop)(key, x)
      ...     return x @ params["w"]
    """
    setattr(fn, _MARKER, True)
    return fn


def is_batched(fn: Any) -> bool:
    """Whether ``fn`` (or the function a ``functools.partial`` wraps) was marked by :func:`takes_batch`."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return bool(getattr(fn, _MARKER, False))
