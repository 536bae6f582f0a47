"""The seed's network: a multilayer perceptron with dropout, forward and backward written by hand.

``forward`` returns the residuals that ``backward`` consumes, as in the seed code that asked whether
each training input samples its own sub-network (it does: every example has its own key). The pair
is tied to :func:`apply` with ``jax.custom_vjp``, so ``jax.grad`` of anything built on ``apply``
uses the hand-written backward pass.

Layer ``l`` computes ``a_l = dropout(h_l; rate_l)``, ``z_l = a_l @ W_l + b_l`` and
``h_{l+1} = act(z_l)`` (no activation after the last layer: it returns logits); ``h_0 = x``, so
``rates[0]`` is input dropout. The backward pass, with ``g_l = dL/dz_l``::

    dW_l = a_l^T g_l        db_l = sum(g_l)
    dh_l = (g_l W_l^T) * m_l * s          (the forward pass's mask m_l, scale s)
    g_{l-1} = dh_l * act'(h_l)             (act' from the pre-dropout value h_l:
                                            tanh' = 1 - h_l^2, relu' = [h_l > 0])

Memory: one activation per layer and the example keys (a few bytes per example); no mask, ever.

- ReLU hidden layers keep the dropped activation ``a_l = m_l * s * h_l`` (the matrix product's
  input, which exists anyway). It holds all the backward pass needs: ``dW_l = a_l^T g_l``, and
  since ``s > 0``, ``m_l * relu'(h_l) = [a_l > 0]``, so ``g_{l-1} = (g_l W_l^T) * s * [a_l > 0]``
  exactly. The mask is neither stored nor regenerated.
- tanh layers (``1 - h_l^2`` needs ``h_l``) and the input layer (which keeps ``x`` itself, an
  argument rather than a new buffer) keep the pre-dropout ``h_l``; the backward pass regenerates
  the mask from the key and recomputes ``a_l``, inside the fusions that consume the cotangent.

Either way dropout adds nothing per element to a training step's memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

from jdrop import masks
from jdrop._dropout import DropoutResidual, dropout, dropout_bwd, dropout_fwd, mask_residual
from jdrop._rates import check_float_input, check_rate

__all__ = ["MLPParams", "MLPResiduals", "apply", "backward", "forward", "init"]

Activation = Literal["tanh", "relu"]
_ACTIVATIONS = ("tanh", "relu")


@partial(jax.tree_util.register_dataclass, data_fields=["weights", "biases"], meta_fields=["activation"])
@dataclasses.dataclass(frozen=True)
class MLPParams:
    """Weights ``W_l`` of shape ``(d_l, d_{l+1})``, biases ``b_l``, and the (static) activation."""

    weights: tuple[jax.Array, ...]
    biases: tuple[jax.Array, ...]
    activation: str = "tanh"


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["activations", "key_data", "rates", "layer_key_data"],
    meta_fields=["active", "scale", "impl"],
)
@dataclasses.dataclass(frozen=True)
class MLPResiduals:
    """What :func:`backward` needs: one activation per layer (batch-major) and the example keys.

    ``activations[l]`` is the dropped ``a_l`` for a ReLU hidden layer and the pre-dropout ``h_l``
    otherwise (``activations[0]`` is ``x``); see the module docstring.

    ``key_data`` holds the example keys ``(B, *key)``; ``layer_key_data`` the keys each layer
    draws its masks from, ``fold_in(example key, l)``, as one ``(L, B, *key)`` array (derived once
    in the forward pass: a few bytes per example and layer, nothing per element).
    """

    activations: tuple[jax.Array, ...]
    key_data: jax.Array
    rates: tuple[jax.Array, ...]
    active: tuple[bool, ...]
    scale: str
    impl: str
    layer_key_data: jax.Array | None = None


def init(
    key: Any, layer_sizes: Sequence[int], *, activation: Activation = "tanh", dtype: Any = jnp.float32
) -> MLPParams:
    """Initialises an MLP with ``len(layer_sizes) - 1`` weight layers.

    ``W_l ~ N(0, gain / d_l)`` (LeCun normal for tanh, gain 1; He normal for relu, gain 2), ``b_l = 0``.

    Args:
      key: PRNG key.
      layer_sizes: ``(d_0, d_1, ..., d_L)``, input size first, number of outputs last.
      activation: ``"tanh"`` or ``"relu"``, stored in the params (static).
      dtype: parameter dtype.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {_ACTIVATIONS}, got {activation!r}.")
    sizes = tuple(layer_sizes)
    if len(sizes) < 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in sizes):
        raise ValueError(f"`layer_sizes` must hold at least two positive ints, got {layer_sizes!r}.")
    gain = 2.0 if activation == "relu" else 1.0
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


