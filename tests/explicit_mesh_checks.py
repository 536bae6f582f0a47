"""Explicit-axes meshes (``jax.make_mesh``'s default, under ``jax.set_mesh``): run by ``tests/test_explicit_mesh.py``.

Needs 8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before JAX
starts), so it runs in its own interpreter. For each case it prints, after ``RESULT``, JSON with the
output's and gradients' types (their shardings) and their largest differences from the same call on one
device with unsharded inputs, relative to ``max(1, max |single-device value|)``; the assertions are in
the test file.
"""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import jdrop
from jdrop import mlp
from jdrop.attention import _pallas

assert jax.device_count() == 8, jax.devices()
KEY = jax.random.key(3)
Q = jax.random.normal(jax.random.key(0), (4, 16, 4, 8))
K = jax.random.normal(jax.random.key(1), (4, 16, 2, 8))  # grouped queries: 2 key/value heads
V = jax.random.normal(jax.random.key(2), (4, 16, 2, 8))
COTANGENT = jax.random.normal(jax.random.key(4), (4, 16, 4, 8))


def _error(actual, reference) -> float:
    errors = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(r, np.float64))))
              / max(1.0, float(np.max(np.abs(np.asarray(r, np.float64)))))
              for a, r in zip(jax.tree.leaves(actual), jax.tree.leaves(reference))]
    return max(errors)


def _value_and_grads(fn, q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(jax.reshard(COTANGENT, jax.typeof(out).sharding.spec) if _sharded(out) else COTANGENT)


def _sharded(x) -> bool:
    return any(s is not None for s in (jax.typeof(x).sharding.spec or ()))


def _reference(fn) -> tuple:
    """``fn``'s output and gradients on one device, no mesh (call outside ``jax.set_mesh``)."""
    return jax.jit(partial(_value_and_grads, fn))(Q, K, V)


def _compare(fn, reference, q, k, v) -> dict:
    """``fn`` on the explicitly sharded ``q, k, v`` (under the current mesh) against its ``reference``."""
    out, grads = jax.jit(partial(_value_and_grads, fn))(q, k, v)
    eager = fn(q, k, v)
    ref_out, ref_grads = reference
    return {"out_type": str(jax.typeof(out)), "eager_type": str(jax.typeof(eager)),
            "q_type": str(jax.typeof(q)), "grad_types": [str(jax.typeof(g)) for g in grads],
            "arg_types": [str(jax.typeof(x)) for x in (q, k, v)],
            "out_error": _error(out, ref_out), "eager_error": _error(eager, ref_out),
            "grad_error": _error(grads, ref_grads)}


ATTENTION = {
    "broadcast": dict(dropout_rng=KEY, dropout_rate=0.25),
    "per_element_causal": dict(dropout_rng=KEY, dropout_rate=0.25, broadcast_dropout=False, is_causal=True),
    "masked_eval": dict(mask=jnp.arange(16)[:, None] >= jnp.arange(16)[None, :] - 3, deterministic=True),
}


def attention_cases() -> dict:
    results, fns = {}, {}
    for name, options in ATTENTION.items():
        fns[f"xla/{name}"] = partial(jdrop.dot_product_attention, block_q=8, block_k=8, **options)
        fns[f"pallas/{name}"] = partial(jdrop.dot_product_attention, implementation="pallas", block_q=16,
                                        block_k=16, **options)
    with _pallas.kernels_for("gpu"):  # the Triton kernels, interpreted (no GPU here)
        references = {name: _reference(fn) for name, fn in fns.items()}
        with jax.set_mesh(jax.make_mesh((2, 2), ("data", "model"))):  # batch over "data", heads over "model"
            q, k, v = (jax.reshard(x, P("data", None, "model")) for x in (Q, K, V))
            for name, fn in fns.items():
                results[name] = _compare(fn, references[name], q, k, v)
    with jax.set_mesh(jax.make_mesh((8,), ("data",))):
        q, k, v = (jax.reshard(x, P("data")) for x in (jnp.tile(Q, (2, 1, 1, 1)), jnp.tile(K, (2, 1, 1, 1)),
                                                         jnp.tile(V, (2, 1, 1, 1))))
        out = jdrop.dot_product_attention(q, k, v, dropout_rng=KEY, dropout_rate=0.25)
        results["data8"] = {"out_type": str(jax.typeof(out))}
    return results


def ring_cases() -> dict:
    """``axis_name=`` inside ``jax.shard_map`` over an explicit mesh, and sequence_parallel_attention on one."""
    results = {}
    mesh = jax.make_mesh((4,), ("seq",))
    options = dict(dropout_rng=KEY, dropout_rate=0.25, is_causal=True)
    reference = _reference(partial(jdrop.dot_product_attention, **options))
    with jax.set_mesh(mesh):
        q, k, v = (jax.reshard(x, P(None, "seq")) for x in (Q, K, V))
        ring = jax.shard_map(partial(jdrop.dot_product_attention, axis_name="seq", **options),
                             in_specs=P(None, "seq"), out_specs=P(None, "seq"))
        results["ring/shard_map"] = _compare(ring, reference, q, k, v)
        wrapper = partial(jdrop.sequence_parallel_attention, mesh=mesh, axis_name="seq", **options)
        results["ring/sequence_parallel_attention"] = _compare(wrapper, reference, q, k, v)
    return results


def train_cases() -> dict:
    """jdrop.train_step on a batch sharded over an explicit mesh (by jax.reshard and by jdrop.distributed)."""
    params = mlp.init(jax.random.key(0), [12, 24, 4], activation="tanh")
    batch = {"x": jax.random.normal(jax.random.key(1), (32, 12)), "y": jnp.arange(32) % 4}

    def train(shard):
        state = jdrop.TrainState.create(apply_fn=partial(mlp.apply, rates=(0.5, 0.0)), params=params,
                                        tx=optax.adam(1e-2))
        state, data = shard(state, batch)
        for step in range(3):
            state, metrics = jdrop.train_step(state, data, jax.random.fold_in(KEY, step))
        return state.params, metrics, data

    ref_params, ref_metrics, _ = train(lambda state, batch: (state, batch))
    results = {}
    mesh = jax.make_mesh((8,), ("data",))
    ways = {"reshard": lambda state, batch: (state, jax.reshard(batch, P("data"))),
            "distributed": lambda state, batch: (jdrop.distributed.replicate(state, mesh),
                                                 jdrop.distributed.shard_batch(batch, mesh))}
    for name, shard in ways.items():
        with jax.set_mesh(mesh):
            params_n, metrics, data = train(shard)
        results[f"train/{name}"] = {"batch_type": str(jax.typeof(data["x"])),
                                    "param_error": _error(params_n, ref_params),
                                    "loss_error": _error(metrics["loss"], ref_metrics["loss"])}
    return results


if __name__ == "__main__":
    result = {}
    for cases in (attention_cases, ring_cases, train_cases):
        result.update(cases())
    print("RESULT" + json.dumps(result))
