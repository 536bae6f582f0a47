"""jdrop inside a hand-written data-parallel ``jax.shard_map``: the gradients a single device computes.

Replicated parameters, examples sharded over 2 simulated CPU devices: ``jax.grad`` of ``jdrop.dropout`` (one key)
and of ``jdrop.mlp.apply`` (one key per example) inside ``shard_map`` (default ``check_vma=True``) equal the
gradients on one device (float tolerance: the batch sum is split over the shards). Forward mode inside
``shard_map`` raises JAX's custom_vjp error (reverse mode only there).
"""

import textwrap

from _util import run_on_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import json

    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P

    import jdrop

    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    params = jdrop.mlp.init(jax.random.key(0), [6, 16, 3])
    x = jax.random.normal(jax.random.key(1), (8, 6))
    keys = jdrop.example_keys(jax.random.key(2), 8)

    def mlp_loss(p, x, k):
        return jnp.sum(jnp.sin(jdrop.mlp.apply(p, x, key=k, rates=(0.2, 0.5), deterministic=False)))

    def drop_loss(w, x, k):  # one key for the shard's rows (the replicated key drawn on every device)
        return jnp.sum(jnp.sin(jdrop.dropout(jax.random.key(3), x * w, 0.5)))

    result = {}
    for name, loss, arg in (("mlp", mlp_loss, params), ("dropout", drop_loss, jnp.linspace(0.5, 1.5, 6))):
        def shard(a, x, k, loss=loss):
            g = jax.grad(loss)(a, x, k)  # a replicated: its cotangent is summed over the devices
            return g
        sharded = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=P()))(arg, x, keys)
        if name == "mlp":  # one key per example: the shards' masks are the whole batch's
            single = jax.grad(loss)(arg, x, keys)
        else:  # one key: each device draws the mask of its own rows; the reference sums the two shards' gradients
            single = jax.tree.map(jnp.add, jax.grad(loss)(arg, x[:4], keys[:4]), jax.grad(loss)(arg, x[4:], keys[4:]))
        diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                 zip(jax.tree.leaves(sharded), jax.tree.leaves(single))]
        scale = max(float(np.abs(np.asarray(b)).max()) for b in jax.tree.leaves(single))
        result[name] = {"max_diff": max(diffs), "scale": scale}
    try:
        jax.jit(jax.shard_map(lambda x, k: jax.jvp(lambda x: jdrop.mlp.apply(params, x, key=k, rates=0.5,
                deterministic=False), (x,), (x,))[1], mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))(x, keys)
        result["jvp_error"] = ""
    except TypeError as error:
        result["jvp_error"] = str(error)
    print("RESULT" + json.dumps(result))
    """
)


def test_data_parallel_shard_map_gradients_equal_one_device():
    result = run_on_cpu_devices(SCRIPT, devices=2)
    for name in ("mlp", "dropout"):
        r = result[name]
        assert r["scale"] > 1e-3, name  # not vacuous
        # float32: the batch sum is split in two shards, a different summation order: a few ulps of the scale.
        assert r["max_diff"] <= 1e-5 * (1 + r["scale"]), (name, r)
    assert "forward-mode" in result["jvp_error"], result["jvp_error"]
