"""The training loop: ``train_step``, ``eval_step``, ``evaluate`` and ``train_epoch``.

``apply_fn(params, x, *, key, deterministic)`` is written for ONE example; every step runs it through
:func:`jdrop.train.per_example` (vmap over the minibatch with ``jdrop.example_keys(key, B)``), so
every example samples its own sub-network, and example ``i``'s mask depends only on the step key and ``i``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdrop import masks
from jdrop._typing import KeyLike
from jdrop._validation import positive_int
from jdrop.train._per_example import per_example
from jdrop.train._state import Batch, TrainState, batch_parts, count_examples

__all__ = [
    "check_batch_size", "eval_step", "evaluate", "metric_float", "place", "train_epoch", "train_step", "train_steps",
]


def _loss_and_metrics(value: Any) -> tuple[jax.Array, dict[str, Any]]:
    """``loss_fn``'s result as ``(scalar loss, metrics)``: a loss, or a pair ``(loss, dict of metrics)``."""
    loss, metrics = value if isinstance(value, tuple) else (value, {})
    if not isinstance(metrics, Mapping) or (isinstance(value, tuple) and len(value) != 2):
        raise TypeError("`loss_fn` must return a scalar loss or a pair (loss, dict of metrics).")
    if jnp.ndim(loss) != 0:
        raise ValueError(f"`loss_fn` must return a scalar loss, got shape {jnp.shape(loss)}.")
    if "loss" in metrics:
        raise ValueError("`loss_fn`'s metrics must not be named 'loss': the step reports the loss under that name.")
    return loss, dict(metrics)


def _run(
    state: TrainState, params: Any, batch: Batch, key: Any, offset: Any, *, deterministic: bool
) -> tuple[jax.Array, tuple[dict[str, Any], Any]]:
    """The loss of a (micro)batch and ``(metrics, new model state)``."""
    inputs, targets = batch_parts(batch, state.batch_format)
    result = per_example(
        state.apply_fn, params, inputs, key, deterministic=deterministic, offset=offset, hparams=state.hparams,
        model_state=state.model_state, axis_name=state.axis_name,
    )
    outputs, model_state = result if state.model_state is not None else (result, None)
    loss, metrics = _loss_and_metrics(state.loss_fn(outputs, targets))
    integer_labels = state.batch_format == "xy" and jnp.issubdtype(targets.dtype, jnp.integer)
    if integer_labels and hasattr(outputs, "ndim") and outputs.ndim == targets.ndim + 1:
        metrics = {"accuracy": jnp.mean(jnp.argmax(outputs, axis=-1) == targets), **metrics}
    return loss, (metrics, model_state)


def _combine_model_states(states: Any) -> Any:
    """The step's model state from the microbatches' (stacked along axis 0, each from the step's state):
    floating leaves (running statistics) are averaged, others (counters, keys) taken from the last."""

    def combine(leaf: jax.Array) -> jax.Array:
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jnp.mean(leaf, axis=0, dtype=jnp.promote_types(leaf.dtype, jnp.float32)).astype(leaf.dtype)
        return leaf[-1]

    return jax.tree_util.tree_map(combine, states)


