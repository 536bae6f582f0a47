"""What the attention dropout mask costs: integer ops per element, counted, and step times, measured.

``python -m benchmarks.attention_mask`` prints four tables (``--counts-only``: the first two; ``--ptx``: the H100
kernels' PTX counts instead, :func:`ptx_ops_per_element`):

1. Ops per attention element of the mask of each ``dropout_mask`` mode (``"exact"``: one threefry-2x32 call per
   element, flax's mask; ``"fast16"`` / ``"fast8"``: one call per 4 / 8 elements; ``"hash8"``: one call per
   group of 4 rows and tile, then a multiply-xorshift word per 4 elements), counted from the jaxpr of
   the tile function the xla path and the Pallas kernels share (``keep_factors``): every equation's output
   elements, by primitive, divided by the tile's elements. Integer and bool results are the mask's arithmetic;
   iotas, broadcasts, reshapes and int32/uint32 conversions (bit casts on every target) are listed apart as
   layout; the float ops are the final select of the factor.
2. The same count from the forward kernels' own IR (:func:`kernel_ops_per_element`: Triton for ``cuda``, Mosaic
   for ``tpu``, default tiles), which shows each jaxpr op lowering to one op over the tile.
3. The mask draw alone: one call's per-head factors ``(B, H, T, T)``, as XLA compiles the tile function (one
   fusion), per mode, round-robin.
4. The training step (forward and backward) of ``jdrop.dot_product_attention`` (the xla path) on this machine
   for each mode, timed round-robin in one process (B=4, H=8, D=64, rate 0.1, per-head dropout, the costliest
   for the mask, and flax's default broadcast dropout), with the no-dropout step as the reference.

On a CPU the threefry runs on the vector units beside the products, so the ratio of step times is a lower
bound of what the mask costs where the products run on tensor cores or an MXU (4 D flops per element there,
at a much higher rate than integer ops).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import log, machine_description, markdown_table, round_robin

MODES = ("exact", "fast16", "fast8", "hash8")
LAYOUT = frozenset({"iota", "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "convert_element_type"})
TILE = (64, 128)
BATCH, HEADS, DEPTH, RATE = 4, 8, 64, 0.1


def _equations(jaxpr: Any):
    """Every equation of a jaxpr, nested jaxprs (pjit, closed calls) flattened."""
    from jax.extend import core

    for eqn in jaxpr.eqns:
        inner = list(core.jaxprs_in_params(eqn.params))
        if inner:
            for sub in inner:
                yield from _equations(sub)
        else:
            yield eqn


def ops_per_element(mode: str, tile: tuple[int, int] = TILE) -> dict[str, Any]:
    """Ops per element of one ``tile`` of the mask (per-head dropout), counted from the jaxpr.

    The tile function is the one both paths run: the rows that draw counters (``first_rows``), their flat indices
    in the ``(B * H * Tq, Tk)`` mask (``masks.index_words``), the keep decisions (``tile_keep``) and the factors.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from jdrop.attention import _dropout_mask

    n_rows, n_cols = tile

    def tile_factors(k0, k1, threshold, factor, head_row, row0, col0):
        rows = head_row + (row0 + _dropout_mask.first_rows(n_rows, mode)).astype(jnp.uint32)
        cols = (col0 + lax.broadcasted_iota(jnp.int32, (1, n_cols), 1)).astype(jnp.uint32)
        keep = _dropout_mask.tile_keep_at((k0, k1), rows, cols, 4096, 2**16, threshold, mode)
        return jnp.where(keep, factor, jnp.zeros_like(factor))

    u32, i32 = jnp.zeros((), jnp.uint32), jnp.zeros((), jnp.int32)
    jaxpr = jax.make_jaxpr(tile_factors)(u32, u32, u32, jnp.zeros((), jnp.float32), u32, i32, i32).jaxpr
    elements = n_rows * n_cols
    integer: Counter[str] = Counter()
    layout: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    for eqn in _equations(jaxpr):
        for var in eqn.outvars:
            size = math.prod(var.aval.shape)
            name = eqn.primitive.name
            if name in LAYOUT:
                layout[name] += size
            elif np.issubdtype(var.aval.dtype, np.integer) or var.aval.dtype == np.bool_:
                integer[name] += size
            else:
                floating[name] += size

    def per_element(counts: Counter[str]) -> dict[str, float]:
        return {name: count / elements for name, count in sorted(counts.items())}

    return {
        "mode": mode,
        "tile": list(tile),
        "integer_ops_per_element": sum(integer.values()) / elements,
        "layout_ops_per_element": sum(layout.values()) / elements,
        "float_ops_per_element": sum(floating.values()) / elements,
        "integer_by_primitive": per_element(integer),
        "layout_by_primitive": per_element(layout),
        "float_by_primitive": per_element(floating),
    }


