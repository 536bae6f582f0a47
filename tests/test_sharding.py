"""Data-parallel training over a jax.sharding.Mesh of 1, 2, 4 and 8 simulated CPU devices.

Runs in a subprocess because the device count is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

import textwrap

from _util import run_on_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import json
    from functools import partial

    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jdrop
    from jdrop import mlp

    assert jax.device_count() == 8, jax.devices()
    B = 32
    rates = (0.1, 0.5, 0.5)
    params = mlp.init(jax.random.key(0), [12, 24, 24, 4], activation="tanh")
    batch = {"x": jax.random.normal(jax.random.key(1), (B, 12)), "y": jnp.arange(B) % 4}
    run_key = jax.random.key(7)

    def masks_of(key):
        keys = jdrop.example_keys(key, B)
        return jax.vmap(lambda k: jdrop.keep_mask(k, (24,), 0.5))(keys)

    def train(devices):
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
        data = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        state = jdrop.TrainState.create(apply_fn=partial(mlp.apply, rates=rates), params=params, tx=optax.adam(1e-2))
        state = jax.device_put(state, replicated)
        sharded = jax.device_put(batch, data)
        for step in range(3):
            state, metrics = jdrop.train_step(state, sharded, jax.random.fold_in(run_key, step))
        mask = jax.jit(masks_of, out_shardings=data)(run_key)
        assert len(sharded["x"].sharding.device_set) == devices
        return state.params, np.asarray(mask), float(metrics["loss"])

    reference = train(1)
    result = {}
    for devices in (2, 4, 8):
        params_n, mask_n, loss_n = train(devices)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(params_n), jax.tree.leaves(reference[0])))
        result[devices] = {"max_param_diff": diff, "masks_equal": bool((mask_n == reference[1]).all()),
                           "loss_diff": abs(loss_n - reference[2])}
    print("RESULT" + json.dumps(result))
    """
)


def test_data_parallel_masks_and_params_match_single_device():
    result = run_on_cpu_devices(SCRIPT, devices=8)
    for devices, r in result.items():
        assert r["masks_equal"], f"{devices} devices: per-example masks differ from one device"
        # Float tolerance: reductions over the batch are summed in a different order per shard.
        assert r["max_param_diff"] < 1e-5, f"{devices} devices: params differ by {r['max_param_diff']}"
        assert r["loss_diff"] < 1e-5
