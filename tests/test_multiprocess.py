"""Two processes on localhost through jax.distributed with gloo CPU collectives train like one."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration  # several Python processes

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    from functools import partial
    import jax, jax.numpy as jnp, numpy as np, optax
    import jdrop
    from jdrop import distributed, mlp

    port, num_processes, process_id, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if num_processes > 1:
        distributed.initialize(f"localhost:{port}", num_processes, process_id)
    B = 16
    params = mlp.init(jax.random.key(0), [12, 24, 24, 4], activation="tanh")
    state = jdrop.TrainState.create(apply_fn=partial(mlp.apply, rates=(0.1, 0.5, 0.5)), params=params,
                                    tx=optax.adam(1e-2))
    mesh = distributed.data_mesh()
    assert mesh.devices.size == num_processes
    state = distributed.replicate(state, mesh)
    for step in range(3):
        host = {"x": np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (B, 12))),
                "y": np.arange(B) % 4}
        batch = distributed.shard_batch(host, mesh)
        state, metrics = jdrop.train_step(state, batch, jax.random.fold_in(jax.random.key(7), step))
    # Per-example masks by global index, computed on the sharded examples.
    masks = jax.jit(lambda k: jax.vmap(lambda e: jdrop.keep_mask(e, (24,), 0.5))(jdrop.example_keys(k, B)),
                    out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))(
                    jax.random.key(7))
    local_rows = {int(s.index[0].start or 0): np.asarray(s.data).tolist() for s in masks.addressable_shards}
    leaves = [np.asarray(leaf.addressable_data(0)).tolist() for leaf in jax.tree.leaves(state.params)]
    json.dump({"params": leaves, "mask_rows": local_rows, "loss": float(metrics["loss"])}, open(out, "w"))
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


def _run_workers(script, tmp_path):
    """Runs ``script`` in 2 processes joined by ``jax.distributed`` and in 1 alone (each writes JSON to the path in
    its last argument); returns the lone run's JSON and the list of the 2 processes'."""
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(port), "2", str(i), str(tmp_path / f"p{i}.json")],
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    single = subprocess.run([sys.executable, "-c", script, "0", "1", "0", str(tmp_path / "single.json")],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    reference = json.loads((tmp_path / "single.json").read_text())
    return reference, [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]


def test_two_processes_match_single_process(tmp_path):
    reference, parts = _run_workers(WORKER, tmp_path)
    rows = {}
    for result in parts:
        for a, b in zip(result["params"], reference["params"]):
            # Float tolerance: the gradient all-reduce sums the two halves in another order.
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert abs(result["loss"] - reference["loss"]) < 1e-5
        rows.update(result["mask_rows"])
    # Each process computed the masks of its own examples; together they are the single run's masks.
    assert sorted(rows) == ["0", "8"]
    whole = np.concatenate([np.asarray(rows["0"]), np.asarray(rows["8"])])
    np.testing.assert_array_equal(whole, np.asarray(reference["mask_rows"]["0"]))


RING_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import jdrop
    from jdrop import distributed

    port, num_processes, process_id, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if num_processes > 1:
        distributed.initialize(f"localhost:{port}", num_processes, process_id)
    rng = np.random.default_rng(0)
    host = {name: rng.standard_normal((2, 16, 2, 4)).astype(np.float32) for name in ("q", "k", "v")}
    options = dict(dropout_rng=jax.random.key(3), dropout_rate=0.5, broadcast_dropout=False, is_causal=True,
                   block_q=4, block_k=4)

    def loss(q, k, v):
        if num_processes > 1:  # the ring over both processes' devices, load-balanced (zigzag)
            out = jdrop.sequence_parallel_attention(q, k, v, mesh=distributed.data_mesh("seq"), **options)
        else:
            out = jdrop.dot_product_attention(q, k, v, **options)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)), out

    arrays = distributed.shard_sequence(host, distributed.data_mesh("seq")) if num_processes > 1 else host
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        arrays["q"], arrays["k"], arrays["v"])

    def rows(x):  # this process's sequence rows: {first row: values}
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return {"0": np.asarray(x).tolist()}
        return {str(s.index[1].start or 0): np.asarray(s.data).tolist() for s in x.addressable_shards}

    json.dump({"out": rows(out), "grads": [rows(g) for g in grads]}, open(path, "w"))
    """
)


def test_ring_attention_across_two_processes_equals_one_process(tmp_path):
    # The ring's ppermute crosses the process boundary (gloo): each process holds half of the sequence.
    reference, parts = _run_workers(RING_WORKER, tmp_path)

    def whole(pieces):
        return np.concatenate([np.asarray(pieces[start]) for start in sorted(pieces, key=int)], axis=1)

    for name, index in (("out", None), ("grads", 0), ("grads", 1), ("grads", 2)):
        pieces = {}
        for part in parts:
            pieces.update(part[name] if index is None else part[name][index])
        assert sorted(pieces, key=int) == ["0", "8"]  # each process computed its own half
        expected = reference[name]["0"] if index is None else reference[name][index]["0"]
        # Float tolerance: the ring sums the key blocks' contributions in another order.
        np.testing.assert_allclose(whole(pieces), np.asarray(expected), rtol=1e-5, atol=1e-6)
