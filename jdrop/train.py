"""The training loop: ``TrainState``, ``train_step``, ``eval_step``, ``train_epoch``, ``fit``, ``max_norm``.

``apply_fn(params, x, *, key, train)`` is written for ONE example. :func:`train_step` vmaps it over
the minibatch with ``jdrop.example_keys(key, B)``, so every example samples its own sub-network,
and example ``i``'s mask depends only on the step key and ``i``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdrop import masks

__all__ = [
    "TrainState",
    "eval_step",
    "evaluate",
    "fit",
    "max_norm",
    "softmax_cross_entropy",
    "train_epoch",
    "train_step",
]

Batch = Mapping[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels: ``mean_i(logsumexp(z_i) - z_i[y_i])``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["step", "params", "opt_state", "hparams"],
    meta_fields=["apply_fn", "tx", "loss_fn"],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, optimiser state and step count (a pytree); ``apply_fn``, ``tx``, ``loss_fn`` are static.

    ``loss_fn(outputs, targets)`` returns the mean loss of a minibatch; the default is
    :func:`softmax_cross_entropy` with integer labels.

    ``hparams`` is an optional dict of arrays passed to ``apply_fn`` as keyword arguments, e.g.
    ``{"rates": (0.1, 0.5, 0.5)}`` for :func:`jdrop.mlp.apply`. Being data, not static, it can change
    between steps (a rate schedule: ``dataclasses.replace(state, hparams=...)``) or be vmapped over
    (a rate sweep as one compiled program) without recompiling.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    apply_fn: Callable[..., jax.Array]
    tx: optax.GradientTransformation
    loss_fn: LossFn = softmax_cross_entropy
    hparams: Any = None

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., jax.Array],
        params: Any,
        tx: optax.GradientTransformation,
        loss_fn: LossFn | None = None,
        hparams: Mapping[str, Any] | None = None,
    ) -> TrainState:
        """A fresh state at step 0 with ``tx.init(params)``."""
        if not callable(apply_fn):
            raise TypeError(f"`apply_fn` must be callable as apply_fn(params, x, *, key, train), got {apply_fn!r}.")
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(f"`tx` must be an optax.GradientTransformation, got {type(tx).__name__}.")
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            apply_fn=apply_fn,
            tx=tx,
            loss_fn=softmax_cross_entropy if loss_fn is None else loss_fn,
            hparams=None if hparams is None else jax.tree_util.tree_map(_strongly_typed, dict(hparams)),
        )

    def apply_gradients(self, grads: Any) -> TrainState:
        """One optimiser update: ``params <- params + tx.update(grads)``."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return dataclasses.replace(
            self, step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state
        )


def _strongly_typed(value: Any) -> jax.Array:
    """``value`` as an array of a definite dtype: a Python float becomes float32, not a weakly typed array,
    so that replacing it by a schedule's float32 output later does not recompile the step."""
    array = jnp.asarray(value)
    return jnp.asarray(array, dtype=array.dtype)


def _check_batch(batch: Any) -> tuple[jax.Array, jax.Array]:
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        raise TypeError(f"`batch` must be a mapping with keys 'x' and 'y', got {type(batch).__name__}.")
    x, y = batch["x"], batch["y"]
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] != jnp.shape(y)[0]:
        raise ValueError(
            f"`batch['x']` and `batch['y']` must share their leading (example) axis, "
            f"got {jnp.shape(x)} and {jnp.shape(y)}."
        )
    return x, y


def _metrics(outputs: jax.Array, targets: jax.Array, loss: jax.Array) -> dict[str, jax.Array]:
    metrics = {"loss": loss}
    if jnp.issubdtype(targets.dtype, jnp.integer) and outputs.ndim == targets.ndim + 1:
        metrics["accuracy"] = jnp.mean(jnp.argmax(outputs, axis=-1) == targets)
    return metrics


def _per_example(state: TrainState, params: Any, x: jax.Array, keys: jax.Array | None, train: bool) -> jax.Array:
    hparams = state.hparams or {}
    if train:
        return jax.vmap(lambda xi, ki: state.apply_fn(params, xi, key=ki, train=True, **hparams))(x, keys)
    return jax.vmap(lambda xi: state.apply_fn(params, xi, key=None, train=False, **hparams))(x)


def _train_step(
    state: TrainState, batch: Batch, key: Any, offset: Any = 0, microbatches: int = 1
) -> tuple[TrainState, dict[str, jax.Array]]:
    x, y = _check_batch(batch)
    size = x.shape[0] // microbatches

    def loss(params, micro_x, micro_y, micro_offset):
        keys = masks.example_keys(key, micro_x.shape[0], offset=micro_offset)
        outputs = _per_example(state, params, micro_x, keys, train=True)
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
    key: Any,
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
    x, _ = _check_batch(batch)
    if isinstance(microbatches, bool) or not isinstance(microbatches, (int, np.integer)) or microbatches < 1:
        raise ValueError(f"`microbatches` must be a positive int, got {microbatches!r}.")
    if x.shape[0] % microbatches:
        raise ValueError(f"`microbatches` ({microbatches}) must divide the batch size ({x.shape[0]}).")
    step = _train_step_donating if donate else _train_step_jit
    return step(state, batch, masks.canonical_key(key), offset, microbatches=int(microbatches))