def _check_input(params: MLPParams, x: Any) -> jax.Array:
    x = check_float_input(x)
    d_in = params.weights[0].shape[0]
    if x.ndim not in (1, 2) or x.shape[-1] != d_in:
        raise ValueError(f"`x` must have shape ({d_in},) or (batch, {d_in}), got {x.shape}.")
    return x


# ------------------------------------------------------------------------------------ the maths


def _act(name: str, z: jax.Array) -> jax.Array:
    return jnp.tanh(z) if name == "tanh" else jax.nn.relu(z)


def _act_grad_from_output(name: str, h: jax.Array) -> jax.Array:
    return 1.0 - h * h if name == "tanh" else (h > 0).astype(h.dtype)


def _layer_keys(key_data: jax.Array, impl: str, num_layers: int) -> jax.Array:
    """``fold_in(example key, l)`` for every layer ``l`` and example: key data ``(L, B, *key)``.

    One :func:`jdrop.masks.fold_in` derives all of them, once per step: the backward pass reads
    them from the residuals instead of deriving them again.
    """
    keys = jax.random.wrap_key_data(key_data, impl=impl)
    layers = jnp.arange(num_layers, dtype=jnp.uint32).reshape((num_layers,) + (1,) * keys.ndim)
    return jax.random.key_data(masks.fold_in(keys[None], layers))


def _drop(
    res: MLPResiduals, layer: int, h: jax.Array, residual: Literal["key", "mask"] = "key"
) -> tuple[jax.Array, DropoutResidual | None]:
    """Dropout of layer ``layer`` on a batch, one key per example; (a, per-example residuals)."""
    if not res.active[layer]:
        return h, None
    assert res.layer_key_data is not None, "the forward pass derives the layer keys"
    return _drop_examples(res.layer_key_data[layer], h, res.rates[layer], res.scale, res.impl, residual)


@partial(jax.jit, static_argnums=(3, 4, 5))
def _drop_examples(
    key_data: jax.Array, h: jax.Array, rate: jax.Array, scale: str, impl: str, residual: str
) -> tuple[jax.Array, DropoutResidual]:
    """``dropout_fwd`` of every example (row of ``h``) with its own key (row of ``key_data``).

    A nested ``jit``, so that layers of the same width share one trace (and one lowering).
    """

    def one(key_data, h_example):
        key = jax.random.wrap_key_data(key_data, impl=impl)
        return dropout_fwd(key, h_example, rate, scale=scale, residual=residual)

    return jax.vmap(one)(key_data, h)


def _keeps_dropped(activation: str, layer: int) -> bool:
    """Whether layer ``layer`` keeps its dropped input ``a_l`` (else the pre-dropout ``h_l``).

    A ReLU layer's ``a_l = m * s * relu(z)`` holds everything the backward pass needs:
    ``dW = a_l^T g`` and ``m * relu'(z) = [a_l > 0]`` (``s > 0``), so its mask is never
    regenerated. tanh needs ``h_l`` for ``1 - h_l^2``, and the input layer keeps ``x`` itself
    (an argument, not a new buffer); both regenerate their masks from the key.
    """
    return activation == "relu" and layer > 0


def _forward_batch(params: MLPParams, x: jax.Array, res: MLPResiduals) -> tuple[jax.Array, MLPResiduals]:
    h = x
    kept = []
    last = len(params.weights) - 1
    for layer, (w, b) in enumerate(zip(params.weights, params.biases)):
        a, _ = _drop(res, layer, h)
        kept.append(a if _keeps_dropped(params.activation, layer) else h)
        z = a @ w + b
        h = z if layer == last else _act(params.activation, z)
    return h, dataclasses.replace(res, activations=tuple(kept))