KERNEL_LAYOUT = frozenset({
    "arith.constant", "arith.extui", "arith.trunci", "arith.bitcast", "arith.index_cast", "arith.extsi",
    "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.make_range", "tt.trans", "tt.get_program_id",
    "tt.addptr", "tt.load", "tt.store", "vector.broadcast", "vector.shape_cast", "vector.load", "vector.store",
    "tpu.iota", "tpu.broadcast_in_sublanes", "memref.load", "memref.store", "tpu.reshape", "arith.extf",
    "arith.truncf", "arith.sitofp", "arith.uitofp", "arith.fptosi", "arith.fptoui",
})
"""Ops of the kernels' IR that move or reinterpret data (layout), not counted as integer arithmetic."""
KERNEL_SHAPE = (1, 256, 1, 64)
"""``(B, T, H, D)`` of the lowered kernels: one query tile row and the default tiles of each backend."""


def _kernel_modules(platform: str, mode: str | None) -> list[Any]:
    """The Pallas kernels' own MLIR modules (Triton IR for ``cuda``, Mosaic for ``tpu``) of the forward pass."""
    import base64
    import json as json_

    import jax
    import jax.numpy as jnp
    from jaxlib.mlir import ir

    import jdrop
    from jdrop.attention import _pallas

    backend = "tpu" if platform == "tpu" else "gpu"
    args = [jax.ShapeDtypeStruct(KERNEL_SHAPE, jnp.bfloat16)] * 3

    def attention(q: Any, k: Any, v: Any) -> Any:
        options = {} if mode is None else {"dropout_rng": jax.random.key(0), "dropout_rate": 0.1,
                                           "dropout_mask": mode, "broadcast_dropout": False}
        with _pallas.kernels_for(backend, interpret=False):
            return jdrop.dot_product_attention(q, k, v, implementation="pallas", **options)

    module = jax.jit(attention).trace(*args).lower(lowering_platforms=(platform,)).compiler_ir("stablehlo")
    blobs: list[bytes] = []

    def walk(operation: Any) -> None:
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    if op.operation.name == "stablehlo.custom_call":
                        attrs = op.operation.attributes
                        target = ir.StringAttr(attrs["call_target_name"]).value
                        if "triton" in target:
                            blobs.append(ir.StringAttr(ir.DictAttr(attrs["mhlo.backend_config"])["ir"]).value_bytes)
                        elif target == "tpu_custom_call":
                            config = json_.loads(ir.StringAttr(attrs["backend_config"]).value_bytes)
                            blobs.append(base64.b64decode(config["custom_call_config"]["body"]))
                    walk(op.operation)

    walk(module.operation)
    return blobs


