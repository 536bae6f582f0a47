"""Compiles registered programs for one accelerator target without a device; run by ``_compile.py``.

``python _worker.py TARGET`` (TARGET: ``h100``, ``v4``, ``v5e`` or ``v6e``) reads program names on stdin, one a
line, and for each writes ``{"start": NAME}`` and then ``{"done": NAME, "ok": ..., "seconds": ..., "info": ...}``
as JSON lines on stdout. The device is a compile-only one from ``jax.experimental.topologies``: for H100,
XLA's target config of the card (``h100_sxm.txtpb``); for TPUs, libtpu's description of the chip. Programs are
traced under the target's abstract mesh (so Pallas's chip-dependent rules see the target, not this CPU) and with
jdrop's kernels for the target's backend, then compiled by the target's compiler: XLA:GPU down to sm_90a cubin
with Triton, or XLA:TPU with Mosaic.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks._watchdog import die_with_parent, emit

HERE = Path(__file__).resolve().parent
TPU_TOPOLOGIES = {"v4": "v4:1x1x1", "v5e": "v5e:1x1", "v6e": "v6e:1x1"}


def target_device(target: str) -> Any:
    """A compile-only device of ``target``."""
    if target == "h100":
        config = (HERE / "h100_sxm.txtpb").read_text()
        return topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1").devices[0]
    topology = topologies.get_topology_desc(platform="tpu", topology_name=TPU_TOPOLOGIES[target],
                                            chip_config_name="default", chips_per_host_bounds=(1, 1, 1), num_slices=1)
    return topology.devices[0]


def compile_program(name: str, mesh: Mesh, backend: str) -> Any:
    """Program ``name`` built and ``jax.jit``-compiled for ``mesh``'s device, every argument placed there.

    Built inside the target's contexts too: building traces (a flax model's ``init`` runs its attention).
    """
    import programs

    from jdrop.attention import _pallas

    sharding = NamedSharding(mesh, PartitionSpec())
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), _pallas.kernels_for(backend, interpret=False):
        function, args = programs.build(name)
        placed = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
        lowered = jax.jit(function).lower(*placed)
    return lowered.compile()


def describe(compiled: Any) -> dict[str, Any]:
    """What the target's compiler reports of the program's memory (bytes)."""
    stats = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {name: int(getattr(stats, name)) for name in fields if stats is not None}


def main(target: str) -> None:
    die_with_parent()

    backend = "gpu" if target == "h100" else "tpu"
    mesh = Mesh([target_device(target)], ("x",))
    for name in (line.strip() for line in sys.stdin):
        if not name:
            continue
        emit(start=name)
        start = time.monotonic()
        try:
            info = describe(compile_program(name, mesh, backend))
            emit(done=name, ok=True, seconds=time.monotonic() - start, info=info)
        except Exception as error:  # the compiler's refusal is this program's result, not the worker's end
            message = "".join(traceback.format_exception_only(type(error), error)).strip()
            emit(done=name, ok=False, seconds=time.monotonic() - start, message=message[-3000:])


if __name__ == "__main__":
    main(sys.argv[1])