def _backward_batch(params: MLPParams, res: MLPResiduals, dout: jax.Array) -> tuple[MLPParams, jax.Array]:
    g = dout
    grad_w, grad_b = [], []
    for layer in reversed(range(len(params.weights))):
        if _keeps_dropped(params.activation, layer):
            # a_l = m * s * relu(z): dW from a_l, and g = da * s * [a_l > 0] (= da * m * s * relu').
            a = res.activations[layer]
            grad_w.append(a.T @ g)
            grad_b.append(jnp.sum(g, axis=0))
            da = g @ params.weights[layer].T
            rate = res.rates[layer] if res.active[layer] else 0.0
            g = dropout_bwd(mask_residual(a > 0, rate, scale=res.scale), da)
            continue
        h = res.activations[layer]
        # Tie the recomputation to the cotangent so XLA runs it here, inside the backward fusions,
        # instead of keeping the forward pass's copy alive (common-subexpression elimination).
        h, g = lax.optimization_barrier((h, g))
        # One regeneration serves both uses of the mask (a for dW, and dh); it lives only here.
        a, drop_res = _drop(res, layer, h, residual="mask")
        grad_w.append(a.T @ g)
        grad_b.append(jnp.sum(g, axis=0))
        dh = g @ params.weights[layer].T
        if drop_res is not None:
            dh = jax.vmap(dropout_bwd)(drop_res, dh)
        g = dh * _act_grad_from_output(params.activation, h) if layer > 0 else dh
    grads = MLPParams(tuple(reversed(grad_w)), tuple(reversed(grad_b)), params.activation)
    return grads, g


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _apply_batch(static, params, x, key_data, rates):
    return _apply_batch_fwd(static, params, x, key_data, rates)[0]


def _apply_batch_fwd(static, params, x, key_data, rates):
    active, scale, impl = static
    layer_keys = _layer_keys(key_data, impl, len(params.weights)) if any(active) else None
    res = MLPResiduals((), key_data, rates, active, scale, impl, layer_keys)
    return _forward_batch(params, x, res)


def _fwd_rule(static, params, x, key_data, rates):
    out, res = _apply_batch_fwd(static, params, x, key_data, rates)
    return out, (params, res)


def _bwd_rule(static, saved, dout):
    del static
    params, res = saved
    grads, dx = _backward_batch(params, res, dout)
    return grads, dx, None, tuple(None for _ in res.rates)


_apply_batch.defvjp(_fwd_rule, _bwd_rule)


def _apply_one(static, params, x, key_data, rates):
    """One example through the batch core (a batch of one)."""
    return _apply_batch(static, params, x[None], key_data[None], rates)[0]


def _make_vmappable(static):
    """``_apply_one`` that, under ``jax.vmap`` over examples, runs the batch core once.

    A custom_vjp vmapped over examples would compute ``dW`` per example and sum them; running
    the batch core on the whole minibatch computes ``dW = A^T G`` as one matrix product.
    """

    @custom_vmap
    def one(params, x, key_data, rates):
        return _apply_one(static, params, x, key_data, rates)

    @one.def_vmap
    def rule(axis_size, in_batched, params, x, key_data, rates):
        params_batched, x_batched, key_batched, rates_batched = in_batched
        if any(jax.tree_util.tree_leaves(params_batched)) or any(jax.tree_util.tree_leaves(rates_batched)):
            axes = jax.tree_util.tree_map(lambda b: 0 if b else None, tuple(in_batched))
            return jax.vmap(partial(_apply_one, static), in_axes=axes)(params, x, key_data, rates), True
        if not x_batched:
            x = jnp.broadcast_to(x, (axis_size, *x.shape))
        if not key_batched:
            key_data = jnp.broadcast_to(key_data, (axis_size, *key_data.shape))
        return _apply_batch(static, params, x, key_data, rates), True

    return one


def _is_vmapped(x: Any) -> bool:
    """Whether the innermost transformation at this call is a ``vmap`` over ``x``.

    Only then can the batched rule run: a ``custom_vmap`` cannot be differentiated from inside
    (``vmap(grad(f))`` or plain ``grad(f)``), where the per-example path is used instead. The
    check reads JAX's current trace; if that internal ever moves, the per-example path (correct,
    slower under vmap) is taken.
    """
    try:
        from jax._src import core as jax_core

        trace = jax_core.trace_ctx.trace
        return type(trace).__name__ == "BatchTrace" and getattr(x, "_trace", None) is trace
    except (ImportError, AttributeError):  # pragma: no cover - depends on JAX internals
        return False


# ------------------------------------------------------------------------------------ public API


