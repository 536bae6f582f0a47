"""Data-parallel and multi-process training with JAX's own SPMD machinery (no hand-rolled communication).

``train_step`` is a plain ``jax.jit`` program: give it a batch sharded along the example axis and
parameters replicated over a :class:`jax.sharding.Mesh`, and XLA partitions it, inserting the
gradient all-reduce itself. Example ``i`` draws its mask from ``fold_in(step_key, i)`` (global
index), so the masks, and hence the result, do not depend on how many devices or processes share
the batch.

On N hosts (one process per host, or per GPU)::

    # every process runs the same program
    jdrop.distributed.initialize()          # reads JAX's standard environment, or pass
                                            # coordinator_address="host0:1234", num_processes=N, process_id=i
    mesh = jdrop.distributed.data_mesh()    # all devices of all processes, axis "data"
    state = jdrop.distributed.replicate(state, mesh)
    for step, batch in enumerate(batches):  # every process sees the same global batch (or provides
        batch = jdrop.distributed.shard_batch(batch, mesh)   # just its rows: only those are read)
        state, metrics = jdrop.train_step(state, batch, jax.random.fold_in(key, step))

The demo takes the same settings: ``python -m jdrop --coordinator host0:1234 --num-processes N
--process-id i``. On CPU the processes talk through gloo collectives.

Sequence parallelism runs the same way: a mesh with a sequence axis over the devices of all processes
(``jax.make_mesh((hosts, devices_per_host), ("data", "seq"))``, or ``data_mesh("seq")``), token arrays
placed with :func:`shard_sequence`, and ``jdrop.dot_product_attention(..., axis_name="seq")`` inside the
model's ``shard_map`` (or ``jdrop.sequence_parallel_attention``): the ring's ``ppermute`` crosses
process boundaries like any collective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["data_mesh", "initialize", "replicate", "shard_batch", "shard_sequence"]


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
) -> None:
    """Starts JAX's distributed runtime (``jax.distributed.initialize``) for multi-process training.

    Arguments left as None are read by JAX from its standard environment (cluster auto-detection,
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). On CPU the
    collectives implementation is set to ``cpu_collectives`` (gloo) first, as cross-process CPU
    collectives need one.
    """
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def data_mesh(axis: str = "data", devices: Any = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) named ``axis``."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (axis,))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, axis: str = "data") -> dict[str, jax.Array]:
    """A global batch sharded along its leading (example) axis over ``mesh``'s ``axis``.

    ``batch`` holds the global arrays as seen by this process (host numpy or jax arrays); only the
    rows that this process's devices hold are read, so a process may fill the others with anything
    (e.g. ``np.empty``) when it loads only its own slice.
    """
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    out = {}
    for name, value in batch.items():
        if isinstance(value, jax.Array) and value.is_fully_addressable is False:
            out[name] = value  # already global
            continue
        out[name] = _global_array(np.asarray(value), sharding)
    return out


def shard_sequence(batch: Mapping[str, Any], mesh: Mesh, axis: str = "seq", batch_axis: str | None = None
                   ) -> dict[str, jax.Array]:
    """Global ``(batch, T, ...)`` arrays sharded along the sequence (dim 1) over ``mesh``'s ``axis``.

    The batch dim is sharded over ``batch_axis`` too when given (a 2-D mesh), replicated otherwise.
    As in :func:`shard_batch`, only the elements this process's devices hold are read.
    """
    sharding = NamedSharding(mesh, PartitionSpec(batch_axis, axis))
    return {name: _global_array(np.asarray(value), sharding) for name, value in batch.items()}


def _global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    def rows(index: Any) -> np.ndarray:
        return host[index]

    return jax.make_array_from_callback(host.shape, sharding, rows)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` replicated on every device of ``mesh`` (each process must pass the same values)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(leaf):
        if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return _global_array(np.asarray(leaf), sharding)

    return jax.tree_util.tree_map(put, tree)
