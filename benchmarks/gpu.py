"""A prepared check-and-time script for a lent GPU: ``python -m benchmarks.gpu``.

It runs in one process, in a few minutes on an H100, and needs only JAX with its CUDA plugin
(plus whichever of flax, equinox and haiku are installed: the others are skipped):

1. Correctness: ``jdrop.keep_mask`` equals ``jax.random.bernoulli`` for the same key (jitted and
   not), ``jdrop.dropout`` equals the naive ``where(bernoulli, x / keep, 0)``, and its gradient
   under every residual policy equals ``jax.grad`` of the naive version.
2. The op table of :mod:`benchmarks.ops` (4096x4096 and 256x1024, forward and value_and_grad)
   for every JAX framework, with the device copy ``x * 2.0`` as the bandwidth reference.
3. Attention-probability dropout at shape (8, 16, 2048, 2048) (batch, heads, queries, keys),
   where dropout's memory traffic matters most, reported the same way.
4. The memory table of :mod:`benchmarks.memory` (the MLP training step's temporary memory from
   XLA's buffer assignment on this backend; compilation only, one compilation per step).
5. Fused attention: ``jdrop.dot_product_attention`` against ``flax.linen.dot_product_attention``
   with the same ``dropout_rng`` (outputs and gradients at highest precision, and the exact mask),
   then the training step of :mod:`benchmarks.attention` (B=4, H=8, D=64, dropout 0.1): its time
   and temporary memory for jdrop, flax with dropout and flax without, at T = 1024 and 4096.

Without a GPU (or with ``--quick``) the sizes shrink so that it runs on a CPU in a minute or
two. Results go to ``$OUT/gpu.json`` when ``OUT`` is set (or ``--out PATH``); the exit status is
1 when a correctness check fails.

Example, on the lent machine::

    PYTHONPATH=. python -m benchmarks.gpu            # writes $OUT/gpu.json
    PYTHONPATH=. python -m benchmarks.gpu --quick    # a smoke test anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import attention, memory, models, ops
from benchmarks._common import MiB, log, machine_description, markdown_table, time_call

JAX_FRAMEWORKS = tuple(f for f in ops.FRAMEWORKS if f != "torch")
ATTENTION_SHAPE = {"gpu": (8, 16, 2048, 2048), "cpu": (8, 16, 128, 128), "quick": (2, 4, 64, 64)}
OP_SHAPES = {"gpu": ops.FULL_SHAPES, "cpu": ops.QUICK_SHAPES, "quick": ((256, 256), (64, 256))}
RUNS = {"gpu": (50, 200), "cpu": (10, 30), "quick": (3, 5)}
"""Timed runs (large arrays, small arrays) per measurement."""
CALLS_PER_RUN = {"gpu": 10, "cpu": 1, "quick": 1}
"""Calls queued per timed run: on a GPU, enough to hide the per-call host round trip."""
FUSED_ATTENTION_LENGTHS = {"gpu": (1024, 4096), "cpu": (256,), "quick": (64,)}

# ------------------------------------------------------------------------------------- checks


def correctness_checks() -> list[dict[str, Any]]:
    """Mask equality with ``jax.random.bernoulli`` and gradients against a naive dropout."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jdrop

    results = []

    def check(name: str, passed: Callable[[], Any]) -> None:
        try:
            ok, detail = bool(passed()), ""
        except Exception as error:  # a crash is a failed check, reported, not a stopped script
            ok, detail = False, f"{type(error).__name__}: {error}"
        results.append({"check": name, "passed": ok, **({"detail": detail} if detail else {})})
        log(f"  {'PASS' if ok else 'FAIL'} {name} {detail}")

    def naive(key: Any, x: Any, rate: float) -> Any:
        keep = 1.0 - rate
        return jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, 0.0)

    key = jax.random.key(42)
    for shape in ((7,), (128, 257), (4, 3, 33, 65)):
        for rate in (0.1, 0.5, 0.9):
            expected = jax.random.bernoulli(key, 1.0 - rate, shape)
            check(
                f"keep_mask == bernoulli {shape} rate {rate}",
                lambda s=shape, r=rate, e=expected: np.array_equal(jdrop.keep_mask(key, s, r), e),
            )
            jitted = jax.jit(jdrop.keep_mask, static_argnums=(1,))
            check(
                f"jit(keep_mask) == bernoulli {shape} rate {rate}",
                lambda s=shape, r=rate, e=expected, f=jitted: np.array_equal(f(key, s, r), e),
            )
    x = jax.random.normal(jax.random.key(1), (256, 513), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    naive_grad = jax.jit(jax.grad(lambda x: jnp.vdot(naive(key, x, 0.5), cotangent)))(x)
    for policy in ("key", "bits", "mask"):
        forward = jax.jit(lambda x, p=policy: jdrop.dropout(key, x, 0.5, residual=p))
        check(f"dropout[{policy}] == naive forward", lambda f=forward: np.allclose(f(x), naive(key, x, 0.5)))
        grad = jax.jit(jax.grad(lambda x, p=policy: jnp.vdot(jdrop.dropout(key, x, 0.5, residual=p), cotangent)))
        check(f"grad dropout[{policy}] == grad naive", lambda g=grad: np.allclose(g(x), naive_grad))
    for name, matches in golden_matches().items():
        check(f"golden bits: {name}", lambda m=matches: m)
    for name, passed in fused_attention_checks().items():
        check(name, passed)
    return results


def fused_attention_checks() -> dict[str, Callable[[], bool]]:
    """``jdrop.dot_product_attention`` against flax's attention with the same ``dropout_rng``.

    Products at highest precision (a GPU's default float32 matmul is TF32), lengths that are not
    multiples of the tiles, both mask layouts; and the exact mask: with ``value`` the identity, the
    output rows are the dropped probabilities, so their zeros are the dropped entries.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jdrop

    rng = jax.random.key(7)
    q, k, v = (jax.random.normal(key, (2, 301, 4, 32)) for key in jax.random.split(jax.random.key(3), 3))
    cotangent = jax.random.normal(jax.random.key(4), q.shape)

    def value_and_grads(fn: Callable[..., Any], broadcast: bool) -> Any:
        options = {"dropout_rng": rng, "dropout_rate": 0.1, "broadcast_dropout": broadcast, "precision": "highest"}

        def loss(q: Any, k: Any, v: Any) -> Any:
            return jnp.vdot(fn(q, k, v, **options), cotangent)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    def close(broadcast: bool) -> bool:
        got, want = value_and_grads(jdrop.dot_product_attention, broadcast), value_and_grads(
            nn.dot_product_attention, broadcast
        )
        return all(
            np.allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
        )

    def exact_mask() -> bool:
        length = 299
        identity = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (1, length, 2, length))
        out = jax.jit(
            lambda q, k: jdrop.dot_product_attention(q, k, identity, dropout_rng=rng, dropout_rate=0.5,
                                                     broadcast_dropout=False)
        )(q[:1, :, :2], k[:1, :length, :2])
        keep = jax.random.bernoulli(rng, 0.5, (1, 2, 301, length))
        return np.array_equal(np.asarray(out).transpose(0, 2, 1, 3) != 0, np.asarray(keep))

    return {
        "dot_product_attention == flax (broadcast mask): outputs and grads": lambda: close(True),
        "dot_product_attention == flax (per-element mask): outputs and grads": lambda: close(False),
        "dot_product_attention mask == bernoulli exactly (301 x 299)": exact_mask,
    }


def golden_matches() -> dict[str, bool]:
    """Whether each integer/bool golden case of tests/test_golden.py gives the stored bits on this backend.

    The cases and their digests live with the test (``tests/golden/masks.json``); a lent GPU runs them here
    so that "same key, same mask on any backend" is checked, not assumed.
    """
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("jdrop_golden", root / "tests" / "test_golden.py")
    if spec is None or spec.loader is None:
        return {"tests/test_golden.py importable": False}
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stored = json.loads((root / "tests" / "golden" / "masks.json").read_text())
    current = module._fingerprints()
    # Bits, masks and keys must agree exactly on every backend; float outputs (e.g. an MLP's matmuls, which a
    # GPU may run in TF32) are not compared here.
    return {name: stored.get(name) == value for name, value in current.items() if not value["dtype"].startswith("<f")}


# ------------------------------------------------------------------------------------- timing


def time_frameworks(shapes: Sequence[Sequence[int]], size: str) -> list[dict[str, Any]]:
    """The op records (see :mod:`benchmarks.ops`) of every installed JAX framework at ``shapes``."""
    large_runs, small_runs = RUNS[size]
    records = []
    for framework in JAX_FRAMEWORKS:
        try:
            candidates = ops.jax_candidates(framework)
        except ImportError as error:
            log(f"  {framework}: skipped ({error})")
            continue
        for shape in shapes:
            runs = large_runs if ops.is_large(shape) else small_runs
            for name, fn in candidates.items():
                for mode in ops.MODES:
                    timing = ops.time_jax(fn, shape, mode, runs=runs, calls_per_run=CALLS_PER_RUN[size])
                    records.append({"framework": framework, "name": name, "shape": list(shape), "mode": mode, **timing})
                    log(f"  {name:24s} {'x'.join(map(str, shape)):>16s} {mode}: {timing['median_ms']:9.3f} ms")
    return records


def memory_records(quick: bool) -> list[dict[str, Any]]:
    """The memory suite's records for every installed framework (one compilation per step)."""
    records = []
    for framework in models.FRAMEWORKS:
        for cfg in memory.configs(quick):
            try:
                candidates = models.variants(framework, cfg)
            except ImportError as error:
                log(f"  {framework}: skipped ({error})")
                break
            for name, variant in candidates.items():
                base = {"framework": framework, "name": name, "depth": cfg.depth}
                if isinstance(variant, str):
                    records.append({**base, "note": variant})
                    continue
                result = memory.compile_step(variant, cfg, repeats=1)
                records.append({**base, "dropped_elements": cfg.dropped_elements, **result})
                log(f"  {name:24s} depth {cfg.depth}: temp {result['temp_bytes'] / 2**20:9.1f} MiB")
    return records


def fused_attention_records(size: str) -> list[dict[str, Any]]:
    """Step time and temporary memory of :mod:`benchmarks.attention`'s step for jdrop and flax."""
    import jax

    functions = attention._attention_functions()
    records = []
    for length in FUSED_ATTENTION_LENGTHS[size]:
        args = [jax.random.normal(key, (attention.BATCH, length, attention.HEADS, attention.DEPTH))
                for key in jax.random.split(jax.random.key(0), 4)]
        for name in (attention.JDROP, attention.FLAX, attention.FLAX_PLAIN):
            memory_result = attention.compiled_memory(functions[name], length)
            step = attention._step(functions[name])
            timing = time_call(lambda s=step, a=args: s(*a), jax.block_until_ready, runs=RUNS[size][0],
                               calls_per_run=CALLS_PER_RUN[size])
            records.append({"name": name, "length": length, "temp_mib": memory_result["temp_bytes"] / MiB, **timing})
            log(f"  {name:28s} T={length:5d}: {timing['median_ms']:9.3f} ms, temp "
                f"{records[-1]['temp_mib']:9.1f} MiB")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the checks and timings, prints the tables, writes the JSON; 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few runs (a smoke test on any machine)")
    parser.add_argument("--out", type=Path, help="JSON path (default $OUT/gpu.json when OUT is set)")
    args = parser.parse_args(argv)
    import jax

    backend = jax.default_backend()
    size = "quick" if args.quick else ("gpu" if backend == "gpu" else "cpu")
    start = time.perf_counter()
    log(f"backend {backend}, devices {jax.devices()}, sizes: {size}")
    log("correctness")
    checks = correctness_checks()
    log("op table")
    op_records = time_frameworks(OP_SHAPES[size], size)
    log("attention-probability dropout")
    attention_records = time_frameworks([ATTENTION_SHAPE[size]], size)
    log("MLP step memory")
    memory_summary = memory.summarize(memory_records(quick=size != "gpu"))
    log("fused attention step")
    fused_records = fused_attention_records(size)
    op_summary, attention_summary = ops.summarize(op_records), ops.summarize(attention_records)
    failed = [c["check"] for c in checks if not c["passed"]]
    passed = len(checks) - len(failed)
    print(f"correctness: {passed}/{len(checks)} checks passed", f"FAILED: {failed}" if failed else "")
    print("\n## Op table\n")
    print(ops.table(op_summary))
    print(f"\n## Attention-probability dropout {ATTENTION_SHAPE[size]}\n")
    print(ops.table(attention_summary))
    print(f"\n## {memory.title(quick=size != 'gpu')}\n")
    print(memory.table(memory_summary))
    print("\n## Fused attention step (B=4, H=8, D=64, dropout 0.1)\n")
    print(markdown_table(("variant", "T", "median ms", "min ms", "temp MiB"),
                         [(r["name"], r["length"], r["median_ms"], r["min_ms"], r["temp_mib"]) for r in fused_records]))
    report = {
        "machine": machine_description(),
        "sizes": size,
        "elapsed_s": time.perf_counter() - start,
        "checks": checks,
        "ops": op_summary,
        "attention": attention_summary,
        "memory": memory_summary,
        "fused_attention": fused_records,
    }
    out = args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        log(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