def _train_step(
    state: TrainState, batch: Batch, key: Any, offset: Any = 0, microbatches: int = 1
) -> tuple[TrainState, dict[str, jax.Array]]:
    grad_fn = jax.value_and_grad(partial(_run, state, deterministic=False), has_aux=True)
    if microbatches == 1:
        (loss, (metrics, model_state)), grads = grad_fn(state.params, batch, key, offset)
    else:
        # Gradient accumulation: microbatch j holds examples j*size..(j+1)*size-1 and draws
        # their keys by global index, so the masks, and (without batch statistics) the update,
        # equal the whole batch's; batch statistics are per microbatch (ghost batches, docstring).
        size = count_examples(batch, state.batch_format) // microbatches
        split = jax.tree_util.tree_map(lambda v: v.reshape(microbatches, size, *v.shape[1:]), batch)

        def body(total, micro):
            j, micro_batch = micro
            (loss, (metrics, model_state)), grads = grad_fn(state.params, micro_batch, key, offset + j * size)
            return jax.tree_util.tree_map(jnp.add, total, grads), (loss, metrics, model_state)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        grads, (losses, metrics, model_states) = jax.lax.scan(body, zeros, (jnp.arange(microbatches), split))
        grads = jax.tree_util.tree_map(lambda g: g / microbatches, grads)
        loss = jnp.mean(losses)
        metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)
        model_state = None if state.model_state is None else _combine_model_states(model_states)
    changes = {} if state.model_state is None else {"model_state": model_state}
    return state.apply_gradients(grads, **changes), {"loss": loss, **metrics}


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

    ``loss = loss_fn(vmap(apply_fn)(params, x_i, key=k_i, deterministic=False), y)`` with
    ``k_i = jdrop.example_keys(key, B, offset=offset)[i]``, then one ``tx`` update. Compiled once
    per shape (and per state structure). What ``x_i`` and the second argument of ``loss_fn`` are
    depends on ``state.batch_format`` (``"xy"``: ``batch["x"][i]`` and ``batch["y"]``; ``"pytree"``:
    example ``i`` of the batch pytree and the batch); see :class:`TrainState`.

    Model state (``state.model_state``, e.g. batch statistics): ``apply_fn`` returns the new state with
    the outputs, and the new state replaces the old. Whole batch: with ``BatchNorm(axis_name="batch")``
    the layer normalises with the statistics of the whole batch (also when the batch is sharded over
    devices: the reduction is over the logical batch, so the state does not depend on the device count).
    With ``microbatches=k`` it is ghost batch normalisation (Hoffer et al. 2017): each microbatch of
    ``B/k`` examples is normalised with its own statistics, each starts from the step's state, and the
    new state is the mean of the microbatches' new states (floating leaves; others are taken from the
    last microbatch). For an exponential moving average ``r <- m r + (1-m) s`` this records the mean of
    the microbatch statistics: the running mean is exactly the whole batch's; the running variance is
    the mean of the microbatch variances (the whole batch's minus the variance of the microbatch means).

    Args:
      state: a :class:`TrainState`.
      batch: ``{"x": (B, ...), "y": (B, ...)}``, or any pytree of ``(B, ...)`` arrays (``"pytree"`` format).
      key: the step's PRNG key (e.g. ``jax.random.fold_in(run_key, step)``).
      offset: global index of the batch's first example (microbatches, shards).
      microbatches: accumulate gradients over this many equal microbatches (a divisor of ``B``)
        in a ``lax.scan``, for batches that do not fit in memory at once. The masks are the
        whole batch's; the update equals the whole batch's (to float rounding) when ``loss_fn``
        is a mean over examples (and the model has no batch statistics, see above). The loss and
        metrics are the microbatches' means.
      donate: donate ``state``'s buffers to the new state (saves the parameters' memory; the old
        state must not be used afterwards).

    Returns:
      ``(new_state, metrics)``; metrics hold ``loss``, for integer labels in the ``"xy"`` format
      ``accuracy`` (of the dropped-out training outputs), and the metrics ``loss_fn`` returns.

    Raises:
      MissingKeyError: (a ``ValueError``, the ops' error) if ``key`` is None: pass the step's key, or use
        :func:`jdrop.eval_step` for evaluation.

    Example::

      >>> state, metrics = jdrop.train_step(state, {"x": x, "y": y}, jax.random.fold_in(run_key, step))
    """
    size = count_examples(batch, state.batch_format)
    microbatches = positive_int(microbatches, name="microbatches")
    if size % microbatches:
        raise ValueError(f"`microbatches` ({microbatches}) must divide the batch size ({size}).")
    step = _train_step_donating if donate else _train_step_jit
    key = masks.require_key(key, what="jdrop.train_step", eval_hint="jdrop.eval_step(state, batch)")
    return step(state, batch, key, offset, microbatches=int(microbatches))


@jax.jit
def _eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    loss, (metrics, _) = _run(state, state.params, batch, None, 0, deterministic=True)
    return {"loss": loss, **metrics}


def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Loss and metrics of the deterministic network (``deterministic=True``, running statistics) on a batch."""
    count_examples(batch, state.batch_format)
    return _eval_step(state, batch)


def metric_float(value: Any) -> float:
    """A float32 metric as a Python float with the digits float32 resolves: ``0.3``, not ``0.30000001192092896``.

    The shortest decimal that rounds to the same float32 (numpy's ``str``), so ``np.float32(metric_float(v))
    == np.float32(v)``; values computed in float64 are rounded to float32 first.
    """
    return float(str(np.float32(value)))


def evaluate(state: TrainState, data: Batch, *, batch_size: int = 1024) -> dict[str, float]:
    """:func:`eval_step` over a whole data set in chunks, averaged by example count.

    ``metric = sum_c size_c * eval_step(chunk_c)[metric] / n``, accumulated in float64 from the chunks'
    float32 values and returned as Python floats with float32's digits (:func:`metric_float`): with one
    chunk (``n <= batch_size``), ``np.float32(evaluate(...)[m]) == eval_step(...)[m]`` exactly.
    """
    n = count_examples(data, state.batch_format)
    batch_size = positive_int(batch_size, name="batch_size")
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        chunk = jax.tree_util.tree_map(lambda v, start=start: v[start : start + batch_size], data)
        size = min(batch_size, n - start)
        for name, value in eval_step(state, chunk).items():
            totals[name] = totals.get(name, 0.0) + float(value) * size
    return {name: metric_float(total / n) for name, total in totals.items()}


@partial(jax.jit, static_argnames=("count", "batch_size", "shuffle", "batch_sharding"), donate_argnums=(0,))
def train_steps(state, data, key, first, *, count, batch_size, shuffle=True, batch_sharding=None):
    """Minibatches ``first .. first + count - 1`` of the epoch keyed by ``key``, as one ``lax.scan``.

    The epoch's schedule depends only on ``key`` and the minibatch index: the examples are shuffled
    with ``split(key)[0]`` and minibatch ``j`` trains with ``fold_in(split(key)[1], j)``, so running an
    epoch in pieces (``first`` traced: one compilation per ``count``) gives its minibatches and masks.
    ``state`` is donated. Returns ``(new_state, metrics stacked over the count steps)``.
    """
    n = count_examples(data, state.batch_format)
    num_batches = n // batch_size
    shuffle_key, step_key = jax.random.split(key)
    order = jax.random.permutation(shuffle_key, n) if shuffle else jnp.arange(n)
    order = order[: num_batches * batch_size].reshape(num_batches, batch_size)

    def body(state, batch_index):
        idx = order[batch_index]
        batch = jax.tree_util.tree_map(lambda v: jnp.take(v, idx, axis=0), data)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return _train_step(state, batch, masks.fold_in(step_key, batch_index))

    return jax.lax.scan(body, state, first + jnp.arange(count))


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
    dropped. ``state`` is donated (do not reuse it). ``data`` has the state's batch format.

    With ``mesh`` (see :mod:`jdrop.distributed`), ``state`` and ``data`` are replicated on it and
    every minibatch is sharded over its first axis (data parallelism, also across processes);
    the result equals the single-device one, as masks are drawn by global example index.

    Returns:
      ``(new_state, metrics averaged over the epoch's steps)``.
    """
    n = count_examples(data, state.batch_format)
    batch_size = check_batch_size(batch_size, n)
    state, data, batch_sharding = place(state, data, mesh)
    key = masks.require_key(key, what="jdrop.train_epoch", eval_hint="jdrop.evaluate(state, data)")
    state, metrics = train_steps(state, data, key, 0, count=n // batch_size,
                                 batch_size=batch_size, shuffle=bool(shuffle), batch_sharding=batch_sharding)
    return state, jax.tree_util.tree_map(jnp.mean, metrics)


def check_batch_size(batch_size: Any, n: int) -> int:
    """``batch_size`` as an int in ``1..n``, or the error naming it."""
    batch_size = positive_int(batch_size, name="batch_size")
    if batch_size > n:
        raise ValueError(f"`batch_size` ({batch_size}) exceeds the number of examples ({n}).")
    return int(batch_size)


def place(state: TrainState, data: Batch, mesh: jax.sharding.Mesh | None) -> tuple[TrainState, Batch, Any]:
    """``(state, data, batch_sharding)``: replicated on ``mesh`` with minibatches sharded over its first axis."""
    data = dict(data) if isinstance(data, Mapping) else data
    if mesh is None:
        return state, data, None
    from jdrop import distributed

    state, data = distributed.replicate((state, data), mesh)
    return state, data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
