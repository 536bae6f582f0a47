"""The training state: parameters, optimiser state, step, hyper-parameters and model state, as one pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal, TypeAlias

import jax
import jax.numpy as jnp
import optax

from jdrop._validation import check_choice
from jdrop.train._losses import softmax_cross_entropy
from jdrop.train._per_example import BATCH_AXIS, check_apply_fn

__all__ = [
    "BATCH_FORMATS", "Batch", "BatchFormat", "LossFn", "TrainState", "batch_parts", "count_examples",
    "register_builder",
]

Batch: TypeAlias = Any
"""A pytree of arrays that share a leading example axis: ``{"x": (B, ...), "y": (B, ...)}`` in the
``"xy"`` batch format, anything (``{"tokens": ..., "mask": ...}``, a tuple, ...) in ``"pytree"``."""
LossFn: TypeAlias = Callable[[Any, Any], Any]
"""``loss_fn(outputs, targets)`` (``"xy"``) or ``loss_fn(outputs, batch)`` (``"pytree"``) returning the
scalar loss, or ``(loss, metrics)`` with a dict of scalar metrics."""
BatchFormat = Literal["xy", "pytree"]
BATCH_FORMATS: tuple[str, ...] = ("xy", "pytree")

_BUILDERS: dict[str, Callable[..., Any]] = {}


def register_builder(framework: str, builder: Callable[..., Any]) -> None:
    """Registers the function behind ``TrainState.from_<framework>`` (``"linen"``, ``"nnx"``, ``"equinox"``).

    :mod:`jdrop.interop`, the layer that knows flax and equinox, registers them when it is imported
    (``import jdrop`` does), so this layer never imports the one above it.
    """
    _BUILDERS[framework] = builder


def _build(framework: str, *args: Any, **options: Any) -> Any:
    if framework not in _BUILDERS:
        raise RuntimeError(f"TrainState.from_{framework} is provided by jdrop.interop: `import jdrop.interop` first.")
    return _BUILDERS[framework](*args, **options)


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["step", "params", "opt_state", "hparams", "model_state"],
    meta_fields=["apply_fn", "tx", "loss_fn", "batch_format", "axis_name"],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, optimiser state, step count and model state (a pytree); the functions are static.

    The batch format says what the functions see of a batch:

    - ``"xy"`` (the default): ``batch = {"x": (B, ...), "y": (B, ...)}``; ``apply_fn`` gets one
      example of ``x``, ``loss_fn(outputs, y)`` the targets (default :func:`softmax_cross_entropy`
      with integer labels, which adds an ``accuracy`` metric).
    - ``"pytree"``: ``batch`` is any pytree of arrays with a leading example axis (``{"tokens": ...,
      "mask": ...}``); ``apply_fn`` gets the pytree of one example, ``loss_fn(outputs, batch)`` the
      whole (micro)batch, so it can weight or mask examples (padding) and read any field.

    ``loss_fn`` returns the scalar loss, or ``(loss, metrics)`` with a dict of scalar metrics (an
    auxiliary loss, a count) that the step returns as given, beside ``loss``.

    ``hparams`` is an optional dict of arrays passed to ``apply_fn`` as keyword arguments, e.g.
    ``{"rates": (0.1, 0.5, 0.5)}`` for :func:`jdrop.mlp.apply`. Being data, not static, it can change
    between steps (a rate schedule: ``state.replace(hparams=...)``) or be vmapped over
    (a rate sweep as one compiled program) without recompiling.

    ``model_state`` holds mutable model state such as BatchNorm's running statistics. When it is not
    None, ``apply_fn(params, x, *, key, deterministic, model_state, **hparams)`` returns
    ``(outputs, new_model_state)``, and the training step stores the new state. The vmap over examples
    is named ``axis_name`` (``"batch"``): give BatchNorm that ``axis_name`` so that it normalises with,
    and records, the statistics of the whole batch (see :func:`jdrop.train_step` for microbatches).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    apply_fn: Callable[..., Any]
    tx: optax.GradientTransformation
    loss_fn: LossFn = softmax_cross_entropy
    hparams: Any = None
    model_state: Any = None
    batch_format: BatchFormat = "xy"
    axis_name: str = BATCH_AXIS

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: Any,
        tx: optax.GradientTransformation,
        loss_fn: LossFn | None = None,
        hparams: Mapping[str, Any] | None = None,
        model_state: Any = None,
        batch_format: BatchFormat = "xy",
        axis_name: str = BATCH_AXIS,
    ) -> TrainState:
        """A fresh state at step 0 with ``tx.init(params)``.

        Args:
          apply_fn: the network for one example (see :func:`jdrop.train.per_example`).
          params: its parameters (what ``tx`` updates).
          tx: an optax transformation.
          loss_fn: see the class docstring; default :func:`softmax_cross_entropy` (``"xy"`` format).
          hparams: keyword arguments of ``apply_fn`` as arrays (traced: they may change without recompiling).
          model_state: mutable model state (batch statistics), or None for a stateless model.
          batch_format: ``"xy"`` or ``"pytree"`` (class docstring).
          axis_name: the name of the vmap over examples.

        Example::

          >>> params = jdrop.mlp.init(jax.random.key(0), [4, 16, 3])
          >>> state = jdrop.TrainState.create(apply_fn=jdrop.mlp.apply, params=params, tx=optax.adam(1e-3),
          ...                                 hparams={"rates": (0.1, 0.5)})
        """
        check_apply_fn(apply_fn)
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(f"`tx` must be an optax.GradientTransformation, got {type(tx).__name__}.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(outputs, targets_or_batch), got {loss_fn!r}.")
        if not isinstance(axis_name, str):
            raise TypeError(f"`axis_name` must be a str, got {type(axis_name).__name__}.")
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            apply_fn=apply_fn,
            tx=tx,
            loss_fn=softmax_cross_entropy if loss_fn is None else loss_fn,
            hparams=None if hparams is None else jax.tree_util.tree_map(_strongly_typed, dict(hparams)),
            model_state=model_state,
            batch_format=check_choice(batch_format, BATCH_FORMATS, name="batch_format"),  # type: ignore[arg-type]
            axis_name=axis_name,
        )

    @classmethod
    def from_linen(
        cls, module: Any, variables: Mapping[str, Any], tx: optax.GradientTransformation, **options: Any
    ) -> TrainState:
        """A state for a ``flax.linen`` Module, trained with per-example dropout masks.

        ``variables["params"]`` are trained; the other collections (``batch_stats``) are ``model_state``.
        The ``apply_fn`` applies the module to ONE example with ``rngs={"dropout": k_i}`` (example key
        ``k_i``) and, in training, ``mutable=["batch_stats"]``: the one-example ``apply_fn`` one writes by
        hand. Same as :func:`jdrop.interop.linen.train_state` (see it for the details);
        :func:`jdrop.interop.linen.variables` gives the trained variables back.

        Args:
          module: the ``flax.linen.Module``.
          variables: its variables (``module.init(...)``).
          tx: an optax transformation.
          **options: ``rng_streams`` (default ``("dropout",)``), ``mutable`` (default: every collection but
            ``params``) and :meth:`create`'s ``loss_fn``, ``hparams``, ``batch_format``, ``axis_name``.

        Example::

          >>> variables = Net().init(jax.random.key(0), x[0], deterministic=True)
          >>> state = jdrop.TrainState.from_linen(Net(), variables, optax.adam(1e-3))
        """
        return _build("linen", module, variables, tx, **options)

    @classmethod
    def from_nnx(cls, model: Any, tx: optax.GradientTransformation, **options: Any) -> TrainState:
        """A state for a ``flax.nnx`` Module, trained with per-example dropout masks.

        ``nnx.split(model, wrt, ...)``: the parameters (``wrt=nnx.Param`` by default) are trained, the rest
        (batch statistics, rng streams) is ``model_state``. Every example's rng streams restart at
        ``fold_in(k_i, j)`` (example key ``k_i``, stream ``j``), so each example, and each of its dropout
        layers, has its own mask. Same as :func:`jdrop.interop.nnx.train_state` (see it for the details);
        :func:`jdrop.interop.nnx.merge` gives the trained module back.

        Args:
          model: the ``flax.nnx.Module``.
          tx: an optax transformation.
          **options: ``wrt`` and :meth:`create`'s ``loss_fn``, ``hparams``, ``batch_format``, ``axis_name``.

        Example::

          >>> state = jdrop.TrainState.from_nnx(MLP(rngs=nnx.Rngs(0)), optax.adam(1e-3))
        """
        return _build("nnx", model, tx, **options)

    @classmethod
    def from_equinox(cls, model: Any, tx: optax.GradientTransformation, **options: Any) -> TrainState:
        """A state for an ``equinox`` Module, trained with per-example dropout masks.

        The module's floating arrays are the parameters; it is called on ONE example with that example's
        key, ``model(x_i, key=k_i)`` (``model(x_i, state, key=k_i)`` with ``state=``), and splits the key
        among its layers as equinox modules do. Same as :func:`jdrop.interop.equinox.train_state` (see it for
        the details); :func:`jdrop.interop.equinox.combine` gives the trained module back.

        Args:
          model: the ``equinox.Module``.
          tx: an optax transformation.
          **options: ``state`` (an ``equinox.nn.State``, for BatchNorm) and :meth:`create`'s ``loss_fn``,
            ``hparams``, ``batch_format``, ``axis_name``.

        Example::

          >>> model, bn_state = eqx.nn.make_with_state(Net)(key=jax.random.key(0))
          >>> state = jdrop.TrainState.from_equinox(model, optax.adam(1e-3), state=bn_state)
        """
        return _build("equinox", model, tx, **options)

    def apply_gradients(self, grads: Any, **changes: Any) -> TrainState:
        """One optimiser update: ``params <- params + tx.update(grads)``; ``changes`` replace other fields."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return dataclasses.replace(
            self,
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            **changes,
        )

    def replace(self, **changes: Any) -> TrainState:
        """A copy with ``changes`` (``dataclasses.replace``), e.g. ``state.replace(hparams=...)``."""
        return dataclasses.replace(self, **changes)