@jax.jit
def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Loss and accuracy of the deterministic network (``train=False``) on a batch."""
    x, y = _check_batch(batch)
    outputs = _per_example(state, state.params, x, None, train=False)
    return _metrics(outputs, y, state.loss_fn(outputs, y))


def evaluate(state: TrainState, data: Batch, *, batch_size: int = 1024) -> dict[str, float]:
    """:func:`eval_step` over a whole data set in chunks, averaged by example count."""
    x, _ = _check_batch(data)
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
    x, _ = _check_batch(data)
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
        return _train_step(state, batch, jax.random.fold_in(step_key, batch_index))

    state, metrics = jax.lax.scan(body, state, jnp.arange(num_batches))
    return state, jax.tree_util.tree_map(jnp.mean, metrics)


def train_epoch(
    state: TrainState,
    data: Batch,
    key: Any,
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
    x, _ = _check_batch(data)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if batch_size > x.shape[0]:
        raise ValueError(f"`batch_size` ({batch_size}) exceeds the number of examples ({x.shape[0]}).")
    batch_sharding = None
    if mesh is not None:
        from jdrop import distributed

        state, data = distributed.replicate((state, dict(data)), mesh)
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    return _train_epoch(state, dict(data), masks.canonical_key(key), int(batch_size), bool(shuffle), batch_sharding)


def fit(
    state: TrainState,
    train_data: Batch,
    *,
    key: Any,
    epochs: int,
    batch_size: int,
    eval_data: Mapping[str, Batch] | None = None,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[TrainState, dict[str, list[float]]]:
    """Trains for ``epochs`` epochs with :func:`train_epoch`, evaluating after each, with a tqdm bar.

    Epoch ``e`` uses ``fold_in(key, e)``; ``mesh`` shards the minibatches (:func:`train_epoch`).
    ``eval_data`` maps a name (e.g. ``"train"``, ``"test"``)
    to a data set evaluated deterministically after every epoch.

    Returns:
      ``(state, history)`` where ``history["step_loss"]`` holds the mean training-step loss per
      epoch and ``history[f"{name}_{metric}"]`` the evaluations.
    """
    key = masks.canonical_key(key)
    history: dict[str, list[float]] = {"epoch": [], "step_loss": []}
    bar: Any = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="epochs")
    for epoch in bar:
        state, metrics = train_epoch(
            state, train_data, jax.random.fold_in(key, epoch), batch_size=batch_size, mesh=mesh
        )
        history["epoch"].append(epoch + 1)
        history["step_loss"].append(float(metrics["loss"]))
        for name, data in (eval_data or {}).items():
            for metric, value in evaluate(state, data).items():
                history.setdefault(f"{name}_{metric}", []).append(value)
        if progress:
            bar.set_postfix({k: f"{v[-1]:.3f}" for k, v in history.items() if k != "epoch"})
    return state, history


class MaxNormState(optax.EmptyState):
    """max_norm keeps no state."""


def max_norm(max_value: float, *, axis: int = 0, min_ndim: int = 2) -> optax.GradientTransformation:
    """Max-norm constraint on incoming weight vectors (Srivastava et al. 2014, sec. 5.1).

    After the update, every incoming weight vector ``w`` (the slice along ``axis`` of each
    parameter with at least ``min_ndim`` dims; for ``W`` of shape ``(d_in, d_out)`` and the default
    ``axis=0`` that is the column of unit ``j``) is projected onto the ball ``||w||_2 <= c``::

        w <- w * min(1, c / ||w||_2)

    Chain it after the optimiser: ``optax.chain(optax.sgd(lr), jdrop.max_norm(3.0))``. It rewrites
    the updates so that ``params + updates`` is the projected point; biases are left alone.

    Args:
      max_value: the radius ``c`` (> 0).
      axis: axis (or axes) summed over for the norm.
      min_ndim: parameters with fewer dims (biases) are not constrained.
    """
    if isinstance(max_value, bool) or not isinstance(max_value, (int, float)) or not math.isfinite(max_value) or (
        max_value <= 0
    ):
        raise ValueError(f"`max_value` must be a finite number > 0, got {max_value!r}.")

    def init_fn(params):
        del params
        return MaxNormState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("max_norm needs the parameters: call tx.update(grads, state, params).")

        def project(update, param):
            if param.ndim < min_ndim:
                return update
            new = param + update
            norm = jnp.sqrt(jnp.sum(jnp.square(new), axis=axis, keepdims=True))
            factor = jnp.minimum(1.0, max_value / jnp.maximum(norm, jnp.finfo(new.dtype).tiny))
            return new * factor - param

        return jax.tree_util.tree_map(project, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)