def _prepare(params, x, rates, scale):
    params = _check_params(params)
    x = _check_input(params, x)
    rates = _check_rates(rates, len(params.weights))
    if scale not in ("inverted", "classic"):
        raise ValueError(f"`scale` must be 'inverted' or 'classic', got {scale!r}.")
    active = tuple(not (isinstance(r, float) and r == 0.0) for r in rates)
    return params, x, rates, active


def _key_data(key: Any, x: jax.Array) -> tuple[jax.Array, str]:
    key = masks.require_key(key, what="jdrop.mlp", eval_hint="train=False")
    impl = str(jax.random.key_impl(key))
    if x.ndim == 2:
        return jax.random.key_data(masks.example_keys(key, x.shape[0])), impl
    return jax.random.key_data(key), impl


def _rates_array(rates) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(r, jnp.float32) for r in rates)


def apply(
    params: MLPParams,
    x: Any,
    *,
    key: Any = None,
    rates: Sequence[Any] | float,
    train: bool = False,
    scale: Literal["inverted", "classic"] = "inverted",
) -> jax.Array:
    """Runs the MLP on one example ``(d_0,)`` or a batch ``(B, d_0)``; returns logits.

    Train: ``a_l = dropout(h_l; key_l, rates[l], scale)`` before every weight layer, where
    example ``i`` of a batch uses ``jdrop.example_keys(key, B)[i]`` (so a batch equals the vmap of
    single examples with those keys) and layer ``l`` folds ``l`` into the example key. Eval:
    ``a_l = h_l`` (inverted) or ``a_l = keep_l * h_l`` (classic, the weight-scaling rule of
    Srivastava et al. 2014). Gradients use the hand-written :func:`backward`.

    Args:
      params: from :func:`init`.
      x: one example or a batch.
      key: PRNG key, required when ``train``.
      rates: one drop rate per weight layer (``rates[0]`` is input dropout), or one for all;
        Python floats or traced scalars.
      train: training mode (dropout on) or evaluation.
      scale: ``"inverted"`` or ``"classic"``.
    """
    params, x, checked, active = _prepare(params, x, rates, scale)
    if not train:
        h = x
        last = len(params.weights) - 1
        for layer, (w, b) in enumerate(zip(params.weights, params.biases)):
            a = dropout(None, h, checked[layer], deterministic=True, scale=scale)
            z = a @ w + b
            h = z if layer == last else _act(params.activation, z)
        return h
    key_data, impl = _key_data(key, x)
    static = (active, scale, impl)
    rates_arr = _rates_array(checked)
    if x.ndim == 2:
        return _apply_batch(static, params, x, key_data, rates_arr)
    if _is_vmapped(x):
        return _make_vmappable(static)(params, x, key_data, rates_arr)
    return _apply_one(static, params, x, key_data, rates_arr)


def forward(
    params: MLPParams,
    x: Any,
    key: Any,
    rates: Sequence[Any] | float,
    *,
    scale: Literal["inverted", "classic"] = "inverted",
) -> tuple[jax.Array, MLPResiduals]:
    """The seed's training forward pass: returns ``(logits, residuals)`` for :func:`backward`.

    Same computation as ``apply(params, x, key=key, rates=rates, train=True)``. The residuals hold
    one activation per layer (dropped for ReLU hidden layers, pre-dropout otherwise) and the example
    keys (see the module docstring).
    """
    params, x, checked, active = _prepare(params, x, rates, scale)
    key_data, impl = _key_data(key, x)
    batched = x.ndim == 2
    if not batched:
        x, key_data = x[None], key_data[None]
    out, res = _apply_batch_fwd((active, scale, impl), params, x, key_data, _rates_array(checked))
    return (out if batched else out[0]), res


def backward(params: MLPParams, residuals: MLPResiduals, dout: Any) -> MLPParams:
    """The seed's backward pass: gradients of ``sum(dout * logits)`` w.r.t. the parameters.

    Multiplies each layer's gradient by the same mask as the forward pass (read from a ReLU
    layer's dropped activation, or regenerated from the key) and takes the activation's
    derivative from the pre-dropout value (module docstring).
    """
    params = _check_params(params)
    dout = jnp.asarray(dout)
    if dout.ndim == 1:
        dout = dout[None]
    grads, _ = _backward_batch(params, residuals, dout.astype(residuals.activations[0].dtype))
    return grads