def kernel_ops_per_element(platform: str, mode: str) -> dict[str, Any]:
    """Integer ops per attention weight that ``mode``'s mask adds to the forward kernel, counted from its own IR.

    The kernel (Triton IR for ``platform="cuda"``, Mosaic for ``"tpu"``; default tiles, per-head dropout) is lowered
    with and without dropout; every op whose results are integer or boolean (``i1`` .. ``i64``) counts its result
    elements, except data movement and casts (``KERNEL_LAYOUT``); the difference, divided by a tile's weights, is
    what the mask costs per weight: the same count as :func:`ops_per_element`'s jaxpr count when each jaxpr op
    lowers to one IR op over the tile. (The Triton kernel loops over key tiles inside; its body is one tile.)
    """
    import math as math_

    from jaxlib.mlir import ir
    from jaxlib.mlir._mlir_libs import _tpu_ext, _triton_ext

    from jdrop.attention import _pallas

    def count(blobs: list[bytes]) -> Counter[str]:
        counts: Counter[str] = Counter()
        context = ir.Context()
        context.allow_unregistered_dialects = True
        _triton_ext.register_dialect(context)
        _tpu_ext.register_dialect(context)

        def walk(operation: Any) -> None:
            for region in operation.regions:
                for block in region.blocks:
                    for op in block.operations:
                        name = op.operation.name.removeprefix("stable_mosaic.")  # Mosaic's versioned form
                        for result in op.operation.results:
                            text = str(result.type)
                            found = re.fullmatch(r"(?:tensor|vector)<([0-9x]+)x(i\d+)>|(i\d+)", text)
                            if found:
                                shape = found.group(1)
                                counts[name] += math_.prod(int(d) for d in shape.split("x")) if shape else 1
                        walk(op.operation)

        with context:
            for blob in blobs:
                walk(ir.Module.parse(blob).operation)
        return counts

    backend = "tpu" if platform == "tpu" else "gpu"
    bq, bk = _pallas.tile_sizes(backend, KERNEL_SHAPE[1], KERNEL_SHAPE[1], None, None, mode)
    forward = slice(0, 1)  # the forward kernel (the first custom call)
    with_mask = count(_kernel_modules(platform, mode)[forward])
    without = count(_kernel_modules(platform, None)[forward])
    added = {name: (with_mask[name] - without[name]) / (bq * bk) for name in sorted(with_mask | without)
             if with_mask[name] != without[name]}
    layout = {name: n for name, n in added.items() if name in KERNEL_LAYOUT}
    integer = {name: n for name, n in added.items() if name not in KERNEL_LAYOUT}
    return {"platform": platform, "mode": mode, "tile": [bq, bk], "integer_ops_per_element": sum(integer.values()),
            "layout_ops_per_element": sum(layout.values()), "by_op": integer, "layout_by_op": layout}


PTX_NOT_INTEGER = ("ld", "st", "mov", "cvt", "mma", "wgmma", "ex2", "fma", "mul.f", "mul.rn.f", "add.f", "add.rn.f",
                   "sub.f", "max.f", "min.f", "bar", "cp", "shfl", "selp.f", "neg.f", "abs.f", "div", "rcp", "lg2",
                   "setp.eq.f", "setp.gt.f", "setp.lt.f", "setp.ne.f", "setp.ge.f", "setp.num", "setp.nan", "fence")
"""PTX opcodes (prefixes) that are not 32-bit integer arithmetic: memory, moves, conversions, float ops."""


def _ptx_loop(ptx: str, kernel: str) -> Counter[str]:
    """Opcode counts of the longest loop (the loop over tiles) of ``kernel`` in a PTX module."""
    lines = ptx.splitlines()
    labels = [i for i, line in enumerate(lines) if re.match(r"^\$L__BB\d+_\d+:", line)]
    spans = [(i, j) for i in labels for j in range(i + 1, len(lines))
             if "bra" in lines[j] and lines[j].strip().endswith(lines[i].rstrip(":") + ";")]
    start, end = max(spans, key=lambda span: span[1] - span[0])
    counts: Counter[str] = Counter()
    for line in (line.strip() for line in lines[start + 1:end]):
        if line and not line.startswith(("//", "$", "{", "}", ".")):
            counts[re.sub(r"^@!?%p\d+\s+", "", line).split()[0].rstrip(";")] += 1
    return counts


