"""The training loop: ``train_step``, ``eval_step``, ``evaluate`` and ``train_epoch``.

``apply_fn(params, x, *, key, train)`` is written for ONE example; every step runs it through
:func:`jdrop.train.per_example` (vmap over the minibatch with ``jdrop.example_keys(key, B)``), so
every example samples its own sub-network, and example ``i``'s mask depends only on the step key and ``i``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jdrop import masks
from jdrop._typing import KeyLike
from jdrop._validation import positive_int
from jdrop.train._per_example import per_example
from jdrop.train._state import Batch, TrainState, check_batch

__all__ = ["eval_step", "evaluate", "train_epoch", "train_step"]


def _metrics(outputs: jax.Array, targets: jax.Array, loss: jax.Array) -> dict[str, jax.Array]:
    metrics = {"loss": loss}
    if jnp.issubdtype(targets.dtype, jnp.integer) and outputs.ndim == targets.ndim + 1:
        metrics["accuracy"] = jnp.mean(jnp.argmax(outputs, axis=-1) == targets)
    return metrics


def _train_step(
    state: TrainState, batch: Batch, key: Any, offset: Any = 0, microbatches: int = 1
) -> tuple[TrainState, dict[str, jax.Array]]:
    x, y = check_batch(batch)
    size = x.shape[0] // microbatches

    def loss(params, micro_x, micro_y, micro_offset):
        outputs = per_example(state.apply_fn, params, micro_x, key, offset=micro_offset, hparams=state.hparams)
        return state.loss_fn(outputs, micro_y), outputs

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if microbatches == 1:
        (value, outputs), grads = grad_fn(state.params, x, y, offset)
    else:
        # Gradient accumulation: microbatch j holds examples j*size..(j+1)*size-1 and draws
        # their keys by global index, so the masks, and the update, equal the whole batch's.
        split = jax.tree_util.tree_map(lambda v: v.reshape(microbatches, size, *v.shape[1:]), (x, y))

        def body(total, j):
            (value, outputs), grads = grad_fn(state.params, split[0][j], split[1][j], offset + j * size)
            return jax.tree_util.tree_map(jnp.add, total, grads), (value, outputs)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        grads, (values, outputs) = jax.lax.scan(body, zeros, jnp.arange(microbatches))
        grads = jax.tree_util.tree_map(lambda g: g / microbatches, grads)
        value = jnp.mean(values)
        outputs = outputs.reshape(x.shape[0], *outputs.shape[2:])
    return state.apply_gradients(grads), _metrics(outputs, y, value)


_train_step_jit = jax.jit(_train_step, static_argnames=("microbatches",))
_train_step_donating = jax.jit(_train_step, static_argnames=("microbatches",), donate_argnums=(0,))


def train_step(
    state: TrainState,
    batch: Batch,
    key: KeyLike,
    *,
    offset: Any = 0,
    microbatches: int = 1,
    donate: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One jit-compiled training step with a per-example dropout mask.

    ``loss = loss_fn(vmap(apply_fn)(params, x_i, key=k_i, train=True), y)`` with
    ``k_i = jdrop.example_keys(key, B, offset=offset)[i]``, then one ``tx`` update. Compiled once
    per shape (and per state structure).

    Args:
      state: a :class:`TrainState`.
      batch: ``{"x": (B, ...), "y": (B, ...)}``.
      key: the step's PRNG key (e.g. ``jax.random.fold_in(run_key, step)``).
      offset: global index of the batch's first example (microbatches, shards).
      microbatches: accumulate gradients over this many equal microbatches (a divisor of ``B``)
        in a ``lax.scan``, for batches that do not fit in memory at once. The masks are the
        whole batch's; the update equals the whole batch's (to float rounding) when ``loss_fn``
        is a mean over examples.
      donate: donate ``state``'s buffers to the new state (saves the parameters' memory; the old
        state must not be used afterwards).

    Returns:
      ``(new_state, metrics)``; metrics hold ``loss`` and, for integer labels, ``accuracy``
      (of the dropped-out training outputs).
    """
    x, _ = check_batch(batch)
    microbatches = positive_int(microbatches, name="microbatches")
    if x.shape[0] % microbatches:
        raise ValueError(f"`microbatches` ({microbatches}) must divide the batch size ({x.shape[0]}).")
    step = _train_step_donating if donate else _train_step_jit
    return step(state, batch, masks.canonical_key(key), offset, microbatches=int(microbatches))


@jax.jit
def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Loss and accuracy of the deterministic network (``train=False``) on a batch."""
    x, y = check_batch(batch)
    outputs = per_example(state.apply_fn, state.params, x, None, train=False, hparams=state.hparams)
    return _metrics(outputs, y, state.loss_fn(outputs, y))


def evaluate(state: TrainState, data: Batch, *, batch_size: int = 1024) -> dict[str, float]:
    """:func:`eval_step` over a whole data set in chunks, averaged by example count."""
    x, _ = check_batch(data)
    n = x.shape[0]
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in data.items()}
        size = min(batch_size, n - start)
        for name, value in eval_step(state, chunk).items():
            totals[name] = totals.get(name, 0.0) + float(value) * size
    return {name: total / n for name, total in totals.items()}


@partial(jax.jit, static_argnames=("batch_size", "shuffle", "batch_sharding"), donate_argnums=(0,))
def _train_epoch(state, data, key, batch_size, shuffle, batch_sharding):
    x, _ = check_batch(data)
    n = x.shape[0]
    num_batches = n // batch_size
    shuffle_key, step_key = jax.random.split(key)
    order = jax.random.permutation(shuffle_key, n) if shuffle else jnp.arange(n)
    order = order[: num_batches * batch_size].reshape(num_batches, batch_size)

    def body(state, batch_index):
        idx = order[batch_index]
        batch = {k: jnp.take(v, idx, axis=0) for k, v in data.items()}
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return _train_step(state, batch, masks.fold_in(step_key, batch_index))

    state, metrics = jax.lax.scan(body, state, jnp.arange(num_batches))
    return state, jax.tree_util.tree_map(jnp.mean, metrics)


def train_epoch(
    state: TrainState,
    data: Batch,
    key: KeyLike,
    *,
    batch_size: int,
    shuffle: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One epoch as a single compiled ``lax.scan`` over minibatches (no per-step host overhead).

    The examples are shuffled with ``split(key)[0]``; minibatch ``j`` trains with step key
    ``fold_in(split(key)[1], j)``. The last ``n % batch_size`` examples of the shuffled order are
    dropped. ``state`` is donated (do not reuse it).

    With ``mesh`` (see :mod:`jdrop.distributed`), ``state`` and ``data`` are replicated on it and
    every minibatch is sharded over its first axis (data parallelism, also across processes);
    the result equals the single-device one, as masks are drawn by global example index.

    Returns:
      ``(new_state, metrics averaged over the epoch's steps)``.
    """
    x, _ = check_batch(data)
    batch_size = positive_int(batch_size, name="batch_size")
    if batch_size > x.shape[0]:
        raise ValueError(f"`batch_size` ({batch_size}) exceeds the number of examples ({x.shape[0]}).")
    batch_sharding = None
    if mesh is not None:
        from jdrop import distributed

        state, data = distributed.replicate((state, dict(data)), mesh)
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    return _train_epoch(state, dict(data), masks.canonical_key(key), int(batch_size), bool(shuffle), batch_sharding)
