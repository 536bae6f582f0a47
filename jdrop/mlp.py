"""The seed's network: a multilayer perceptron with dropout, forward and backward written by hand.

``forward`` returns the residuals that ``backward`` consumes, as in the seed code that asked whether
each training input samples its own sub-network (it does: every example has its own key). In
training, :func:`apply` ties them to every mode of JAX's autodiff: ``jax.grad`` of anything built
on ``apply`` runs the hand-written backward pass, and forward mode (``jax.jvp``, ``jax.jacfwd``,
``jax.linearize``) and second derivatives (``jax.hessian``, ``grad`` of ``grad``) work too, all
with the forward pass's masks (see Autodiff below).

Layer ``l`` computes ``a_l = dropout(h_l; rate_l)``, ``z_l = a_l @ W_l + b_l`` and
``h_{l+1} = act(z_l)`` (no activation after the last layer: it returns logits); ``h_0 = x``, so
``rates[0]`` is input dropout. The backward pass, with ``g_l = dL/dz_l``::

    dW_l = a_l^T g_l        db_l = sum(g_l)
    dh_l = (g_l W_l^T) * m_l * s          (the forward pass's mask m_l, scale s)
    g_{l-1} = dh_l * act'(h_l)             (act' from the pre-dropout value h_l:
                                            tanh' = 1 - h_l^2, relu' = [h_l > 0])

Memory: one activation per layer and the layer keys (a few bytes per example); no mask, ever.

- ReLU hidden layers keep the dropped activation ``a_l = m_l * s * h_l`` (the matrix product's
  input, which exists anyway). It holds all the backward pass needs: ``dW_l = a_l^T g_l``, and
  since ``s > 0``, ``m_l * relu'(h_l) = [a_l > 0]``, so ``g_{l-1} = (g_l W_l^T) * s * [a_l > 0]``
  exactly. The mask is neither stored nor regenerated.
- tanh layers (``1 - h_l^2`` needs ``h_l``) and the input layer (which keeps ``x`` itself, an
  argument rather than a new buffer) keep the pre-dropout ``h_l``; the backward pass regenerates
  the mask from the key and recomputes ``a_l``, inside the fusions that consume the cotangent.

Either way dropout adds nothing per element to a training step's memory.

Autodiff. The training network is a ``jax.custom_jvp`` whose tangent is the Jacobian-vector product
written by hand from the same residuals, for tangents ``dW_l``, ``db_l`` of the parameters and
``dx`` of the input (``dz_{-1} = dx``)::

    da_l = dh_l * m_l * s                  (dh_0 = dx; dh_l = act'(h_l) * dz_{l-1}, so for
                                            a ReLU hidden layer da_l = dz_{l-1} * s * [a_l > 0])
    dz_l = da_l @ W_l + a_l @ dW_l + db_l  (the logits' tangent is dz_L)

That tangent is a linear map of ``(dW, db, dx)`` whose transpose is the backward pass above;
``lax.custom_linear_solve`` (the JAX primitive whose transpose is given, not derived) carries both.
Forward mode evaluates the JVP. Reverse mode keeps only the residuals and runs the hand-written
backward pass on the cotangent: the compiled training step is the program a ``jax.custom_vjp`` of
the same pair compiles to (same temporaries, same instructions). Higher derivatives differentiate
both exactly. No derivative flows to the rates or keys (the masks are piecewise constant in them).
Evaluation (``deterministic=True``) is plain JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jdrop import masks
from jdrop._batching import takes_batch
from jdrop._dropout import DropoutResidual, Scale, dropout, dropout_bwd, dropout_fwd
from jdrop._linear import linear_map
from jdrop._shard_map import cotangent_like, in_manual_mesh
from jdrop._typing import KeyLike
from jdrop._validation import check_choice, check_float_input, check_rate, check_scale, deterministic_or_train

__all__ = ["MLPParams", "MLPResiduals", "apply", "backward", "forward", "init"]

ActivationName = Literal["tanh", "relu"]


class _Activation(NamedTuple):
    """One activation, everything jdrop.mlp needs of it in one row."""

    function: Callable[[jax.Array], jax.Array]
    derivative_from_output: Callable[[jax.Array], jax.Array]  # act'(z) written in h = act(z)
    init_gain: float  # W ~ N(0, gain / d_in)
    keeps_dropped: bool  # a hidden layer keeps its dropped input a = m * s * h (its sign carries m * act')


_ACTIVATIONS: dict[str, _Activation] = {
    "tanh": _Activation(jnp.tanh, lambda h: 1.0 - h * h, 1.0, False),
    "relu": _Activation(jax.nn.relu, lambda h: (h > 0).astype(h.dtype), 2.0, True),
}


def _activation(name: Any) -> _Activation:
    return _ACTIVATIONS[check_choice(name, tuple(_ACTIVATIONS), name="activation")]


@partial(jax.tree_util.register_dataclass, data_fields=["weights", "biases"], meta_fields=["activation"])
@dataclasses.dataclass(frozen=True)
class MLPParams:
    """Weights ``W_l`` of shape ``(d_l, d_{l+1})``, biases ``b_l``, and the (static) activation.

    Raises:
      ValueError: if ``activation`` is not one of jdrop.mlp's activations.
    """

    weights: tuple[jax.Array, ...]
    biases: tuple[jax.Array, ...]
    activation: str = "tanh"

    def __post_init__(self) -> None:
        _activation(self.activation)


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["activations", "key_data", "rates"],
    meta_fields=["active", "scale", "impl"],
)
@dataclasses.dataclass(frozen=True)
class MLPResiduals:
    """What :func:`backward` needs, batch-major: one activation per layer and the example keys.

    Attributes:
      activations: ``activations[l]`` is the dropped ``a_l`` for a ReLU hidden layer and the
        pre-dropout ``h_l`` otherwise (``activations[0]`` is ``x``); see the module docstring.
      key_data: the example keys' data, ``(B, *key)`` (``(*key,)`` for one example). Layer ``l``
        draws its masks from ``fold_in(example key, l)``; the backward pass derives those keys
        again (a few bytes per example) for the layers that regenerate their masks.
      rates: every layer's rate as a float32 scalar (traced rates stay traced).
      active: whether each layer drops (static: False for a static rate of 0).
      scale: ``"inverted"`` or ``"classic"``.
      impl: the PRNG implementation of the keys.
    """

    activations: tuple[jax.Array, ...]
    key_data: jax.Array
    rates: tuple[jax.Array, ...]
    active: tuple[bool, ...]
    scale: str
    impl: str


def init(
    key: KeyLike, layer_sizes: Sequence[int], *, activation: ActivationName = "tanh", dtype: DTypeLike = jnp.float32
) -> MLPParams:
    """Initialises an MLP with ``len(layer_sizes) - 1`` weight layers.

    ``W_l ~ N(0, gain / d_l)`` (LeCun normal for tanh, gain 1; He normal for relu, gain 2), ``b_l = 0``.

    Args:
      key: PRNG key.
      layer_sizes: ``(d_0, d_1, ..., d_L)``, input size first, number of outputs last.
      activation: ``"tanh"`` or ``"relu"``, stored in the params (static).
      dtype: parameter dtype.
    """
    gain = _activation(activation).init_gain
    sizes = tuple(layer_sizes)
    if len(sizes) < 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in sizes):
        raise ValueError(f"`layer_sizes` must hold at least two positive ints, got {layer_sizes!r}.")
    keys = jax.random.split(masks.canonical_key(key), len(sizes) - 1)
    weights = tuple(
        jax.random.normal(k, (d_in, d_out), dtype) * jnp.asarray(np.sqrt(gain / d_in), dtype)
        for k, d_in, d_out in zip(keys, sizes[:-1], sizes[1:])
    )
    biases = tuple(jnp.zeros((d,), dtype) for d in sizes[1:])
    return MLPParams(weights, biases, activation)


# ------------------------------------------------------------------------------------- checks


def _check_params(params: Any) -> MLPParams:
    if not isinstance(params, MLPParams):
        raise TypeError(f"`params` must come from jdrop.mlp.init, got {type(params).__name__}.")
    return params


def _check_rates(rates: Any, num_layers: int) -> tuple[float | jax.Array, ...]:
    if isinstance(rates, (int, float)) or (hasattr(rates, "shape") and np.ndim(rates) == 0):
        rates = (rates,) * num_layers
    rates = tuple(rates)
    if len(rates) != num_layers:
        raise ValueError(
            f"`rates` must have one rate per weight layer ({num_layers}: rates[0] on the input), got {len(rates)}."
        )
    return tuple(check_rate(r, name=f"rates[{i}]") for i, r in enumerate(rates))


def _check_input(params: MLPParams, x: ArrayLike) -> jax.Array:
    x = check_float_input(x)
    d_in = params.weights[0].shape[0]
    if x.ndim not in (1, 2) or x.shape[-1] != d_in:
        raise ValueError(f"`x` must have shape ({d_in},) or (batch, {d_in}), got {x.shape}.")
    return x


# ------------------------------------------------------------------------------------ the maths


def _layer_keys(key_data: jax.Array, impl: Any, num_layers: int) -> jax.Array:
    """``fold_in(example key, l)`` for every layer ``l`` and example: key data ``(L, B, *key)``.

    One :func:`jdrop.masks.fold_in` derives all of them (a tiny, separate computation).
    """
    keys = jax.random.wrap_key_data(key_data, impl=impl)
    layers = jnp.arange(num_layers, dtype=jnp.uint32).reshape((num_layers,) + (1,) * keys.ndim)
    return jax.random.key_data(masks.fold_in(keys[None], layers))


@partial(jax.jit, static_argnums=(3, 4, 5))
def _drop_examples(
    key_data: jax.Array, h: jax.Array, rate: jax.Array, scale: str, impl: Any, residual: str
) -> tuple[jax.Array, DropoutResidual]:
    """``dropout_fwd`` of one example ``(d,)`` with its key, or of every row of a batch with its own key.

    A nested ``jit``, so that layers of the same width share one trace (and one lowering).
    """

    def one(key_data, h_example):
        key = jax.random.wrap_key_data(key_data, impl=impl)
        return dropout_fwd(key, h_example, rate, scale=scale, residual=residual)

    return one(key_data, h) if h.ndim == 1 else jax.vmap(one)(key_data, h)


def _train_drop(res: MLPResiduals, residual: str = "key") -> Callable[[int, jax.Array], tuple[jax.Array, Any]]:
    """Layer ``l``'s training dropout, one key per example: ``(a, per-example residuals)``.

    The layer keys are derived at the first layer that drops (one :func:`_layer_keys` for all layers), so a
    backward pass whose layers all read their masks from the kept activations (ReLU) derives none.
    """
    layer_keys: list[jax.Array] = []

    def drop(layer: int, h: jax.Array) -> tuple[jax.Array, Any]:
        if not res.active[layer]:
            return h, None
        if not layer_keys:
            layer_keys.append(_layer_keys(res.key_data, res.impl, len(res.active)))
        return _drop_examples(layer_keys[0][layer], h, res.rates[layer], res.scale, res.impl, residual)

    return drop


def _eval_drop(rates: Sequence[float | jax.Array], scale: Scale) -> Callable[[int, jax.Array], tuple[jax.Array, Any]]:
    """Layer ``l``'s evaluation pass: ``h`` (inverted) or ``keep_l * h`` (classic)."""

    def drop(layer: int, h: jax.Array) -> tuple[jax.Array, Any]:
        return dropout(None, h, rates[layer], deterministic=True, scale=scale), None

    return drop