def ptx_ops_per_element(modes: Sequence[str] = MODES, backward: bool = False) -> list[dict[str, Any]]:
    """Integer PTX instructions per weight that each mask adds to the H100 kernels' loop over tiles.

    Needs JAX's CUDA plugin (``jax-cuda12-plugin``; no GPU): each program (the forward pass, or with ``backward``
    value_and_grad, which needs the dK/dV kernel that compiles for H100) is compiled for a compile-only H100 from
    XLA's target config (``tests/accelerators/h100_sxm.txtpb``) with ``--xla_dump_to``, and each kernel's PTX is
    read: the loop over tiles of the mode's kernel minus the no-dropout kernel's, integer opcodes only, divided by
    the weights a thread holds (64 x 64 tile, 4 warps at D = 64: 32). Run it with ``JAX_PLATFORMS=cpu`` set.
    """
    import os
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[1]
    program = f"""
import sys, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import jdrop
from jdrop.attention import _pallas
mode = sys.argv[1]
config = open({str(root / "tests" / "accelerators" / "h100_sxm.txtpb")!r}).read()
device = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1").devices[0]
mesh = Mesh([device], ("x",))
args = [jax.ShapeDtypeStruct((1, 256, 1, 64), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))] * 3
options = {{}} if mode == "none" else dict(dropout_rng=jax.random.key(0), dropout_rate=0.1, dropout_mask=mode)
attend = lambda q, k, v: jdrop.dot_product_attention(q, k, v, broadcast_dropout=False, implementation="pallas",
                                                     **options)
f = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)) if {backward} else attend
with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), _pallas.kernels_for("gpu", interpret=False):
    jax.jit(f).lower(*args).compile()
"""
    kernels = ("jdrop_attention_forward", "jdrop_attention_dkv", "jdrop_attention_dq") if backward else (
        "jdrop_attention_forward",)
    loops: dict[str, dict[str, Counter[str]]] = {}
    for mode in ("none", *modes):
        with tempfile.TemporaryDirectory() as dump:
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_dump_to={dump}",
                   "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
            subprocess.run([sys.executable, "-c", program, mode], env=env, check=True, capture_output=True)
            modules = [path.read_text() for path in Path(dump).glob("*.ptx")]
            loops[mode] = {kernel: _ptx_loop(next(m for m in modules if f".entry {kernel}(" in m), kernel)
                           for kernel in kernels}
    rows = []
    for mode in modes:
        for kernel in kernels:
            with_mask, without = loops[mode][kernel], loops["none"][kernel]
            added = {op: (with_mask[op] - without[op]) / 32 for op in sorted(with_mask | without)
                     if with_mask[op] != without[op] and not op.startswith(PTX_NOT_INTEGER)}
            rows.append({"mode": mode, "kernel": kernel, "integer_per_element": sum(added.values()), "by_op": added})
    return rows


def _timed(fn: Any, *args: Any) -> Any:
    """A runner for :func:`round_robin`: one call of the compiled ``fn`` (compiled here, outside the timing)."""
    import time

    import jax

    jax.block_until_ready(fn(*args))

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - start

    return run


