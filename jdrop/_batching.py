"""The batched-apply marker, and the one-example context that makes batch axes right by default.

The marker: which ``apply_fn`` may be given a whole batch with one key per example.

jdrop's convention writes ``apply_fn(params, x, *, key, deterministic)`` for ONE example and vmaps it
(:func:`jdrop.train.per_example`). Some functions compute a batch better than ``jax.vmap`` does: the
hand-written backward of :func:`jdrop.mlp.apply` sums the weight gradient over the batch as one matrix
product, where vmap of its ``custom_vjp`` sums per-example outer products. Such a function declares, with
:func:`takes_batch`, that ``apply_fn(params, x_batch, key=keys)`` with ``keys[i]`` the key of example ``i``
equals the vmap of its single-example calls; ``per_example`` then calls it once instead of vmapping.
Asking the function, rather than the trace (JAX has no public way to ask whether ``vmap`` is the
innermost transformation), needs no JAX internals.

The context: while :func:`jdrop.train.per_example` traces a one-example ``apply_fn``, :func:`one_example`
is set, and the variants with a batch axis (``drop_path``, ``feature_dropout``, ``feature_alpha_dropout``,
``dropblock``) resolve their default ``batch_axis="auto"`` with :func:`resolve_batch_axis` to None (the
input is one example: stochastic depth draws once per example); elsewhere ``"auto"`` is axis 0 (a batch:
one draw per sample, as timm). The context is a ``jax.make_user_context``, part of every ``jax.jit``
cache key, so a function jitted on its own and called both inside and outside a per-example trace is
traced once for each and never reuses the other's axes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import jax

__all__ = ["AUTO", "BatchAxis", "in_one_example", "is_batched", "one_example", "resolve_batch_axis", "takes_batch"]

AUTO: Literal["auto"] = "auto"
BatchAxis = int | None | Literal["auto"]
"""A variant's ``batch_axis``: an axis, None (one example) or ``"auto"`` (None inside a per-example trace, else 0)."""

_ONE_EXAMPLE = jax.make_user_context(default_value=False)

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


@contextlib.contextmanager
def one_example() -> Iterator[None]:
    """While set, code being traced sees ONE example: ``batch_axis="auto"`` resolves to None."""
    with _ONE_EXAMPLE(True):
        yield


def in_one_example() -> bool:
    """Whether the code being traced runs on one example (inside :func:`one_example`)."""
    return bool(_ONE_EXAMPLE.value)


def resolve_batch_axis(batch_axis: Any) -> Any:
    """``batch_axis`` itself, or for ``"auto"``: None inside :func:`one_example`, else 0 (leading batch axis)."""
    if isinstance(batch_axis, str) and batch_axis == AUTO:
        return None if in_one_example() else 0
    return batch_axis