def _forward(
    params: MLPParams, x: jax.Array, drop: Callable[[int, jax.Array], tuple[jax.Array, Any]]
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The network on one example ``(d_0,)`` or a batch ``(B, d_0)``: logits and what each layer keeps."""
    act = _activation(params.activation)
    h, kept = x, []
    last = len(params.weights) - 1
    for layer, (w, b) in enumerate(zip(params.weights, params.biases)):
        a, _ = drop(layer, h)
        kept.append(a if act.keeps_dropped and layer > 0 else h)
        z = a @ w + b
        h = z if layer == last else act.function(z)
    return h, tuple(kept)


def _train_forward(static, params, x, key_data, rates):
    """Training forward pass of a batch: ``(logits, residuals)``."""
    active, scale, impl = static
    res = MLPResiduals((), key_data, rates, active, scale, impl)
    out, kept = _forward(params, x, _train_drop(res))
    return out, dataclasses.replace(res, activations=kept)


def _kept_sign_mask(res: MLPResiduals, layer: int) -> DropoutResidual:
    """A ReLU hidden layer's ``m_l * relu'(h_l) = [a_l > 0]`` (with its scale), read from the kept ``a_l``."""
    rate = res.rates[layer] if res.active[layer] else 0.0
    return DropoutResidual.from_mask(res.activations[layer] > 0, rate, scale=res.scale)


def _apply_mask(drop_res: DropoutResidual | None, v: jax.Array) -> jax.Array:
    """``v * m * s`` with a regenerated layer's per-example masks (``v`` itself where the layer does not drop)."""
    if drop_res is None:
        return v
    return dropout_bwd(drop_res, v) if v.ndim == 1 else jax.vmap(dropout_bwd)(drop_res, v)


def _tangent(params: MLPParams, res: MLPResiduals, tangents: tuple[MLPParams, jax.Array]) -> jax.Array:
    """The logits' tangent for tangents ``(dparams, dx)``, with the forward pass's masks (module docstring).

    ``da_l = m_l * s * dh_l``, ``dz_l = da_l @ W_l + a_l @ dW_l + db_l``, ``dh_{l+1} = act'(h_{l+1}) * dz_l``;
    the same residuals as :func:`_backward`, read the same way (its transpose).
    """
    dparams, dx = tangents
    act = _activation(params.activation)
    regenerate = _train_drop(res, residual="mask")
    dz = dx
    for layer, (w, dw, db) in enumerate(zip(params.weights, dparams.weights, dparams.biases)):
        if act.keeps_dropped and layer > 0:
            # m * s * relu'(h) = s * [a > 0]: the dropped activation carries the mask and the derivative.
            a = res.activations[layer]
            da = dropout_bwd(_kept_sign_mask(res, layer), dz)
        else:
            h = res.activations[layer]
            a, drop_res = regenerate(layer, h)
            da = _apply_mask(drop_res, dz * act.derivative_from_output(h) if layer > 0 else dz)
        dz = da @ w + a @ dw + db
    return dz


def _backward(params: MLPParams, res: MLPResiduals, dout: jax.Array) -> tuple[MLPParams, jax.Array]:
    """Gradients of ``sum(dout * logits)`` for one example or a batch: ``(grads, dx)`` (module docstring).

    ``dW = sum_i a_i^T g_i`` is one contraction over the batch; for one example, an outer product. Under
    ``jax.vmap`` over examples the sum over the batch is XLA's, which compiles it as one contraction too.
    """
    act = _activation(params.activation)
    g = dout
    batch_axes = tuple(range(dout.ndim - 1))
    regenerate = _train_drop(res, residual="mask")

    def weight_grad(a, g):
        return jnp.einsum("...i,...j->ij", a, g)

    grad_w, grad_b = [], []
    for layer in reversed(range(len(params.weights))):
        if act.keeps_dropped and layer > 0:
            # a_l = m * s * act(z): dW from a_l, and g = da * s * [a_l > 0] (= da * m * s * relu').
            a = res.activations[layer]
            grad_w.append(weight_grad(a, g))
            grad_b.append(jnp.sum(g, axis=batch_axes))
            g = dropout_bwd(_kept_sign_mask(res, layer), g @ params.weights[layer].T)
            continue
        h = res.activations[layer]
        # Ties the recomputation to the cotangent: it stops XLA's common-subexpression pass from merging it with
        # the forward pass's (which would keep that one alive); XLA:CPU drops the barrier right after that pass.
        h, g = lax.optimization_barrier((h, g))
        # One regeneration serves both uses of the mask (a for dW, and dh).
        a, drop_res = regenerate(layer, h)
        grad_w.append(weight_grad(a, g))
        grad_b.append(jnp.sum(g, axis=batch_axes))
        dh = _apply_mask(drop_res, g @ params.weights[layer].T)
        g = dh * act.derivative_from_output(h) if layer > 0 else dh
    grads = MLPParams(tuple(reversed(grad_w)), tuple(reversed(grad_b)), params.activation)
    return grads, g


def _tangent_of_saved(saved: tuple[MLPParams, MLPResiduals], tangents: tuple[MLPParams, jax.Array]) -> jax.Array:
    return _tangent(*saved, tangents)


def _backward_of_saved(saved: tuple[MLPParams, MLPResiduals], dout: jax.Array) -> tuple[MLPParams, jax.Array]:
    return _backward(*saved, dout)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_apply(static, params, x, key_data, rates):
    return _train_forward(static, params, x, key_data, rates)[0]


@partial(_train_apply.defjvp, symbolic_zeros=True)
def _train_apply_jvp(static, primals, tangents):
    """Forward mode evaluates :func:`_tangent`; reverse mode keeps ``(params, residuals)`` and runs :func:`_backward`.

    No tangent flows from the key data (integers) or the rates (the masks are piecewise constant in them).
    """
    params, x, key_data, rates = primals
    out, res = _train_forward(static, params, x, key_data, rates)
    dparams, dx = tangents[:2]
    # Recomputed, not kept: the transposed solve closes over the residuals only, not over arrays derived from them.
    reference = jax.checkpoint(_tangent_of_saved, policy=jax.checkpoint_policies.nothing_saveable)
    return out, linear_map(_tangent_of_saved, _backward_of_saved, (params, res), (dparams, dx), out,
                           reference=reference)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vjp_train_apply(static, params, x, key_data, rates):
    """Reverse mode only, inside ``jax.shard_map`` (where ``lax.custom_linear_solve``, which carries
    :func:`_train_apply`'s forward mode, loses the mesh axes): the same forward pass and :func:`_backward`."""
    return _train_forward(static, params, x, key_data, rates)[0]


def _vjp_train_apply_fwd(static, params, x, key_data, rates):
    out, res = _train_forward(static, params, x, key_data, rates)
    return out, (params, x, res)


def _vjp_train_apply_bwd(static, saved, dout):
    del static
    params, x, res = saved
    grads, dx = _backward(params, res, dout)
    # A parameter replicated over the devices gets its cotangent summed over them (the transpose of its broadcast
    # onto sharded examples), as JAX's own autodiff gives it.
    grads, dx = cotangent_like((grads, dx), (params, x))
    return grads, dx, None, tuple(None for _ in res.rates)


_vjp_train_apply.defvjp(_vjp_train_apply_fwd, _vjp_train_apply_bwd)


# ------------------------------------------------------------------------------------ public API


def _prepare(params: Any, x: ArrayLike, rates: Any, scale: Any) -> tuple[MLPParams, jax.Array, tuple[Any, ...]]:
    params = _check_params(params)
    x = _check_input(params, x)
    rates = _check_rates(rates, len(params.weights))
    check_scale(scale)
    return params, x, rates


def _example_keys(key: KeyLike | None, x: jax.Array) -> jax.Array:
    """One example's key, or a batch's keys: ``example_keys(key, B)`` for one key, or the ``B`` keys given."""
    if key is not None and x.ndim == 2:
        keys = masks.canonical_key(key)
        if keys.shape == (x.shape[0],):
            return keys
        if keys.shape != ():
            raise ValueError(
                f"`key` must be one key or one key per example (shape ({x.shape[0]},)), got shape {keys.shape}."
            )
    key = masks.require_key(key, what="jdrop.mlp", eval_hint="deterministic=True")
    return masks.example_keys(key, x.shape[0]) if x.ndim == 2 else key


def _train_arguments(params, x, key, rates, scale):
    """The training rule's arguments: the static options, and the key data of every example."""
    example_keys = _example_keys(key, x)
    active = tuple(not (isinstance(r, float) and r == 0.0) for r in rates)
    static = (active, scale, jax.random.key_impl(example_keys))
    # A static rate enters as JAX's default float (float64 under x64), as bernoulli(key, 1 - rate) takes it.
    rates_array = tuple(jnp.asarray(r, jax.dtypes.canonicalize_dtype(np.float64) if isinstance(r, float)
                                    else jnp.float32) for r in rates)
    return static, params, x, jax.random.key_data(example_keys), rates_array


@takes_batch
def apply(
    params: MLPParams,
    x: ArrayLike,
    *,
    key: KeyLike | None = None,
    rates: Sequence[ArrayLike] | float,
    deterministic: bool | None = None,
    scale: Scale = "inverted",
    train: bool | None = None,
) -> jax.Array:
    """Runs the MLP on one example ``(d_0,)`` or a batch ``(B, d_0)``; returns logits.

    Train (``deterministic=False``): ``a_l = dropout(h_l; key_l, rates[l], scale)`` before every weight
    layer, where example ``i`` of a batch uses ``jdrop.example_keys(key, B)[i]`` for one ``key``, or
    ``key[i]`` for one key per example (shape ``(B,)``), so a batch equals the vmap of single examples
    with those keys; layer ``l`` folds ``l`` into the example key. Eval (``deterministic=True``, the
    default): ``a_l = h_l`` (inverted) or ``a_l = keep_l * h_l`` (classic, the weight-scaling rule of
    Srivastava et al. 2014).

    Autodiff in training (module docstring): reverse mode (``grad``, ``vjp``, ``jacrev``) runs the
    hand-written :func:`backward`; forward mode (``jvp``, ``jacfwd``, ``linearize``) the hand-written
    JVP ``dz_l = (dh_l * m_l * s) @ W_l + a_l @ dW_l + db_l``, ``dh_{l+1} = act'(h_{l+1}) * dz_l``,
    with the same masks; their compositions (``hessian``, ``grad`` of ``grad``) are exact. No
    derivative flows to ``rates`` or ``key``.

    One example and a batch run the same rule; on a batch the weight gradient
    ``sum_i a_i^T g_i`` is one matrix product. ``apply`` is marked :func:`jdrop.train.takes_batch`, so
    :func:`jdrop.train_step` (and ``per_example``, ``mc_predict``, ``rdrop_loss``) call it once on the
    batch with the example keys instead of vmapping it. Under your own ``jax.vmap`` over examples it is
    correct too, but JAX then batches the one-example rule, 1.3-1.5x slower per training step of a
    4-layer ReLU MLP (``benchmarks/per_example_paths.py``): call it on the batch with one key per example
    instead.

    Args:
      params: from :func:`init`.
      x: one example or a batch.
      key: PRNG key (one, or one per example of a batch), required in training.
      rates: one drop rate per weight layer (``rates[0]`` is input dropout), or one for all;
        Python floats or traced scalars.
      deterministic: evaluation (True, the default: dropout off) or training (False).
      scale: ``"inverted"`` or ``"classic"``.
      train: deprecated spelling of ``not deterministic`` (warns; passing both is a ``TypeError``).

    Example::

      >>> params = jdrop.mlp.init(jax.random.key(0), [4, 16, 3])
      >>> x = jnp.ones((8, 4))
      >>> logits = jdrop.mlp.apply(params, x, key=jax.random.key(1), rates=(0.1, 0.5), deterministic=False)
      >>> logits = jdrop.mlp.apply(params, x, rates=(0.1, 0.5))   # evaluation
    """
    deterministic = deterministic_or_train(deterministic, train, default=True, where="jdrop.mlp.apply")
    params, x, checked = _prepare(params, x, rates, scale)
    if deterministic:
        return _forward(params, x, _eval_drop(checked, scale))[0]
    return (_vjp_train_apply if in_manual_mesh() else _train_apply)(*_train_arguments(params, x, key, checked, scale))


def forward(
    params: MLPParams,
    x: ArrayLike,
    key: KeyLike,
    rates: Sequence[ArrayLike] | float,
    *,
    scale: Scale = "inverted",
) -> tuple[jax.Array, MLPResiduals]:
    """The seed's training forward pass: returns ``(logits, residuals)`` for :func:`backward`.

    Same computation as ``apply(params, x, key=key, rates=rates, deterministic=False)`` (``key``: one key,
    or one per example of a batch). The residuals hold
    one activation per layer (dropped for ReLU hidden layers, pre-dropout otherwise) and the layer
    keys (see :class:`MLPResiduals`), batch-major for a batch.
    """
    params, x, checked = _prepare(params, x, rates, scale)
    return _train_forward(*_train_arguments(params, x, key, checked, scale))


def backward(params: MLPParams, residuals: MLPResiduals, dout: ArrayLike) -> MLPParams:
    """The seed's backward pass: gradients of ``sum(dout * logits)`` w.r.t. the parameters.

    Multiplies each layer's gradient by the same mask as the forward pass (read from a ReLU
    layer's dropped activation, or regenerated from the key) and takes the activation's
    derivative from the pre-dropout value (module docstring).
    """
    params = _check_params(params)
    dout = jnp.asarray(dout)
    grads, _ = _backward(params, residuals, dout.astype(residuals.activations[0].dtype))
    return grads