def draw_times(length: int, rounds: int) -> list[dict[str, Any]]:
    """Median times (ms) of drawing one attention call's per-head mask factors alone, ``(B, H, T, T)``, per mode.

    The tile function of the ops count over the whole array as XLA compiles it (one fusion): what the mask
    itself costs on this machine, apart from the attention around it.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from jdrop import masks
    from jdrop.attention import _dropout_mask

    def draw(mode: str) -> Any:
        @jax.jit
        def factors(key_data: Any, threshold: Any, factor: Any) -> Any:
            heads = (jnp.arange(BATCH * HEADS, dtype=jnp.uint32) * np.uint32(length)).reshape(BATCH, HEADS, 1, 1)
            rows = heads + _dropout_mask.first_rows(length, mode).astype(jnp.uint32)
            cols = lax.broadcasted_iota(jnp.uint32, (1, length), 1)
            keep = _dropout_mask.tile_keep_at(key_data, rows, cols, length, BATCH * HEADS * length, threshold, mode)
            return jnp.where(keep, factor, jnp.zeros_like(factor))

        key = jax.random.key(1)
        if mode == "exact":
            threshold = masks.keep_threshold(jnp.float32(1 - RATE))
            operands = (jax.random.key_data(key), threshold, jnp.float32(1 / (1 - RATE)))
        else:
            operands = _dropout_mask.operands(key, RATE, jnp.float32, mode)
        return _timed(factors, *operands)

    times = round_robin({mode: draw(mode) for mode in MODES}, rounds)
    return [{"name": mode, "length": length, "median_ms": 1e3 * statistics.median(t),
             "vs_exact": statistics.median(a / b for a, b in zip(t, times["exact"]))} for mode, t in times.items()]


def step_times(length: int, rounds: int, broadcast: bool) -> list[dict[str, Any]]:
    """Median step times (ms) of the xla path per mode and without dropout, round-robin in one process."""
    import jax
    import jax.numpy as jnp

    import jdrop

    rng = jax.random.key(1)
    args = [jax.random.normal(key, (BATCH, length, HEADS, DEPTH)) for key in jax.random.split(jax.random.key(0), 4)]

    def step(**options: Any) -> Any:
        def loss(q: Any, k: Any, v: Any, dout: Any) -> Any:
            return jnp.vdot(jdrop.dot_product_attention(q, k, v, broadcast_dropout=broadcast, **options), dout)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    steps = {"no dropout": step()}
    steps.update({mode: step(dropout_rng=rng, dropout_rate=RATE, dropout_mask=mode) for mode in MODES})

    times = round_robin({name: _timed(fn, *args) for name, fn in steps.items()}, rounds)

    def paired(name: str, reference: str) -> float:
        """The median of per-round ratios: a slow round of a shared machine slows both steps of the pair."""
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    return [{"name": name, "length": length, "broadcast_dropout": broadcast, "times_ms": [1e3 * x for x in t],
             "median_ms": 1e3 * statistics.median(t), "vs_no_dropout": paired(name, "no dropout"),
             "vs_exact": paired(name, "exact") if name != "no dropout" else None}
            for name, t in times.items()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, help="JSON path")
    parser.add_argument("--counts-only", action="store_true", help="the op counts, no timing")
    parser.add_argument("--ptx", action="store_true",
                        help="only the H100 kernels' PTX counts (needs jax-cuda12-plugin; see ptx_ops_per_element)")
    args = parser.parse_args(argv)
    counts = [ops_per_element(mode) for mode in MODES]
    print("## Mask ops per attention element (counted from the jaxpr of one 64x128 tile)\n")
    print(markdown_table(("mode", "integer ops", "layout ops", "float ops"),
                         [(c["mode"], c["integer_ops_per_element"], c["layout_ops_per_element"],
                           c["float_ops_per_element"]) for c in counts]))
    kernels = [kernel_ops_per_element(platform, mode) for platform in ("cuda", "tpu") for mode in MODES]
    print("\n## Mask ops per attention element in the forward kernels' own IR (Triton for cuda, Mosaic for tpu)\n")
    print(markdown_table(("platform", "mode", "tile", "integer ops", "layout ops"),
                         [(k["platform"], k["mode"], "x".join(map(str, k["tile"])), k["integer_ops_per_element"],
                           k["layout_ops_per_element"]) for k in kernels]))
    if args.ptx:
        ptx = ptx_ops_per_element(backward=True)
        print("\n## Integer PTX instructions per weight, H100 kernels' loop over tiles (compiled without a GPU)\n")
        print(markdown_table(("mode", "kernel", "integer ops"),
                             [(r["mode"], r["kernel"], r["integer_per_element"]) for r in ptx]))
        if args.out is not None:
            args.out.write_text(json.dumps({"machine": machine_description(), "ptx_ops": ptx}, indent=1))
        return 0
    if args.counts_only:
        if args.out is not None:
            args.out.write_text(json.dumps({"machine": machine_description(), "ops": counts, "kernel_ops": kernels},
                                           indent=1))
        return 0
    log(f"timing the mask draw alone, T={args.length}")
    draws = draw_times(args.length, args.rounds)
    print(f"\n## Drawing one call's per-head mask factors alone, (B={BATCH}, H={HEADS}, T, T) at T={args.length}, "
          "round-robin\n")
    print(markdown_table(("mask", "median ms", "vs exact (paired)"),
                         [(r["name"], r["median_ms"], r["vs_exact"]) for r in draws]))
    records = []
    for broadcast in (False, True):
        log(f"timing T={args.length}, broadcast_dropout={broadcast}")
        records += step_times(args.length, args.rounds, broadcast)
    print(f"\n## xla path step time, T={args.length} (B={BATCH}, H={HEADS}, D={DEPTH}, rate {RATE}), round-robin\n")
    print(markdown_table(("mask", "broadcast_dropout", "median ms", "vs no dropout (paired)", "vs exact (paired)"),
                         [(r["name"], r["broadcast_dropout"], r["median_ms"], r["vs_no_dropout"], r["vs_exact"])
                          for r in records]))
    if args.out is not None:
        report = {"machine": machine_description(), "ops": counts, "kernel_ops": kernels, "draws": draws,
                  "steps": records}
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