def _strongly_typed(value: Any) -> jax.Array:
    """``value`` as an array of a definite dtype: a Python float becomes float32, not a weakly typed array,
    so that replacing it by a schedule's float32 output later does not recompile the step."""
    array = jnp.asarray(value)
    return jnp.asarray(array, dtype=array.dtype)


def count_examples(batch: Batch, batch_format: str) -> int:
    """The number of examples of ``batch``, after checking it has the format's structure.

    Raises:
      TypeError: for an ``"xy"`` batch that is not a mapping with keys ``x`` and ``y``.
      ValueError: if the arrays do not share their leading (example) axis, or there are none.
    """
    if batch_format == "xy":
        if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
            raise TypeError(
                f"`batch` must be a mapping with keys 'x' and 'y', got {type(batch).__name__} (for any other "
                "batch pytree, create the TrainState with batch_format='pytree')."
            )
        x, y = batch["x"], batch["y"]
        if jnp.ndim(x) < 1 or jnp.ndim(y) < 1 or jnp.shape(x)[0] != jnp.shape(y)[0]:
            raise ValueError(
                f"`batch['x']` and `batch['y']` must share their leading (example) axis, "
                f"got {jnp.shape(x)} and {jnp.shape(y)}."
            )
        return int(jnp.shape(x)[0])
    leaves = jax.tree_util.tree_leaves(batch)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    if not shapes:
        raise ValueError("`batch` holds no arrays.")
    if any(len(shape) < 1 or shape[0] != shapes[0][0] for shape in shapes):
        raise ValueError(f"every array of `batch` must share its leading (example) axis, got shapes {shapes}.")
    return int(shapes[0][0])


def batch_parts(batch: Batch, batch_format: str) -> tuple[Any, Any]:
    """``(what apply_fn maps over, what loss_fn gets)``: ``(x, y)`` for ``"xy"``, ``(batch, batch)`` otherwise."""
    if batch_format == "xy":
        return batch["x"], batch["y"]
    return batch, batch
